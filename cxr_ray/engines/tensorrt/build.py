"""TensorRT engines from the artifact's ONNX graph (TensorRT 10 Python API), verified on the GPU.

Build: ``trt.Builder`` -> ``create_network(0)`` (explicit batch is the only
mode in TensorRT 10) -> ``trt.OnnxParser`` -> builder config with a workspace
limit (``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``), one
optimisation profile over the batch axis (min / opt / max) and the precision
flags -> ``build_serialized_network``. ``fp32`` clears TF32 so it means fp32;
``fp16`` sets ``BuilderFlag.FP16``; ``int8`` sets INT8 (and FP16 for layers
without INT8 kernels) and calibrates (:mod:`cxr_ray.engines.tensorrt.calibration`).

The plan is then run against eager PyTorch (fp32, same GPU) on sample batches
and refused above its tolerance (:data:`cxr_ray.engines.contract.TOLERANCES`),
before it is recorded in ``engines/`` (see :mod:`cxr_ray.engines.cache` for
keys, sha256 and build-once locking). Every build setting is one
:class:`PlanBuild`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_ray.engines.cache import PRECISIONS, engine_key, get_or_build_engine
from cxr_ray.engines.contract import (
    INPUT_NAME,
    VERIFY_BATCH_SIZES,
    fp32_reference,
    max_abs_diff_vs_fp32,
    tolerance,
)
from cxr_ray.engines.onnxruntime.build import (
    DEFAULT_OPSET,
    ExportVerificationError,
    ensure_onnx,
    export_onnx,
    local_artifact,
)
from cxr_ray.engines.registry import get_engine
from cxr_ray.engines.request import EngineRequest
from cxr_ray.engines.tensorrt.calibration import (
    CALIBRATION_BATCH,
    DEFAULT_CALIBRATION_IMAGES,
    load_calibration_images,
    make_calibrator,
)
from cxr_ray.engines.tensorrt.runtime import (
    TensorRTBackend,
    cuda_device,
    import_tensorrt,
    trt_logger,
)
from cxr_ray.errors import ArtifactError, UsageError
from cxr_ray.models.artifact import ENGINES_DIR, load_card, load_model, sha256_file
from cxr_ray.models.card import EngineRecord, ModelCard
from cxr_ray.progress import stage

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 32
DEFAULT_WORKSPACE_GB = 4.0


@dataclass(frozen=True)
class PlanBuild:
    """Everything that decides which TensorRT plan is wanted and how it is built and checked."""

    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int | None = None  # None: max_batch
    max_batch: int = DEFAULT_MAX_BATCH
    workspace_gb: float = DEFAULT_WORKSPACE_GB
    calibration: str | None = None  # int8: inputs to calibrate on (manifest, directory, glob)
    calibration_limit: int = DEFAULT_CALIBRATION_IMAGES
    atol: float | None = None  # None: the contract's tolerance for this precision
    verify: bool = True
    device: str | int | None = None
    s3_endpoint: str | None = None

    @property
    def profile(self) -> tuple[int, int, int]:
        """(min, opt, max) batch, checked."""
        opt = self.opt_batch or self.max_batch
        if not 1 <= self.min_batch <= opt <= self.max_batch:
            raise UsageError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min_batch}, {opt}, {self.max_batch}"
            )
        return self.min_batch, opt, self.max_batch

    @property
    def tolerance(self) -> float:
        return tolerance("tensorrt", self.precision) if self.atol is None else self.atol


def current_engine_key(*, device: str | int | None, image_size: int, **profile: Any) -> str:
    """The cache key for this GPU and this TensorRT; ``profile``: precision, min_batch, opt_batch, max_batch
    (see :func:`cxr_ray.engines.cache.engine_key`)."""
    trt = import_tensorrt()
    capability = torch.cuda.get_device_capability(cuda_device(device))
    return engine_key(compute_capability=capability, trt_version=trt.__version__, image_size=image_size, **profile)


# --------------------------------------------------------------------------- build + verify


def _parse(trt: Any, onnx_path: str | os.PathLike) -> tuple[Any, Any, Any]:
    """(builder, network, parser) holding the parsed ONNX graph (the parser must outlive the build)."""
    builder = trt.Builder(trt_logger())
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger())
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportVerificationError(f"TensorRT could not parse {onnx_path}: {errors}")
    return builder, network, parser


def _set_precision(
    trt: Any, builder: Any, config: Any, build: PlanBuild, image_size: int,
    calibration_images: np.ndarray | None, calibration_cache: Path | None, device: torch.device,
) -> Any:
    """Precision flags, and for int8 the calibrator (returned: it must outlive the build)."""
    if build.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
        return None
    if build.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        return None
    config.set_flag(trt.BuilderFlag.INT8)
    config.set_flag(trt.BuilderFlag.FP16)
    if calibration_cache is None:
        raise UsageError("int8 needs a calibration cache path")
    if calibration_images is None and not calibration_cache.is_file():
        raise UsageError("int8 needs calibration images (--calibration MANIFEST) or an existing calibration cache")
    batch = CALIBRATION_BATCH if calibration_images is None else min(CALIBRATION_BATCH, len(calibration_images))
    calibrator = make_calibrator(calibration_images, batch, calibration_cache, device=device)
    config.int8_calibrator = calibrator
    shape = (batch, 1, image_size, image_size)
    calibration_profile = builder.create_optimization_profile()
    calibration_profile.set_shape(INPUT_NAME, shape, shape, shape)
    config.set_calibration_profile(calibration_profile)
    return calibrator


def build_engine(
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    *,
    image_size: int,
    build: PlanBuild,
    calibration_images: np.ndarray | None = None,
    calibration_cache: Path | None = None,
) -> dict[str, Any]:
    """Parse ``onnx_path``, build a plan for this GPU and write it to ``plan_path``; returns build metadata."""
    trt = import_tensorrt()
    if build.precision not in PRECISIONS:
        raise UsageError(f"unknown precision {build.precision!r}; valid: {', '.join(PRECISIONS)}")
    low, opt, high = build.profile
    dev = cuda_device(build.device)
    torch.cuda.set_device(dev)
    builder, network, parser = _parse(trt, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(build.workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, *((n, 1, image_size, image_size) for n in (low, opt, high)))
    config.add_optimization_profile(profile)
    calibrator = _set_precision(trt, builder, config, build, image_size, calibration_images, calibration_cache, dev)
    serialized = builder.build_serialized_network(network, config)
    del calibrator, parser  # kept alive until here: TensorRT uses both while building
    if serialized is None:
        raise ExportVerificationError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    with open(plan_path, "wb") as handle:
        handle.write(serialized)
    return {
        "precision": build.precision,
        "trt_version": trt.__version__,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(dev))),
        "gpu": torch.cuda.get_device_name(dev),
        "min_batch": low,
        "opt_batch": opt,
        "max_batch": high,
        "image_size": image_size,
        "workspace_gb": build.workspace_gb,
    }


def verify_engine(
    plan: bytes,
    model: torch.nn.Module,
    card: ModelCard,
    *,
    device: str | int | None = None,
    precision: str | None = None,
    batch_sizes: tuple[int, ...] = VERIFY_BATCH_SIZES,
) -> float:
    """Max abs difference of the engine vs eager fp32 PyTorch on the same GPU, on sample batches."""
    dev = cuda_device(device)
    backend = TensorRTBackend(plan, card.classes, card.image_size, device=str(dev), precision=precision)
    return max_abs_diff_vs_fp32(backend.predict, fp32_reference(model, dev), card.image_size,
                                batch_sizes=batch_sizes, what=f"TensorRT {precision}")


def _build_checked(
    root: Path, card: ModelCard, onnx_path: Path, onnx_sha256: str, build: PlanBuild, key: str, plan_path: Path
) -> dict[str, Any]:
    """Build the plan for ``key`` into ``plan_path`` (under the engines lock) and check it against PyTorch."""
    if sha256_file(onnx_path) != onnx_sha256:
        raise ArtifactError(f"{onnx_path}: sha256 does not match the recorded one; refusing to build from it")
    cache = root / ENGINES_DIR / f"{key}.calib"
    images, calibration_info = None, None
    if build.precision == "int8" and build.calibration is not None:
        stage(f"reading up to {build.calibration_limit} calibration images from {build.calibration}")
        images, calibration_info = load_calibration_images(
            build.calibration, card, limit=build.calibration_limit, s3_endpoint=build.s3_endpoint
        )
    elif build.precision == "int8" and not cache.is_file():
        raise UsageError(
            f"no int8 engine {key} and no calibration cache: build one with "
            "`cxr-ray export --format tensorrt --precision int8 --calibration MANIFEST`"
        )
    stage(f"building the TensorRT {build.precision} plan {key} (minutes)")
    meta = build_engine(onnx_path, plan_path, image_size=card.image_size, build=build, calibration_images=images,
                        calibration_cache=cache if build.precision == "int8" else None)
    if calibration_info is not None:
        meta["calibration"] = calibration_info
    if build.verify:
        stage(f"verifying the engine against PyTorch on batches of {list(VERIFY_BATCH_SIZES)}")
        model, _ = load_model(str(root))
        diff = verify_engine(plan_path.read_bytes(), model, card, device=build.device, precision=build.precision)
        log.info("TensorRT %s engine %s: max abs diff vs PyTorch %.3g", build.precision, key, diff)
        if diff > build.tolerance:
            raise ExportVerificationError(
                f"TensorRT {build.precision} engine {key} disagrees with PyTorch by {diff:.3g} "
                f"(> atol {build.tolerance:.3g}); not recorded"
            )
        meta.update(max_abs_diff=diff, atol=build.tolerance, verified_batch_sizes=list(VERIFY_BATCH_SIZES))
    return meta


def provide_plan(
    root: Path, card: ModelCard, onnx_path: Path, onnx_sha256: str, build: PlanBuild
) -> tuple[EngineRecord, bool]:
    """The recorded plan for this GPU / TensorRT / precision / profile, built (once per node) if missing."""
    low, opt, high = build.profile
    key = current_engine_key(device=build.device, precision=build.precision, min_batch=low, opt_batch=opt,
                             max_batch=high, image_size=card.image_size)
    return get_or_build_engine(
        root, key, lambda plan_path: _build_checked(root, card, onnx_path, onnx_sha256, build, key, plan_path),
        onnx_sha256=onnx_sha256,
    )


def export_tensorrt(
    artifact_dir: str | os.PathLike, build: PlanBuild | None = None, *, opset: int = DEFAULT_OPSET, **fields: Any
) -> dict[str, Any]:
    """Build (or find) the engine for this GPU into the artifact's ``engines/`` and record it.

    ``build``, or its fields as keyword arguments, says which plan.
    Exports ``model.onnx`` first when the artifact has none. Returns the
    engine record plus ``built`` (False when an identical engine was already
    recorded) and ``path``.
    """
    build = build or PlanBuild(**fields)
    import_tensorrt()
    cuda_device(build.device)
    root = local_artifact(artifact_dir)
    card = load_card(str(root))
    if card.onnx is None:
        export_onnx(root, opset=opset)
        card = load_card(str(root))
    onnx_path, onnx_sha256 = ensure_onnx(root, card)
    record, built = provide_plan(root, card, onnx_path, onnx_sha256, build)
    return {**record, "built": built, "path": str(root / record["file"])}


def provision(root: Path, card: ModelCard, request: EngineRequest) -> TensorRTBackend:
    """The TensorRT engine for the artifact: a recorded plan for this GPU, built from the ONNX graph if missing."""
    precision = get_engine("tensorrt").resolve_precision(request.precision, on_cpu=False)
    onnx_path, onnx_sha256 = ensure_onnx(root, card)
    build = PlanBuild(precision=precision, max_batch=request.max_batch or DEFAULT_MAX_BATCH,
                      device=request.device, s3_endpoint=request.s3_endpoint)
    record, _built = provide_plan(root, card, onnx_path, onnx_sha256, build)
    return TensorRTBackend.from_engine_file(
        root / record["file"], record["sha256"], card.classes, card.image_size, device=request.device,
        precision=precision,
    )
