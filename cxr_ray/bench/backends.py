"""``cxr-ray bench backends``: images/s of every inference backend on one model, same run, same input.

The baseline is eager PyTorch, NCHW, fp32 on the chosen device; every other
row gives its ratio to that baseline measured in the same process, on the same
batch, interleaved round by round (``--rounds``) so that load from other
processes hits all backends alike. Warm-up iterations (graph optimisation,
``torch.compile``, allocator growth) are excluded. Each backend's output is
compared with the baseline's (``max_abs_diff_vs_baseline``): a fast backend
that computes something else would show here. ``best`` per batch size is
chosen among fp32-equivalent backends only; a faster lower-precision backend
is reported apart in ``best_lower_precision``.

``--arch NAME`` benchmarks a random-initialised network of that architecture
(speed does not depend on the weights) written to a temporary artifact;
``--model ARTIFACT`` benchmarks a real one (its ONNX export, or a cached
export if it has none).

CPU candidates: ``torch-eager-nchw-fp32`` (baseline), ``torch-eager-cl-fp32``
(channels_last), ``onnxruntime-cpu-fp32``, ``openvino-cpu-fp32`` (OpenVINO
installed; with ``--bf16`` also ``openvino-cpu-bf16`` where the CPU has
AVX512-BF16 / AMX, and with ``--int8-calibration SPEC`` ``openvino-cpu-int8``,
NNCF-quantised on those images); with ``--compile``
``torch-compile-cl-fp32`` (Inductor, frozen weights); with ``--bf16``
``torch-eager-cl-bf16`` (autocast bfloat16: NOT numerically equivalent, shown
for reference). Every row also gives ``ms_per_image`` and, where ONNX Runtime
ran, ``ratio_vs_onnxruntime`` (against ``onnxruntime-cpu-fp32`` in the same
run); ``--verify-labels SPEC`` adds their accuracy on real images (:mod:`cxr_ray.bench.backend_accuracy`). CUDA candidates (``--device cuda``): the baseline on the GPU,
``torch-cuda-cl-fp16`` (autocast), ``onnxruntime-cuda-fp32`` (onnxruntime-gpu)
and ``tensorrt-fp16`` / ``tensorrt-fp32`` (TensorRT installed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

from cxr_ray.bench.backend_accuracy import accuracy_on_real_images, add_accuracy_arguments
from cxr_ray.bench.machine import machine_info
from cxr_ray.bench.measure import random_artifact
from cxr_ray.engines.onnxruntime.build import ensure_onnx, export_onnx
from cxr_ray.engines.onnxruntime.runtime import OnnxRuntimeBackend
from cxr_ray.engines.openvino.quantize import quantized_model
from cxr_ray.engines.openvino.runtime import OpenVinoBackend, openvino_available
from cxr_ray.engines.request import EngineRequest
from cxr_ray.engines.tensorrt.build import PlanBuild, provide_plan
from cxr_ray.engines.tensorrt.runtime import TensorRTBackend, tensorrt_available
from cxr_ray.engines.torch.runtime import TorchBackend, cpu_has_native_bf16
from cxr_ray.engines.verify import DEFAULT_VERIFY_IMAGES
from cxr_ray.errors import UsageError
from cxr_ray.models.artifact import load_card, load_model, localize
from cxr_ray.models.card import ModelCard
from cxr_ray.progress import stage

BASELINE = "torch-eager-nchw-fp32"
ONNXRUNTIME = "onnxruntime-cpu-fp32"  # the CPU engine every other one is also compared with
DEFAULT_BATCH_SIZES = "1,8,32,128"


@dataclass
class BenchContext:
    root: Path
    card: ModelCard
    device: str
    num_threads: int | None
    max_batch: int
    int8_calibration: str | None = None
    _onnx: tuple[Path, str] | None = None

    def onnx(self) -> tuple[Path, str]:
        if self._onnx is None:
            self._onnx = ensure_onnx(self.root, self.card)
        return self._onnx


@dataclass(frozen=True)
class Candidate:
    name: str
    make: Callable[[BenchContext], object]
    exact: bool = True  # computes fp32-equivalent results (False: lower precision by design)


def _torch(device: str, *, channels_last: bool, precision: str = "fp32", compile: bool = False):
    def make(ctx: BenchContext):
        model, card = load_model(str(ctx.root))
        return TorchBackend(
            model, card.classes, card.image_size, device=device, precision=precision,
            channels_last=channels_last, compile=compile, num_threads=ctx.num_threads,
        )

    return make


def _onnxruntime(device: str):
    def make(ctx: BenchContext):
        path, sha = ctx.onnx()
        return OnnxRuntimeBackend(
            path, ctx.card.classes, ctx.card.image_size, device=device, num_threads=ctx.num_threads,
            expected_sha256=sha,
        )

    return make


def _openvino(precision: str):
    def make(ctx: BenchContext):
        path, sha = ctx.onnx()
        model = None
        if precision == "int8":
            request = EngineRequest(calibration=ctx.int8_calibration, calibration_images=128)
            model, _ = quantized_model(path, sha, ctx.card, request)
        return OpenVinoBackend(path, ctx.card.classes, ctx.card.image_size, precision=precision,
                               num_threads=ctx.num_threads, expected_sha256=sha, model=model)

    return make


def _cpu_openvino(bf16: bool, int8: bool) -> tuple[list[Candidate], list[dict]]:
    """The OpenVINO candidates (fp32; bf16 where the CPU has it; int8 with calibration images)."""
    if not openvino_available():
        return [], [{"backend": "openvino-cpu-fp32", "reason": "openvino is not installed (pip install 'cxr-ray[openvino]')"}]
    chosen, skipped = [Candidate("openvino-cpu-fp32", _openvino("fp32"))], []
    if bf16 and cpu_has_native_bf16():
        chosen.append(Candidate("openvino-cpu-bf16", _openvino("bf16"), exact=False))
    elif bf16:
        skipped.append({"backend": "openvino-cpu-bf16", "reason": "this CPU has no AVX512-BF16 / AMX"})
    if int8:
        chosen.append(Candidate("openvino-cpu-int8", _openvino("int8"), exact=False))
    return chosen, skipped


def _tensorrt(precision: str):
    def make(ctx: BenchContext):
        path, sha = ctx.onnx()
        build = PlanBuild(precision=precision, max_batch=ctx.max_batch, device=ctx.device)
        record, _ = provide_plan(ctx.root, ctx.card, path, sha, build)
        return TensorRTBackend.from_engine_file(
            ctx.root / record["file"], record["sha256"], ctx.card.classes, ctx.card.image_size,
            device=ctx.device, precision=precision,
        )

    return make


def candidates(device: str, *, compile: bool = False, bf16: bool = False,
               int8: bool = False) -> tuple[list[Candidate], list[dict]]:
    """The backends to measure on ``device`` and the ones skipped here (with the reason)."""
    skipped: list[dict] = []
    if device == "cpu":
        chosen = [
            Candidate(BASELINE, _torch("cpu", channels_last=False)),
            Candidate("torch-eager-cl-fp32", _torch("cpu", channels_last=True)),
            Candidate(ONNXRUNTIME, _onnxruntime("cpu")),
        ]
        openvino, skipped = _cpu_openvino(bf16, int8)
        chosen += openvino
        if compile:
            chosen.append(Candidate("torch-compile-cl-fp32", _torch("cpu", channels_last=True, compile=True)))
        if bf16:
            chosen.append(Candidate("torch-eager-cl-bf16", _torch("cpu", channels_last=True, precision="bf16"), exact=False))
        return chosen, skipped

    chosen = [
        Candidate(BASELINE, _torch(device, channels_last=False)),
        Candidate("torch-cuda-cl-fp16", _torch(device, channels_last=True, precision="fp16"), exact=False),
    ]
    if compile:
        chosen.append(Candidate("torch-compile-cuda-cl-fp16", _torch(device, channels_last=True, precision="fp16",
                                                                     compile=True), exact=False))
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        chosen.append(Candidate("onnxruntime-cuda-fp32", _onnxruntime(device)))
    else:
        skipped.append({"backend": "onnxruntime-cuda-fp32", "reason": "onnxruntime-gpu is not installed"})
    if tensorrt_available():
        chosen.append(Candidate("tensorrt-fp16", _tensorrt("fp16"), exact=False))
        chosen.append(Candidate("tensorrt-fp32", _tensorrt("fp32")))
    else:
        skipped.append({"backend": "tensorrt", "reason": "TensorRT is not installed (see cxr-ray export --help)"})
    return chosen, skipped


def _time_backend(backend, batch, *, seconds: float, warmup_s: float, min_iters: int) -> list[float]:
    """Per-iteration wall times (s) after warm-up: at least ``min_iters``, at least ``seconds`` in total."""
    start = time.perf_counter()
    backend.predict(batch)  # first call: lazy init / compile / allocator growth
    while time.perf_counter() - start < warmup_s:
        backend.predict(batch)
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - begin < seconds:
        t0 = time.perf_counter()
        backend.predict(batch)
        times.append(time.perf_counter() - t0)
    return times


def _load_backends(chosen: list[Candidate], ctx: BenchContext, skipped: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidates that load here; the others are reported in ``skipped`` (the baseline must load)."""
    backends = {}
    for cand in chosen:
        try:
            stage(f"loading {cand.name}")
            backends[cand.name] = cand.make(ctx)
        except Exception as exc:  # report, keep measuring the others
            if cand.name == BASELINE:
                raise
            skipped.append({"backend": cand.name, "reason": f"{type(exc).__name__}: {exc}"})
    return backends


