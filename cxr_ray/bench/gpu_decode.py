"""Decode rows of ``cxr-ray bench gpu``: GPU decode against one CPU core, and decode -> model end to end.

* ``decode``: per input set, files/s of the CPU path (``decode_image`` + ``preprocess``, process CPU
  seconds: files/s per core, as ``cxr-ray bench decode``) against the GPU path
  (:class:`~cxr_ray.io.gpu.decode.GpuDecoder` in batches + ``preprocess_tensor``, wall clock with the
  device synchronised; its CPU seconds are reported too, nvImageCodec's entropy stages use the CPU),
  and how far apart their model inputs are. On a machine without CUDA the GPU path runs with the
  Pillow reference codec on CPU tensors (``codec: pillow``): a dry run of the code, not a GPU figure.
* ``end_to_end``: the screening predict stage (:class:`~cxr_ray.screen.stages.Predictor`, a plain
  object: no Ray) reading files from disk, decoding and predicting, with ``--decode gpu`` and ``cpu``.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from cxr_ray.errors import DecodeError
from cxr_ray.io.decode import decode_image
from cxr_ray.io.gpu.codec import NvImageCodec, PillowCodec
from cxr_ray.io.gpu.decode import CPU_NOTE, DeviceImage, GpuDecoder
from cxr_ray.io.inputs import InputPolicy
from cxr_ray.models.artifact import load_card
from cxr_ray.preprocess import PreprocessConfig, preprocess, preprocess_tensor
from cxr_ray.screen.stages import Predictor


def make_decoder(device: str, image_size: int) -> GpuDecoder:
    codec = NvImageCodec(device) if device.startswith("cuda") else PillowCodec("cpu")
    return GpuDecoder(InputPolicy(target_size=image_size), codec=codec)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_path(files: list[bytes], config: PreprocessConfig) -> tuple[float, list[np.ndarray | None]]:
    """(CPU seconds, model inputs) of the CPU path over ``files``."""
    out: list[np.ndarray | None] = []
    start = time.process_time()
    for data in files:
        try:
            out.append(preprocess(decode_image(data, "bench", target_size=config.image_size).pixels, config))
        except DecodeError:
            out.append(None)
    return time.process_time() - start, out


def _gpu_path(decoder: GpuDecoder, files: list[bytes], config: PreprocessConfig, batch: int
              ) -> tuple[float, float, list[torch.Tensor | None], Counter]:
    """(wall s, CPU s, model inputs, fallback reasons) of the GPU path over ``files`` in batches."""
    wall, cpu = time.perf_counter(), time.process_time()
    out: list[torch.Tensor | None] = []
    notes: Counter = Counter()
    for i in range(0, len(files), batch):
        chunk = files[i : i + batch]
        for result in decoder.decode([f"bench-{i + j}" for j in range(len(chunk))], data=chunk):
            if isinstance(result, DecodeError):
                out.append(None)
                notes[f"error: {result.code}"] += 1
                continue
            pixels = result.pixels if isinstance(result, DeviceImage) else torch.from_numpy(result.pixels)
            out.append(preprocess_tensor(pixels.to(decoder.device), config))
            notes.update(w[len(CPU_NOTE):] for w in result.meta.warnings if w.startswith(CPU_NOTE))
    _sync(decoder.device)
    return time.perf_counter() - wall, time.process_time() - cpu, out, notes


def _differences(cpu: list[np.ndarray | None], gpu: list[torch.Tensor | None], distinct: int) -> dict[str, Any]:
    pairs = [(c, g) for c, g in list(zip(cpu, gpu, strict=True))[:distinct] if c is not None and g is not None]
    if not pairs:
        return {"compared": 0}
    diffs = [np.abs(g.detach().cpu().numpy() - c) for c, g in pairs]
    return {"compared": len(pairs), "max_abs_diff": round(float(max(d.max() for d in diffs)), 5),
            "mean_abs_diff": round(float(np.mean([d.mean() for d in diffs])), 5), "units": "standardised model input"}


def decode_rates(sets: dict[str, tuple[list[bytes], int]], decoder: GpuDecoder, config: PreprocessConfig,
                 *, batch: int, rounds: int) -> dict[str, Any]:
    """Per set (``{name: (files, distinct)}``): CPU files/s per core, GPU files/s, ratio, differences."""
    out: dict[str, Any] = {}
    for name, (files, distinct) in sets.items():
        _gpu_path(decoder, files[:batch], config, batch)  # warm-up: codec resources, kernels
        cpu_s, cpu_inputs = min((_cpu_path(files, config) for _ in range(rounds)), key=lambda r: r[0])
        wall_s, gpu_cpu_s, gpu_inputs, notes = min(
            (_gpu_path(decoder, files, config, batch) for _ in range(rounds)), key=lambda r: r[0])
        cpu_rate, gpu_rate = len(files) / max(cpu_s, 1e-9), len(files) / max(wall_s, 1e-9)
        out[name] = {
            "files": len(files), "distinct_files": distinct,
            "cpu_files_per_s_one_core": round(cpu_rate, 2),
            "gpu_files_per_s": round(gpu_rate, 2),
            "gpu_cpu_seconds_per_file": round(gpu_cpu_s / len(files), 5),
            "ratio_gpu_vs_one_core": round(gpu_rate / cpu_rate, 2),
            "fallbacks_and_errors": dict(notes),
            **_differences(cpu_inputs, gpu_inputs, distinct),
        }
    return out


def end_to_end(paths: list[str], artifact: str, device: str, decode_on: str, batch: int) -> dict[str, Any]:
    """Images/s of the screening predict stage over ``paths`` (read, decode, preprocess, predict).

    ``decode_on="gpu"`` on a CPU-only machine (a dry run) puts the Pillow reference decoder where the
    GPU actor's decoder would be.
    """
    card = load_card(artifact)
    decode = {"preprocessing": dict(card.preprocessing)}
    on_cuda = device.startswith("cuda")
    started = time.perf_counter()
    predictor = Predictor(artifact, "auto", run_id="bench-gpu", device=None if on_cuda else "cpu",
                          decode=decode, decode_on=decode_on if on_cuda else "cpu")
    if decode_on == "gpu" and not on_cuda:
        predictor.gpu_decoder = make_decoder("cpu", card.image_size)
    load_s = time.perf_counter() - started
    predictor(pa.table({"path": paths[:batch]}))  # warm-up: first batches, graph / kernel selection
    statuses: Counter = Counter()
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        statuses.update(predictor(pa.table({"path": paths[i : i + batch]})).column("status").to_pylist())
    seconds = time.perf_counter() - start
    return {
        "decode": "gpu" if predictor.gpu_decoder is not None else "cpu",
        "codec": getattr(getattr(predictor.gpu_decoder, "codec", None), "name", None),
        "backend": predictor.backend.label, "files": len(paths), "batch_size": batch, "statuses": dict(statuses),
        "images_per_s": round(statuses.get("ok", 0) / max(seconds, 1e-9), 2), "seconds": round(seconds, 3),
        "load_s": round(load_s, 2),
    }
