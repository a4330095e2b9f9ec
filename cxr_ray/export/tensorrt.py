"""TensorRT engines from the artifact's ONNX graph (TensorRT 10 Python API), verified on the GPU.

Build: ``trt.Builder`` -> ``create_network(0)`` (explicit batch is the only
mode in TensorRT 10) -> ``trt.OnnxParser`` -> builder config with a workspace
limit (``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``), one
optimisation profile over the batch axis (min / opt / max) and the precision
flags -> ``build_serialized_network``. ``fp32`` clears TF32 so it means fp32;
``fp16`` sets ``BuilderFlag.FP16``; ``int8`` sets INT8 (and FP16 for layers
without INT8 kernels) and calibrates with an ``IInt8EntropyCalibrator2`` fed
from a sample of preprocessed images of a manifest (the same decode and
preprocess as screening). TensorRT deprecated implicit INT8 calibration in
10.1 in favour of explicit (Q/DQ) quantisation; it still works in 10.x.

The plan is then run against eager PyTorch (fp32, same GPU) on sample batches
and refused above a precision-dependent tolerance, before it is recorded in
``engines/`` (see :mod:`cxr_ray.export.engine_cache` for keys, sha256 and
build-once locking).

``tensorrt`` is imported lazily: this module imports on a CPU-only machine
and raises :class:`BackendUnavailableError` with the install hint when used.
"""

from __future__ import annotations

import logging
import os
import random
from functools import lru_cache
from pathlib import Path

import numpy as np

from cxr_ray.artifact import ENGINES_DIR, ModelCard, load_card, load_model, sha256_file
from cxr_ray.errors import ArtifactError, BackendUnavailableError, DecodeError, UsageError
from cxr_ray.export.engine_cache import PRECISIONS, engine_key, find_engine, get_or_build_engine
from cxr_ray.export.onnx import (
    INPUT_NAME,
    ExportVerificationError,
    _local_artifact,
    export_onnx,
    sample_inputs,
)

log = logging.getLogger(__name__)

TRT_INSTALL_HINT = (
    "TensorRT is not installed. Its wheels are on NVIDIA's package index: "
    "pip install 'cxr-ray[tensorrt]' --extra-index-url https://pypi.nvidia.com "
    "(or run in an NVIDIA container such as nvcr.io/nvidia/pytorch or nvcr.io/nvidia/tensorrt)"
)
# Absolute tolerance on probabilities, engine vs eager fp32 PyTorch on the same GPU.
DEFAULT_ATOL = {"fp32": 1e-3, "fp16": 2e-2, "int8": 1e-1}
DEFAULT_MAX_BATCH = 32
DEFAULT_WORKSPACE_GB = 4.0
DEFAULT_CALIBRATION_IMAGES = 512
CALIBRATION_BATCH = 16
VERIFY_BATCH_SIZES = (1, 3)


def import_tensorrt():
    """``tensorrt`` (>= 10), or :class:`BackendUnavailableError` saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(TRT_INSTALL_HINT) from exc
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} found; cxr-ray needs TensorRT >= 10. {TRT_INSTALL_HINT}")
    return trt


def tensorrt_available() -> bool:
    """TensorRT importable and a CUDA GPU visible (what ``auto`` backend selection asks)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


@lru_cache(maxsize=1)
def trt_logger():
    """One process-wide TensorRT logger (TensorRT expects a single logger per process)."""
    trt = import_tensorrt()
    return trt.Logger(trt.Logger.WARNING)