def _measure(backends: dict[str, Any], exact: dict[str, bool], batch_sizes: list[int], image_size: int,
             timing: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per backend and batch size, each backend timed in turn round by round on the same batch."""
    rng = np.random.default_rng(0)
    rows = []
    for size in batch_sizes:
        batch = rng.standard_normal((size, 1, image_size, image_size), dtype=np.float32)
        reference = backends[BASELINE].predict(batch)
        times: dict[str, list[float]] = {name: [] for name in backends}
        per_round = timing["seconds"] / timing["rounds"]
        for index in range(timing["rounds"]):
            for name, backend in backends.items():
                stage(f"timing {name} at batch {size}: round {index + 1}/{timing['rounds']}, "
                      f"batch size {batch_sizes.index(size) + 1}/{len(batch_sizes)}")
                times[name] += _time_backend(backend, batch, seconds=per_round, warmup_s=timing["warmup_s"],
                                             min_iters=timing["min_iters"])
        base_rate = size * len(times[BASELINE]) / sum(times[BASELINE])
        ort_rate = size * len(times[ONNXRUNTIME]) / sum(times[ONNXRUNTIME]) if ONNXRUNTIME in times else None
        for name, backend in backends.items():
            rate = size * len(times[name]) / sum(times[name])
            rows.append({
                "backend": name,
                "batch_size": size,
                "images_per_s": round(rate, 2),
                "ms_per_image": round(1000 / rate, 2),
                "ratio_vs_baseline": round(rate / base_rate, 2),
                "ratio_vs_onnxruntime": round(rate / ort_rate, 2) if ort_rate else None,
                "latency_ms_median": round(1000 * statistics.median(times[name]), 2),
                "iterations": len(times[name]),
                "max_abs_diff_vs_baseline": float(np.max(np.abs(backend.predict(batch) - reference))),
                "fp32_equivalent": exact[name],
            })
    return rows


def _best(rows: list[dict[str, Any]], batch_sizes: list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """"best" only among backends that compute the same numbers as fp32 PyTorch; lower-precision
    winners (bf16, fp16, TensorRT fp16) are listed apart so a speed-up is never a silent accuracy trade."""
    best, best_lower = {}, {}
    for size in batch_sizes:
        here = [r for r in rows if r["batch_size"] == size]
        row = max((r for r in here if r["fp32_equivalent"]), key=lambda r: r["images_per_s"])
        best[str(size)] = {k: row[k] for k in ("backend", "images_per_s", "ratio_vs_baseline")}
        lower = [r for r in here if not r["fp32_equivalent"] and r["images_per_s"] > row["images_per_s"]]
        if lower:
            top = max(lower, key=lambda r: r["images_per_s"])
            best_lower[str(size)] = {k: top[k] for k in ("backend", "images_per_s", "ratio_vs_baseline",
                                                         "max_abs_diff_vs_baseline")}
    return best, best_lower


def run_benchmark(
    root: Path,
    *,
    batch_sizes: list[int],
    seconds: float = 3.0,
    warmup_s: float = 1.0,
    min_iters: int = 2,
    rounds: int = 1,
    device: str = "cpu",
    num_threads: int | None = None,
    compile: bool = False,
    bf16: bool = False,
    int8_calibration: str | None = None,
    verify_labels: str | None = None,
    verify_images: int = DEFAULT_VERIFY_IMAGES,
    only: list[str] | None = None,
    source: str = "artifact",
) -> dict:
    """Measure every available candidate on the artifact at ``root``; returns the report dict."""

    card = load_card(str(root))
    info = machine_info(device)
    chosen, skipped = candidates(device, compile=compile, bf16=bf16, int8=int8_calibration is not None)
    if only:
        unknown = sorted(set(only) - {c.name for c in chosen} - {s["backend"] for s in skipped})
        if unknown:
            raise UsageError(f"unknown backends {unknown}; here: {[c.name for c in chosen]}")
        chosen = [c for c in chosen if c.name in only or c.name == BASELINE]
    ctx = BenchContext(root=root, card=card, device=device, num_threads=num_threads, max_batch=max(batch_sizes),
                       int8_calibration=int8_calibration)
    backends = _load_backends(chosen, ctx, skipped)
    info["torch_threads"] = torch.get_num_threads()  # after the backends applied --threads
    timing = {"seconds": seconds, "warmup_s": warmup_s, "min_iters": min_iters, "rounds": rounds}
    rows = _measure(backends, {c.name: c.exact for c in chosen}, batch_sizes, card.image_size, timing)
    best, best_lower = _best(rows, batch_sizes)
    accuracy = None
    if verify_labels and ONNXRUNTIME in backends:
        accuracy = accuracy_on_real_images(backends, ONNXRUNTIME, card, verify_labels, images=verify_images)
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return {
        "model": {"arch": card.arch, "image_size": card.image_size, "classes": len(card.classes),
                  "version": card.version, "source": source},
        "machine": info,
        "settings": {"batch_sizes": batch_sizes, "seconds": seconds, "warmup_s": warmup_s,
                     "min_iters": min_iters, "rounds": rounds, "num_threads": num_threads},
        "baseline": BASELINE,
        "results": rows,
        "best": best,
        "best_lower_precision": best_lower,
        "skipped": skipped,
        **({"accuracy_vs_onnxruntime": accuracy} if accuracy else {}),
    }


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "backends",
        help="images/s of torch / ONNX Runtime / OpenVINO / TensorRT on one model, vs eager PyTorch and ONNX Runtime",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="ARTIFACT", help="model artifact (local or s3://)")
    source.add_argument("--arch", metavar="NAME", help="random-initialised network of this architecture")
    parser.add_argument("--batch-sizes", type=_batch_sizes, default=_batch_sizes(DEFAULT_BATCH_SIZES),
                        help=f"comma-separated (default {DEFAULT_BATCH_SIZES})")
    parser.add_argument("--image-size", type=int, default=None,
                        help="with --arch: input size (default: the architecture's); with --model: the card's")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per backend and batch size")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per backend and batch size")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (spreads background load)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--backends", default=None, help="comma-separated subset (the baseline is always run)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to warm up)")
    parser.add_argument("--bf16", action="store_true",
                        help="also measure bfloat16 (torch autocast, OpenVINO where the CPU has AVX512-BF16 / AMX); "
                        "not fp32-equivalent")
    parser.add_argument("--int8-calibration", metavar="SPEC", default=None,
                        help="also measure OpenVINO int8 (NNCF), calibrated on 128 images of this manifest / "
                        "directory / glob; not fp32-equivalent")
    add_accuracy_arguments(parser)
    parser.add_argument("--s3-endpoint", default=None)
    parser.add_argument("--output", default=None, help="also write the JSON report to this file")
    return parser


def run(args: argparse.Namespace) -> int:
    only = [name.strip() for name in args.backends.split(",")] if args.backends else None
    common = dict(
        batch_sizes=args.batch_sizes, seconds=args.seconds, warmup_s=args.warmup, rounds=max(1, args.rounds),
        device=args.device, num_threads=args.threads, compile=args.compile, bf16=args.bf16, only=only,
        int8_calibration=args.int8_calibration, verify_labels=args.verify_labels, verify_images=args.verify_images,
    )
    if args.model:
        root = localize(args.model, args.s3_endpoint)
        card = load_card(str(root))
        if args.image_size is not None and args.image_size != card.image_size:
            raise UsageError(
                f"{args.model} takes {card.image_size} px images (its ONNX graph and preprocessing are fixed); "
                f"got --image-size {args.image_size}"
            )
        report = run_benchmark(root, source="artifact", **common)
    else:

        with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
            random_artifact(tmp, args.arch, args.image_size, positive_class=None)
            export_onnx(tmp)
            report = run_benchmark(Path(tmp), source="random-init", **common)
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    sys.stdout.flush()
    return 0
