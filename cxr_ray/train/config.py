"""Everything one training command decides, in one serialisable record.

The record goes into ``model.json`` (``training``), into every Ray Train
worker (``train_loop_config``) and, hashed, into the default run name, so
that re-running the same command finds the same run to resume.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, TypeVar

from cxr_ray.errors import UsageError
from cxr_ray.io.storage import is_remote
from cxr_ray.models.modes import TRAIN_MODES, TrainMode
from cxr_ray.models.registry import get_arch
from cxr_ray.preprocess import NORMALIZATIONS
from cxr_ray.train.recipes import RECIPE_NAMES, RECIPES, recipe_for

SCHEDULES = ("cosine", "step", "none")
CLASS_WEIGHTINGS = ("balanced", "none")
MONITORS = {"val_loss": "min", "val_accuracy": "max", "val_balanced_accuracy": "max", "val_auc": "max"}
LABEL_SPACES = ("keep", "extend")
# Fields that do not change what is trained: left out of the run-name hash.
_NOT_IN_RUN_KEY = frozenset(
    {"out", "storage_path", "run_name", "fail_after_epoch", "max_failures", "address", "s3_endpoint", "n_bootstrap", "quiet", "pseudonym_key_env"}
)


T = TypeVar("T")


def settled(value: T | None) -> T:
    """A recipe-controlled setting of a RESOLVED config (:meth:`TrainConfig.resolved` fills every one)."""
    if value is None:
        raise RuntimeError("a recipe setting is unset: call TrainConfig.resolved() before training")
    return value


def _flag(group: str, help: str, **more: Any) -> dict[str, Any]:
    """Field metadata ``cxr-ray train`` turns into a flag (see :mod:`cxr_ray.commands.options`)."""
    return {"group": group, "help": help, **more}


DATA, MODEL, OPTIMISATION, RUN = "data", "model", "optimisation", "cluster and output"
_BY_RECIPE = " (default: from --recipe)"
SELECTIONS = ("last", "best")
FINALS = ("ensemble", "retrain")


@dataclass
class TrainConfig:
    data: str = field(metadata=_flag(DATA, "folder tree root/<class>/<image> or a .csv/.parquet manifest "
                                     "path,label[,patient_id] (local or s3://)", metavar="LABELS_OR_DIR"))
    arch: str = field(metadata=_flag(MODEL, "architecture, e.g. mobilenet_v2, densenet121, vgg19, resnet50, "
                                     "resnet18 (an unknown name lists all)"))
    out: str = field(metadata=_flag(RUN, "artifact directory (local or s3://)", metavar="ARTIFACT_DIR"))
    mode: str = field(default="scratch", metadata=_flag(
        MODEL, "scratch: all weights from random init; frozen: train the head only; finetune: head + backbone at "
        "a lower LR", choices=TRAIN_MODES))
    # earlier CXR model (artifact or state dict): backbone + kept output neurons
    init: str | None = field(default=None, metadata=_flag(
        MODEL, "start from an earlier chest X-ray model (artifact or state dict): backbone + kept output neurons",
        flags=("--init", "--init-from"), metavar="URI"))
    pretrained: str | None = field(default=None, metadata=_flag(
        MODEL, "ImageNet weights: 'imagenet' (download) or a state-dict path/URI", metavar="URI"))
    label_space: str = field(default="keep", metadata=_flag(
        MODEL, "with --init: keep = the data's classes; extend = source classes + the data's new ones (DETL)",
        choices=LABEL_SPACES))
    recipe: str = field(default="auto", metadata=_flag(
        OPTIMISATION, "defaults for every setting left unset: small-data (measured on real CXRs, for --mode "
        "scratch), classic (ImageNet-style fine-tuning); auto = small-data for scratch, classic otherwise",
        choices=RECIPE_NAMES))
    epochs: int | None = field(default=None, metadata=_flag(OPTIMISATION, "training epochs" + _BY_RECIPE))
    image_size: int | None = field(default=None, metadata=_flag(
        DATA, "square input size (small-data: 128; classic: the architecture's)", metavar="PX"))
    batch_size: int = field(default=32, metadata=_flag(OPTIMISATION, "images per step per worker"))
    lr: float | None = field(default=None, metadata=_flag(
        OPTIMISATION, "AdamW peak learning rate of the head / whole model" + _BY_RECIPE))
    weight_decay: float | None = field(default=None, metadata=_flag(
        OPTIMISATION, "AdamW weight decay (not on biases and norm layers)" + _BY_RECIPE))
    backbone_lr_factor: float = field(default=0.1, metadata=_flag(MODEL, "finetune: backbone LR = lr x this"))
    finetune_blocks: int | None = field(default=None, metadata=_flag(
        MODEL, "finetune: train only the last N backbone stages", metavar="N"))
    schedule: str | None = field(default=None, metadata=_flag(OPTIMISATION, "LR schedule after warmup" + _BY_RECIPE,
                                                                choices=SCHEDULES))
    warmup_epochs: float | None = field(default=None, metadata=_flag(
        OPTIMISATION, "linear LR warmup in epochs (small-data: 15%% of the epochs; classic: 1)"))
    step_size: int = field(default=10, metadata=_flag(OPTIMISATION, "step schedule: epochs between decays"))
    gamma: float = field(default=0.1, metadata=_flag(OPTIMISATION, "step schedule: decay factor"))
    patience: int | None = field(default=None, metadata=_flag(
        OPTIMISATION, "early stopping: epochs without improvement (0 = off)" + _BY_RECIPE))
    monitor: str | None = field(default=None, metadata=_flag(
        OPTIMISATION, "validation metric for best epoch / early stopping" + _BY_RECIPE, choices=tuple(MONITORS)))
    select: str | None = field(default=None, metadata=_flag(
        OPTIMISATION, "weights to keep: last (the schedule's end) or best (best --monitor epoch)" + _BY_RECIPE,
        choices=SELECTIONS))
    label_smoothing: float | None = field(default=None, metadata=_flag(
        OPTIMISATION, "cross-entropy label smoothing" + _BY_RECIPE))
    mixup: float | None = field(default=None, metadata=_flag(
        OPTIMISATION, "MixUp Beta(a, a) parameter, 0 = off" + _BY_RECIPE, metavar="ALPHA"))
    cutmix: float | None = field(default=None, metadata=_flag(
        OPTIMISATION, "CutMix Beta(a, a) parameter, 0 = off (with --mixup: one of the two per batch)" + _BY_RECIPE,
        metavar="ALPHA"))
    ema_decay: float | None = field(default=None, metadata=_flag(
        OPTIMISATION, "keep an exponential moving average of the weights with this decay per step, 0 = off"
        + _BY_RECIPE))
    cpu_bf16: str = field(default="auto", metadata=_flag(
        RUN, "bf16 autocast for CPU training: auto = where the CPU has AVX512-BF16/AMX (checked on each worker)",
        choices=("auto", "on", "off")))
    precise_bn_images: int = field(default=256, metadata=_flag(
        OPTIMISATION, "re-estimate BatchNorm statistics on N training images after each epoch (0 = off)",
        metavar="N"))
    class_weighting: str = field(default="balanced", metadata=_flag(
        DATA, "loss weights against class imbalance", flag="--class-weights", choices=CLASS_WEIGHTINGS))
    augment: bool = field(default=True, metadata=_flag(
        DATA, "no training-time augmentation", flag="--no-augment", action="store_false"))
    crop_scale: list[float] | None = field(default=None, metadata=_flag(
        DATA, "random crop area range MIN,MAX (fraction of the film; > 1 zooms out)" + _BY_RECIPE,
        type="pair", metavar="MIN,MAX"))
    crop_ratio: list[float] | None = field(default=None, metadata=_flag(
        DATA, "random crop aspect ratio range MIN,MAX" + _BY_RECIPE, type="pair", metavar="MIN,MAX"))
    rotation: float | None = field(default=None, metadata=_flag(DATA, "random rotation, +/- degrees" + _BY_RECIPE))
    translate: float | None = field(default=None, metadata=_flag(
        DATA, "random shift, +/- fraction of the side" + _BY_RECIPE))
    brightness: float | None = field(default=None, metadata=_flag(DATA, "random brightness 1 +/- b" + _BY_RECIPE))
    contrast: float | None = field(default=None, metadata=_flag(DATA, "random contrast 1 +/- c" + _BY_RECIPE))
    exposure_gamma: float | None = field(default=None, metadata=_flag(
        DATA, "random gamma curve, exponent exp(+/- g), 0 = off" + _BY_RECIPE, metavar="G"))
    normalization: str | None = field(default=None, metadata=_flag(
        DATA, "input standardisation: fixed (ImageNet grey mean/std) or per_image" + _BY_RECIPE,
        choices=NORMALIZATIONS))
    hflip: bool = field(default=False, metadata=_flag(
        DATA, "also flip horizontally (off by default: anatomy is not symmetric)", action="store_true"))
    folds: int = field(default=0, metadata=_flag(
        DATA, "K-fold patient-level CV + a final model (0: one run)", metavar="K"))
    final: str | None = field(default=None, metadata=_flag(
        DATA, "with --folds: the artifact is an ensemble of the K fold models (mean of calibrated "
        "probabilities), or one model retrained on all development data" + _BY_RECIPE, choices=FINALS))
    val_fraction: float = field(default=0.15, metadata=_flag(DATA, "validation share of patients"))
    test_fraction: float = field(default=0.2, metadata=_flag(DATA, "held-out test share of patients; 0 = none"))
    positive_class: str | None = field(default="auto", metadata=_flag(
        DATA, "class for the binary report and the operating threshold ('auto': covid when present; 'none')"))
    target_sensitivity: float = field(default=0.95, metadata=_flag(
        OPTIMISATION, "operating threshold: highest with this sensitivity on validation data"))
    num_workers: int = field(default=1, metadata=_flag(RUN, "Ray Train workers (DDP)"))
    use_gpu: bool = field(default=False, metadata=_flag(RUN, "one GPU per worker (AMP + channels_last)",
                                                        action="store_true"))
    cpus_per_worker: float | None = field(default=None, metadata=_flag(
        RUN, "default: 1 with GPUs, else CPUs / workers"))
    storage_path: str | None = field(default=None, metadata=_flag(
        RUN, "Ray Train checkpoints (local or s3://; shared storage on multi-node clusters); default <out>.runs",
        metavar="URI"))
    run_name: str | None = field(default=None, metadata=_flag(
        RUN, "Ray Train run name (default: derived from --out and the training config)"))
    max_failures: int = field(default=1, metadata=_flag(RUN, "worker failures retried from the last checkpoint"))
    seed: int = field(default=0, metadata=_flag(OPTIMISATION, "random seed"))
    s3_endpoint: str | None = field(default=None, metadata={"shared": "s3_endpoint", "group": RUN})
    # env var with the HMAC key for DICOM patient pseudonyms
    pseudonym_key_env: str | None = field(default=None, metadata={"shared": "pseudonym_key_env", "group": DATA})
    n_bootstrap: int = field(default=1000, metadata=_flag(RUN, "bootstrap resamples for 95%% CIs (0 = none)"))
    # Fault injection for resume tests: the run raises after this epoch (not after a resume).
    fail_after_epoch: int | None = field(default=None, metadata=_flag(RUN, argparse.SUPPRESS))
    quiet: bool = field(default=False, metadata=_flag(RUN, "no progress lines on stderr", action="store_true"))
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A copy with every unset (None) setting taken from the recipe; ``recipe`` names the one used."""
        if self.recipe not in RECIPE_NAMES:
            raise UsageError(f"--recipe {self.recipe!r}: valid are {', '.join(RECIPE_NAMES)}")
        name = recipe_for(self.recipe, self.mode)
        values = dict(RECIPES[name])
        fraction = values.pop("warmup_fraction")
        out = replace(self, recipe=name)
        for key, value in values.items():
            if getattr(out, key) is None:
                setattr(out, key, list(value) if isinstance(value, list) else value)
        if out.warmup_epochs is None:
            out.warmup_epochs = 1.0 if fraction is None else round(fraction * float(out.epochs or 1), 3)
        return out

    def validate(self) -> None:
        """Refuse settings that cannot run, as they will run (after the recipe fills the unset ones)."""
        self.resolved()._validate()

    def _validate(self) -> None:
        try:
            spec = get_arch(self.arch)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if self.mode not in TRAIN_MODES:
            raise UsageError(f"--mode {self.mode!r}: valid modes are {', '.join(TRAIN_MODES)}")
        if self.mode == "scratch" and (self.init or self.pretrained):
            raise UsageError(
                "--mode scratch trains from random weights; drop --init/--pretrained or use --mode finetune / frozen"
            )
        if self.mode in ("frozen", "finetune") and not (self.init or self.pretrained):
            raise UsageError(
                f"--mode {self.mode} transfers weights: give --pretrained (imagenet or PATH) or --init ARTIFACT"
            )
        if self.label_space not in LABEL_SPACES:
            raise UsageError(f"--label-space {self.label_space!r}: valid are {', '.join(LABEL_SPACES)}")
        if self.label_space == "extend" and not self.init:
            raise UsageError("--label-space extend adds the data's classes to a source model's: give --init ARTIFACT")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule {self.schedule!r}: valid are {', '.join(SCHEDULES)}")
        if self.monitor not in MONITORS:
            raise UsageError(f"--monitor {self.monitor!r}: valid are {', '.join(MONITORS)}")
        self._validate_recipe_values()
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise UsageError(f"--class-weights {self.class_weighting!r}: valid are {', '.join(CLASS_WEIGHTINGS)}")
        size = self.image_size or spec.default_image_size
        if size < spec.min_image_size:
            raise UsageError(f"--image-size {size}: {self.arch} needs at least {spec.min_image_size}")
        for name, value, low in (("--epochs", settled(self.epochs), 1), ("--batch-size", self.batch_size, 2),
                                 ("--num-workers", self.num_workers, 1)):
            if value < low:
                raise UsageError(f"{name} must be >= {low}, got {value}")
        if settled(self.lr) <= 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if self.folds == 1 or self.folds < 0:
            raise UsageError(f"--folds must be 0 (one run) or >= 2, got {self.folds}")
        if not 0 <= self.test_fraction < 1 or not 0 < self.val_fraction < 1:
            raise UsageError("--val-fraction must be in (0, 1) and --test-fraction in [0, 1)")
        if self.test_fraction + self.val_fraction >= 0.9:
            raise UsageError("--val-fraction + --test-fraction leave too little to train on (keep them < 0.9)")

    def _validate_recipe_values(self) -> None:
        for name, choices in (("select", SELECTIONS), ("final", FINALS), ("normalization", NORMALIZATIONS),
                              ("cpu_bf16", ("auto", "on", "off"))):
            if getattr(self, name) not in choices:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: valid are {', '.join(choices)}")
        for name in ("label_smoothing", "ema_decay"):
            if not 0 <= float(getattr(self, name)) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        for name in ("mixup", "cutmix", "rotation", "translate", "brightness", "contrast", "exposure_gamma", "weight_decay"):
            if float(getattr(self, name)) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("crop_scale", "crop_ratio"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise UsageError(f"--{name.replace('_', '-')} needs 0 < MIN <= MAX, got {low},{high}")

    @property
    def train_mode(self) -> TrainMode:
        """``mode``, checked (validate() refuses an unknown one with the valid names)."""
        if self.mode not in TRAIN_MODES:
            raise UsageError(f"--mode {self.mode!r}: valid modes are {', '.join(TRAIN_MODES)}")
        return self.mode  # type: ignore[return-value]  # one of TRAIN_MODES, checked above

    @property
    def resolved_image_size(self) -> int:
        return int(self.image_size or get_arch(self.arch).default_image_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def run_key(self) -> str:
        """Hash of everything that changes what is trained (the default run name's suffix)."""
        data = {k: v for k, v in self.to_dict().items() if k not in _NOT_IN_RUN_KEY}
        data["data"] = _absolute(self.data)
        for key in ("init", "pretrained"):
            if data.get(key) and data[key] != "imagenet":
                data[key] = _absolute(data[key])
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def default_run_name(self) -> str:
        base = os.path.basename(self.out.rstrip("/")) or "model"
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in base)[:40]
        return f"cxr-{safe}-{self.run_key()}"

    def default_storage_path(self) -> str:
        """``<out>.runs`` next to the artifact: local, or on the same bucket (shared by all nodes)."""
        out = self.out.rstrip("/")
        return f"{out}.runs" if is_remote(out) else os.path.abspath(os.path.expanduser(out)) + ".runs"


def _absolute(uri: str) -> str:
    return uri if is_remote(uri) else os.path.abspath(os.path.expanduser(uri))
