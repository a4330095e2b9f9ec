"""What a caller asks of an engine, in one record (``load_backend``'s keyword arguments)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EngineRequest:
    """How to run: where, at which precision, with how many threads.

    ``device``: None lets each engine pick (TensorRT: ``cuda:0``; ONNX Runtime:
    the CUDA provider if installed, else CPU; torch: CUDA if visible).
    ``precision``: ``auto`` or a name of :func:`cxr_ray.engines.registry.precision_names`;
    each engine's registry entry says what it accepts. ``num_threads``: CPU
    threads of ONNX Runtime / torch. ``max_batch``: the TensorRT profile's
    largest batch (bigger batches are chunked). ``compile``: ``torch.compile``
    for the torch engine. ``cuda_graphs``: the torch engine on CUDA replays one
    captured CUDA graph per batch shape (checked against fp32 at load; off by
    default until the device check has measured it, see the README's GPU section).
    Engines checked against ONNX Runtime fp32 at load (OpenVINO): ``verify_labels``, a labelled set
    (manifest or folder tree) whose seeded sample of ``verify_images`` adds real images and an AUC
    check; ``max_prob_diff`` replaces the engine's tolerance (tighter for a site that validated fp32).
    ``calibration`` / ``calibration_images``: the images an int8 engine is calibrated on (manifest,
    directory or glob; a seeded sample), as for TensorRT int8.
    ``tta``: the mean over that many fixed views per image.
    """

    device: str | None = None
    precision: str = "auto"
    num_threads: int | None = None
    s3_endpoint: str | None = None
    max_batch: int | None = None
    compile: bool = False
    cuda_graphs: bool = False
    verify_labels: str | None = None
    verify_images: int = 256
    max_prob_diff: float | None = None
    calibration: str | None = None
    calibration_images: int = 512
    tta: int = 1  # test-time augmentation views per image (1 = off; see cxr_ray.engines.tta)
    # True when the caller asked for "auto" (load_backend has then filled in the device auto chose).
    auto: bool = False


# The request fields a surface (``screen``, ``serve``, ``listen``) takes from its "engine" flags and passes
# through unchanged to every backend it loads (--calibration, --verify-labels, --max-prob-diff, ...).
ENGINE_OPTION_NAMES = ("calibration", "calibration_images", "verify_labels", "verify_images", "max_prob_diff")


def engine_options(source: Any) -> dict[str, Any]:
    """``source``'s engine options (a config record or argparse namespace with those attributes), as
    :func:`~cxr_ray.engines.load.load_backend` keyword arguments; the ones it lacks keep their defaults."""
    return {name: getattr(source, name) for name in ENGINE_OPTION_NAMES if hasattr(source, name)}
