"""What one screening run is asked to do, in one Ray-free record: :class:`ScreenConfig`.

It owns its defaults and their help: ``cxr-ray screen`` and ``jobs/screen.py``
build their flags from the fields' metadata (:func:`cxr_ray.commands.options.add_config_flags`),
so a default is written once, here. How the cluster's resources are used when
a field is left at None is :func:`cxr_ray.screen.resources.plan_layout`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cxr_ray.engines.registry import BACKEND_NAMES, PRECISION_NAMES, check_precision
from cxr_ray.engines.request import EngineRequest, engine_options
from cxr_ray.engines.tta import check_views
from cxr_ray.errors import UsageError
from cxr_ray.io.gpu.mode import DECODE_MODES, check_decode_mode
from cxr_ray.io.types import DecodePolicy
from cxr_ray.models.registry import EXPLAIN_METHODS, explain_methods_help

DEFAULT_MAX_FILE_BYTES = 512 * 1024 * 1024
HEATMAP_MODES = ("none", "flagged")
PROGRESS_FORMATS = ("line", "json")
# Logical CPUs per predict actor and per decode task when the flags leave them out
# (see plan_layout for why a CPU-only cluster asks for a quarter CPU each).
GPU_ACTOR_CPUS = 1.0
CPU_ACTOR_CPUS = 0.25
GPU_DECODE_CPUS = 1.0
CPU_DECODE_CPUS = 0.25


def parse_actors(text: str) -> tuple[int, int]:
    """``MIN,MAX`` or ``N`` (= ``N,N``) predict actors; a :class:`UsageError` saying so otherwise."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise UsageError(f"--actors takes MIN,MAX or N (integers), got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise UsageError(f"--actors takes MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return parts[0], parts[1]


def check_heatmap_mode(mode: str) -> None:
    if mode not in HEATMAP_MODES:
        raise UsageError(f"heatmaps must be one of {', '.join(HEATMAP_MODES)}, got {mode!r}")


def _flag(help: str, **more: Any) -> dict[str, Any]:
    """Field metadata the CLI turns into a flag (``help``; ``flag``, ``metavar``, ``choices``...)."""
    return {"help": help, **more}


@dataclass
class ScreenConfig:
    """Everything one screening run needs; the CLI and ``jobs/screen.py`` fill it from flags."""

    model: str = field(metadata=_flag("model artifact directory (local or s3://)"))
    inputs: list[str] = field(metadata=_flag(
        "file, directory, s3:// prefix, glob, .csv/.parquet manifest with a 'path' column, or "
        "dicomweb://HOST[:PORT]/PATH?QUERY (QIDO-RS study search, e.g. ModalitiesInStudy=CR,DX) (repeatable)",
        flag="--input", metavar="URI_GLOB_OR_MANIFEST", action="append"))
    output: str = field(metadata=_flag("output prefix (local directory or s3://): parts/, _summary.json, _SUCCESS"))
    backend: str = field(default="auto", metadata=_flag("inference engine", choices=BACKEND_NAMES))
    precision: str = field(default="auto", metadata=_flag(
        "auto: fp16 on GPUs (TensorRT / torch), fp32 on CPUs; bf16: opt-in on CPUs with AVX512-BF16 / AMX "
        "(torch backend, about 1.5x the fp32 ONNX Runtime speed for DenseNet-121, checked against fp32 at load)",
        choices=PRECISION_NAMES))
    # The "engine" flags (cxr_ray.commands.options SHARED): passed unchanged to every predictor's load_backend.
    calibration: str | None = field(default=None, metadata={"shared": "calibration", "group": "engine"})
    calibration_images: int = field(default=EngineRequest.calibration_images,
                                    metadata={"shared": "calibration_images", "group": "engine"})
    verify_labels: str | None = field(default=None, metadata={"shared": "verify_labels", "group": "engine"})
    verify_images: int = field(default=EngineRequest.verify_images,
                               metadata={"shared": "verify_images", "group": "engine"})
    max_prob_diff: float | None = field(default=None, metadata={"shared": "max_prob_diff", "group": "engine"})
    batch_size: int = field(default=32, metadata=_flag("images per predict call"))
    tta: int = field(default=1, metadata=_flag(
        "test-time augmentation: mean probability over N fixed views per image (1 = off; N model passes)",
        metavar="N"))
    actors: tuple[int, int] | None = field(default=None, metadata=_flag(
        "predict actor pool size (default: 1,<GPUs> on GPU clusters; N,N with N = CPUs on CPU-only ones)",
        metavar="MIN,MAX", type="actors"))
    gpus_per_actor: float | None = field(default=None, metadata=_flag(
        "GPUs per predict actor (default: 1 when the cluster has GPUs, else 0)", metavar="F"))
    cpus_per_actor: float | None = field(default=None, metadata=_flag(
        f"logical CPUs (and backend threads) per predict actor (default: {GPU_ACTOR_CPUS:g} on GPU, "
        f"{CPU_ACTOR_CPUS:g} and 1 thread on CPU-only clusters)", metavar="F"))
    decode_cpus: float | None = field(default=None, metadata=_flag(
        f"logical CPUs per decode task (default: {GPU_DECODE_CPUS:g} on GPU clusters; on CPU-only ones the "
        "predict actors decode their own batches unless this is given)", metavar="F"))
    decode: str = field(default="auto", metadata=_flag(
        "where inputs are decoded: gpu (nvImageCodec inside the GPU predict actors: JPEG, JPEG 2000 and HTJ2K "
        "DICOM frames, native frames and JPEG files; any other input falls back to the CPU, the reason in its "
        "row's warnings), cpu (decode tasks, or the actors on CPU-only clusters), auto (gpu where the predict "
        "actors have GPUs and nvImageCodec is installed, else cpu)", choices=DECODE_MODES))
    # Decode inside the predict actors instead of in decode tasks. None: yes on CPU-only
    # clusters (unless decode_cpus is given) and with GPU decoding, no otherwise. See plan_layout.
    decode_in_actors: bool | None = None
    decode_batch_size: int = field(default=16, metadata=_flag("files per decode task", metavar="N"))
    rows_per_part: int = field(default=1000, metadata=_flag("rows per Parquet part: the resume granularity",
                                                            metavar="N"))
    pseudonym_key_env: str | None = field(default=None, metadata={"shared": "pseudonym_key_env"})
    s3_endpoint: str | None = field(default=None, metadata={"shared": "s3_endpoint"})
    address: str | None = field(default=None, metadata={"shared": "address"})
    # Credentials for dicomweb:// inputs and --dicom-results dicomweb://: the NAMES of the variables.
    dicomweb_user_env: str | None = field(default=None, metadata={"shared": "dicomweb_user_env"})
    dicomweb_password_env: str | None = field(default=None, metadata={"shared": "dicomweb_password_env"})
    dicomweb_token_env: str | None = field(default=None, metadata={"shared": "dicomweb_token_env"})
    max_file_bytes: int | None = field(default=DEFAULT_MAX_FILE_BYTES, metadata=_flag(
        "files larger than this get error 'too_large'", flag="--max-file-mb", metavar="MB", type="mebibytes"))
    max_errored_blocks: int = 16  # lost batches tolerated in the first pass (then recovered)
    max_task_retries: int = field(default=3, metadata=_flag(
        "retries of a batch whose worker died before its files get 'worker_crashed' rows",
        flag="--max-retries", metavar="N"))
    progress_every_s: float = field(default=15.0, metadata=_flag(
        "seconds between progress lines on stderr when it is not a terminal (a terminal gets one line "
        "updated in place; 0: off)", flag="--progress-every", metavar="S"))
    progress_format: str = field(default="line", metadata=_flag(
        "line: done/total, images/s, ETA and status counts for a person; json: the same as one JSON "
        "object per line (event 'progress') for a log collector", choices=PROGRESS_FORMATS))
    policy: DecodePolicy = field(default_factory=DecodePolicy)
    heatmaps: str = field(default="none", metadata=_flag(
        "flagged: write a heatmap overlay PNG (+ raw .npy) per flagged row under OUTPUT/_heatmaps/, its path "
        "in the row's heatmap_path column", choices=HEATMAP_MODES))
    dicom_results: str | None = field(default=None, metadata=_flag(
        "also write a DICOM Comprehensive SR per ok DICOM input (finding, score, threshold, flagged, model), "
        "into this folder / s3:// prefix, or to a PACS by STOW-RS (dicomweb://HOST[:PORT]/PATH); it carries the "
        "patient's real identifiers, copied from the source header; with --heatmaps flagged, also a Secondary "
        "Capture of each flagged DICOM input's overlay, in its study", metavar="DIR_OR_DICOMWEB"))
    heatmap_method: str = field(default="gradcam", metadata=_flag(
        f"explanation for --heatmaps: {explain_methods_help()}", choices=EXPLAIN_METHODS))

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        for name in ("batch_size", "decode_batch_size", "rows_per_part", "calibration_images", "verify_images"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.actors is not None:
            low, high = self.actors
            if not 1 <= low <= high:
                raise UsageError(f"actors must be MIN,MAX with 1 <= MIN <= MAX, got {low},{high}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise UsageError(f"gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        for name in ("cpus_per_actor", "decode_cpus"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"{name} must be > 0, got {value}")
        if self.max_file_bytes is not None and self.max_file_bytes <= 0:
            raise UsageError(f"max_file_bytes must be > 0, got {self.max_file_bytes}")
        check_heatmap_mode(self.heatmaps)
        if self.progress_format not in PROGRESS_FORMATS:
            raise UsageError(f"progress_format must be one of {', '.join(PROGRESS_FORMATS)}, got {self.progress_format!r}")
        if self.max_prob_diff is not None and not self.max_prob_diff >= 0:
            raise UsageError(f"max_prob_diff must be >= 0, got {self.max_prob_diff}")
        check_precision(self.precision)
        check_views(self.tta)
        check_decode_mode(self.decode)

    def engine_options(self) -> dict[str, Any]:
        """The :class:`~cxr_ray.engines.request.EngineRequest` options every predictor loads its backend with."""
        return engine_options(self)
