"""INT8 calibration for TensorRT: a seeded sample of real inputs, and the calibrator that feeds them.

The images are the model's own decode and preprocessing of each sampled file
(:func:`cxr_ray.io.inputs.load_input`, as every surface reads an input); files
the decode policy refuses are skipped and counted. TensorRT deprecated
implicit INT8 calibration in 10.1 in favour of explicit (Q/DQ) quantisation;
it still works in 10.x.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_ray.engines.tensorrt.runtime import cuda_device, import_tensorrt
from cxr_ray.errors import BackendUnavailableError, DecodeError, UsageError
from cxr_ray.io.inputs import InputPolicy, load_input
from cxr_ray.io.storage import expand_inputs
from cxr_ray.models.card import ModelCard
from cxr_ray.preprocess import preprocess

DEFAULT_CALIBRATION_IMAGES = 512
CALIBRATION_BATCH = 16


def _reservoir(spec: str, limit: int, seed: int, s3_endpoint: str | None) -> tuple[list[str], int]:
    """A seeded uniform sample of ``limit`` inputs of ``spec`` (sorted), and how many there were."""
    rng = random.Random(seed)
    sample: list[str] = []
    candidates = 0
    for uri in expand_inputs(spec, s3_endpoint=s3_endpoint):
        candidates += 1
        if len(sample) < limit:
            sample.append(uri)
        else:
            slot = rng.randrange(candidates)
            if slot < limit:
                sample[slot] = uri
    return sorted(sample), candidates


def load_calibration_images(
    spec: str,
    card: ModelCard,
    *,
    limit: int = DEFAULT_CALIBRATION_IMAGES,
    seed: int = 0,
    s3_endpoint: str | None = None,
) -> tuple[np.ndarray, dict[str, int]]:
    """A seeded uniform sample (reservoir) of ``limit`` inputs of ``spec``, decoded and preprocessed.

    ``spec`` is anything :func:`cxr_ray.io.storage.expand_inputs` takes (a
    manifest, a directory, a glob). Files that do not decode, or are refused by
    the decode policy (lateral views, CT...), are skipped and counted. Returns
    the batch (n, 1, S, S) float32 and ``{"images", "skipped", "candidates", "seed"}``.
    """
    if limit < 1:
        raise UsageError(f"calibration needs at least 1 image, got limit={limit}")
    sample, candidates = _reservoir(spec, limit, seed, s3_endpoint)
    config = card.preprocess_config
    policy = InputPolicy(target_size=config.image_size, s3_endpoint=s3_endpoint)
    images, skipped = [], 0
    for uri in sample:
        try:
            images.append(preprocess(load_input(uri, policy).image.pixels, config))
        except DecodeError:
            skipped += 1
    if not images:
        raise UsageError(f"calibration input {spec!r}: none of {len(sample)} sampled files could be decoded")
    info = {"images": len(images), "skipped": skipped, "candidates": candidates, "seed": seed}
    return np.stack(images).astype(np.float32, copy=False), info


def make_calibrator(
    images: np.ndarray | None, batch_size: int, cache_path: Path, *, device: str | int | torch.device | None = None
) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding ``images`` in batches from one reused device buffer.

    With ``images`` None only the calibration cache at ``cache_path`` is used
    (TensorRT skips calibration when ``read_calibration_cache`` returns data).
    """
    trt = import_tensorrt()
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise BackendUnavailableError(
            f"TensorRT {trt.__version__} has no implicit INT8 calibration; quantise the ONNX graph "
            "explicitly (Q/DQ, e.g. NVIDIA ModelOpt) or build fp16"
        )
    dev = cuda_device(device if not isinstance(device, torch.device) else str(device))

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batch_size = batch_size
            self.images = images
            self.position = 0
            self.buffer = None
            if images is not None:
                self.buffer = torch.empty((batch_size, *images.shape[1:]), dtype=torch.float32, device=dev)

        def get_batch_size(self) -> int:
            return self.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            # Only whole batches: TensorRT expects exactly get_batch_size() images each time.
            if self.images is None or self.buffer is None or self.position + self.batch_size > len(self.images):
                return None
            chunk = self.images[self.position : self.position + self.batch_size]
            self.position += self.batch_size
            self.buffer.copy_(torch.from_numpy(np.ascontiguousarray(chunk)))
            torch.cuda.synchronize(dev)
            return [int(self.buffer.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            if self.images is None and cache_path.is_file():
                return cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache: bytes) -> None:
            cache_path.write_bytes(bytes(cache))

    return EntropyCalibrator()