def cuda_device(device: str | int | None):
    """``torch.device("cuda", index)`` for None / N / "cuda" / "cuda:N"; refuses CPU and GPU-less machines."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs a CUDA GPU; torch sees none")
    if isinstance(device, str):
        dev = torch.device(device)
        if dev.type != "cuda":
            raise UsageError(f"TensorRT runs on CUDA devices only, got {device!r}")
        return torch.device("cuda", dev.index or 0)
    return torch.device("cuda", device or 0)


def current_engine_key(
    *,
    device: str | int | None,
    precision: str,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    image_size: int,
) -> str:
    """The cache key for this GPU, this TensorRT and this profile."""
    import torch

    trt = import_tensorrt()
    dev = cuda_device(device)
    return engine_key(
        compute_capability=torch.cuda.get_device_capability(dev),
        trt_version=trt.__version__,
        precision=precision,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        image_size=image_size,
    )


# --------------------------------------------------------------------------- calibration


def load_calibration_images(
    spec: str,
    card: ModelCard,
    *,
    limit: int = DEFAULT_CALIBRATION_IMAGES,
    seed: int = 0,
    s3_endpoint: str | None = None,
) -> tuple[np.ndarray, dict]:
    """A seeded uniform sample (reservoir) of ``limit`` inputs of ``spec``, decoded and preprocessed.

    ``spec`` is anything :func:`cxr_ray.io.storage.expand_inputs` takes (a
    manifest, a directory, a glob). Files that do not decode, or are refused by
    the decode policy (lateral views, CT...), are skipped and counted; the
    images are the model's own preprocessing of each file. Returns the batch
    (n, 1, S, S) float32 and ``{"images", "skipped", "candidates", "seed"}``.
    """
    from cxr_ray.io.decode import decode_image
    from cxr_ray.io.storage import expand_inputs, read_bytes
    from cxr_ray.preprocess import preprocess

    if limit < 1:
        raise UsageError(f"calibration needs at least 1 image, got limit={limit}")
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
    config = card.preprocess_config
    images, skipped = [], 0
    for uri in sorted(sample):
        try:
            decoded = decode_image(read_bytes(uri, s3_endpoint), os.path.basename(uri), target_size=config.image_size)
        except (DecodeError, OSError):
            skipped += 1
            continue
        images.append(preprocess(decoded.pixels, config))
    if not images:
        raise UsageError(f"calibration input {spec!r}: none of {len(sample)} sampled files could be decoded")
    info = {"images": len(images), "skipped": skipped, "candidates": candidates, "seed": seed}
    return np.stack(images).astype(np.float32, copy=False), info


def make_calibrator(images: np.ndarray | None, batch_size: int, cache_path: Path, *, device=None):
    """An ``IInt8EntropyCalibrator2`` feeding ``images`` in batches from one reused device buffer.

    With ``images`` None only the calibration cache at ``cache_path`` is used
    (TensorRT skips calibration when ``read_calibration_cache`` returns data).
    """
    import torch

    trt = import_tensorrt()
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise BackendUnavailableError(
            f"TensorRT {trt.__version__} has no implicit INT8 calibration; quantise the ONNX graph "
            "explicitly (Q/DQ, e.g. NVIDIA ModelOpt) or build fp16"
        )
    dev = cuda_device(device)

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
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

        def get_batch(self, names):
            # Only whole batches: TensorRT expects exactly get_batch_size() images each time.
            if self.images is None or self.position + self.batch_size > len(self.images):
                return None
            chunk = self.images[self.position : self.position + self.batch_size]
            self.position += self.batch_size
            self.buffer.copy_(torch.from_numpy(np.ascontiguousarray(chunk)))
            torch.cuda.synchronize(dev)
            return [int(self.buffer.data_ptr())]

        def read_calibration_cache(self):
            if self.images is None and cache_path.is_file():
                return cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache) -> None:
            cache_path.write_bytes(bytes(cache))

    return EntropyCalibrator()


# --------------------------------------------------------------------------- build + verify


def build_engine(
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    *,
    image_size: int,
    precision: str = "fp16",
    min_batch: int = 1,
    opt_batch: int = DEFAULT_MAX_BATCH,
    max_batch: int = DEFAULT_MAX_BATCH,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    calibration_images: np.ndarray | None = None,
    calibration_cache: Path | None = None,
    device: str | int | None = None,
) -> dict:
    """Parse ``onnx_path``, build a plan for this GPU and write it to ``plan_path``; returns build metadata."""
    import torch

    trt = import_tensorrt()
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    dev = cuda_device(device)
    torch.cuda.set_device(dev)
    logger = trt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportVerificationError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))

    def shape(n: int) -> tuple[int, int, int, int]:
        return (n, 1, image_size, image_size)

    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, shape(min_batch), shape(opt_batch), shape(max_batch))
    config.add_optimization_profile(profile)

    calibration = None
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    elif precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
        if calibration_cache is None:
            raise UsageError("int8 needs a calibration cache path")
        if calibration_images is None and not calibration_cache.is_file():
            raise UsageError("int8 needs calibration images (--calibration MANIFEST) or an existing calibration cache")
        batch = CALIBRATION_BATCH if calibration_images is None else min(CALIBRATION_BATCH, len(calibration_images))
        calibration = make_calibrator(calibration_images, batch, calibration_cache, device=dev)
        config.int8_calibrator = calibration
        calibration_profile = builder.create_optimization_profile()
        calibration_profile.set_shape(INPUT_NAME, shape(batch), shape(batch), shape(batch))
        config.set_calibration_profile(calibration_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportVerificationError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    with open(plan_path, "wb") as handle:
        handle.write(serialized)
    return {
        "precision": precision,
        "trt_version": trt.__version__,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(dev))),
        "gpu": torch.cuda.get_device_name(dev),
        "min_batch": min_batch,
        "opt_batch": opt_batch,
        "max_batch": max_batch,
        "image_size": image_size,
        "workspace_gb": workspace_gb,
    }


def verify_engine(
    plan: bytes,
    model,
    card: ModelCard,
    *,
    device: str | int | None = None,
    precision: str | None = None,
    batch_sizes=VERIFY_BATCH_SIZES,
) -> float:
    """Max abs difference of the engine vs eager fp32 PyTorch on the same GPU, on sample batches."""
    import torch

    from cxr_ray.backends.tensorrt_backend import TensorRTBackend

    dev = cuda_device(device)
    backend = TensorRTBackend(plan, card.classes, card.image_size, device=str(dev), precision=precision)
    reference = model.eval().to(dev)
    worst = 0.0
    # A true fp32 reference: cuDNN would otherwise use TF32 tensor cores for convolutions.
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for batch in sample_inputs(card.image_size, batch_sizes):
            expected = torch.softmax(reference(torch.from_numpy(batch).to(dev)).float(), dim=1).cpu().numpy()
            worst = max(worst, float(np.max(np.abs(backend.predict(batch) - expected))))
    return worst


def get_engine(
    root: Path,
    card: ModelCard,
    onnx_path: Path,
    onnx_sha256: str,
    *,
    precision: str = "fp16",
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    calibration: str | None = None,
    calibration_limit: int = DEFAULT_CALIBRATION_IMAGES,
    atol: float | None = None,
    verify: bool = True,
    device: str | int | None = None,
    s3_endpoint: str | None = None,
) -> tuple[dict, bool]:
    """The recorded engine for this GPU / TensorRT / precision / profile, built (once per node) if missing."""
    opt_batch = opt_batch or max_batch
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UsageError(f"batch profile must satisfy 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}")
    key = current_engine_key(
        device=device, precision=precision, min_batch=min_batch, opt_batch=opt_batch,
        max_batch=max_batch, image_size=card.image_size,
    )
    tolerance = DEFAULT_ATOL[precision] if atol is None else atol

    def build(plan_path: Path) -> dict:
        if sha256_file(onnx_path) != onnx_sha256:
            raise ArtifactError(f"{onnx_path}: sha256 does not match the recorded one; refusing to build from it")
        cache = root / ENGINES_DIR / f"{key}.calib"
        images, calibration_info = None, None
        if precision == "int8" and calibration is not None:
            images, calibration_info = load_calibration_images(
                calibration, card, limit=calibration_limit, s3_endpoint=s3_endpoint
            )
        elif precision == "int8" and not cache.is_file():
            raise UsageError(
                f"no int8 engine {key} and no calibration cache: build one with "
                "`cxr-ray export --format tensorrt --precision int8 --calibration MANIFEST`"
            )
        meta = build_engine(
            onnx_path, plan_path, image_size=card.image_size, precision=precision, min_batch=min_batch,
            opt_batch=opt_batch, max_batch=max_batch, workspace_gb=workspace_gb,
            calibration_images=images, calibration_cache=cache if precision == "int8" else None, device=device,
        )
        if calibration_info is not None:
            meta["calibration"] = calibration_info
        if verify:
            model, _ = load_model(str(root))
            diff = verify_engine(plan_path.read_bytes(), model, card, device=device, precision=precision)
            log.info("TensorRT %s engine %s: max abs diff vs PyTorch %.3g", precision, key, diff)
            if diff > tolerance:
                raise ExportVerificationError(
                    f"TensorRT {precision} engine {key} disagrees with PyTorch by {diff:.3g} (> atol {tolerance:.3g}); "
                    "not recorded"
                )
            meta.update(max_abs_diff=diff, atol=tolerance, verified_batch_sizes=list(VERIFY_BATCH_SIZES))
        return meta

    return get_or_build_engine(root, key, build, onnx_sha256=onnx_sha256)


def export_tensorrt(
    artifact_dir: str | os.PathLike,
    *,
    precision: str = "fp16",
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    calibration: str | None = None,
    calibration_limit: int = DEFAULT_CALIBRATION_IMAGES,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    opset: int = 17,
    atol: float | None = None,
    verify: bool = True,
    device: str | int | None = None,
    s3_endpoint: str | None = None,
) -> dict:
    """Build (or find) the engine for this GPU into the artifact's ``engines/`` and record it.

    Exports ``model.onnx`` first when the artifact has none. Returns the
    engine record plus ``built`` (False when an identical engine was already
    recorded) and ``path``.
    """
    import_tensorrt()
    cuda_device(device)
    root = _local_artifact(artifact_dir)
    card = load_card(str(root))
    if card.onnx is None:
        export_onnx(root, opset=opset)
        card = load_card(str(root))
    from cxr_ray.export.onnx import ensure_onnx

    onnx_path, onnx_sha256 = ensure_onnx(root, card)
    record, built = get_engine(
        root, card, onnx_path, onnx_sha256, precision=precision, min_batch=min_batch, opt_batch=opt_batch,
        max_batch=max_batch, workspace_gb=workspace_gb, calibration=calibration,
        calibration_limit=calibration_limit, atol=atol, verify=verify, device=device, s3_endpoint=s3_endpoint,
    )
    return {**record, "built": built, "path": str(root / record["file"])}


__all__ = [
    "TRT_INSTALL_HINT",
    "build_engine",
    "cuda_device",
    "current_engine_key",
    "export_tensorrt",
    "find_engine",
    "get_engine",
    "import_tensorrt",
    "load_calibration_images",
    "make_calibrator",
    "tensorrt_available",
    "verify_engine",
]
