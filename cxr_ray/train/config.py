"""Everything one training command decides, in one serialisable record.

The record goes into ``model.json`` (``training``), into every Ray Train
worker (``train_loop_config``) and, hashed, into the default run name, so
that re-running the same command finds the same run to resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields

from cxr_ray.errors import UsageError

SCHEDULES = ("cosine", "step", "none")
MONITORS = {"val_loss": "min", "val_accuracy": "max", "val_balanced_accuracy": "max", "val_auc": "max"}
LABEL_SPACES = ("keep", "extend")
# Fields that do not change what is trained: left out of the run-name hash.
_NOT_IN_RUN_KEY = frozenset(
    {"out", "storage_path", "run_name", "fail_after_epoch", "max_failures", "address", "s3_endpoint", "n_bootstrap", "quiet", "pseudonym_key_env"}
)


@dataclass
class TrainConfig:
    data: str
    arch: str
    out: str
    mode: str = "scratch"
    init: str | None = None  # earlier CXR model (artifact or state dict): backbone + kept output neurons
    pretrained: str | None = None  # ImageNet weights: "imagenet" or a path/URI of a state dict
    label_space: str = "keep"
    epochs: int = 10
    image_size: int | None = None  # None: the architecture's default
    batch_size: int = 32  # per worker
    lr: float = 1e-3
    weight_decay: float = 1e-4
    backbone_lr_factor: float = 0.1
    finetune_blocks: int | None = None
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    step_size: int = 10  # epochs between decays (schedule "step")
    gamma: float = 0.1
    patience: int = 5  # early stopping: epochs without improvement; 0 = off
    monitor: str = "val_loss"
    precise_bn_images: int = 256  # re-estimate BatchNorm statistics on this many images per epoch; 0 = off
    class_weighting: str = "balanced"  # "balanced" | "none"
    augment: bool = True
    hflip: bool = False
    folds: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    positive_class: str | None = "auto"  # "auto": "covid" when that class exists
    target_sensitivity: float = 0.95
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # None: 1 with GPUs, else the cluster's CPUs / workers
    storage_path: str | None = None
    run_name: str | None = None
    max_failures: int = 1
    seed: int = 0
    s3_endpoint: str | None = None
    pseudonym_key_env: str | None = None  # env var with the HMAC key for DICOM patient pseudonyms
    n_bootstrap: int = 1000
    fail_after_epoch: int | None = None  # fault injection for tests of resume
    quiet: bool = False
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        from cxr_ray.models.registry import get_arch
        from cxr_ray.models.transfer import TRAIN_MODES

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
        if self.class_weighting not in ("balanced", "none"):
            raise UsageError(f"--class-weights {self.class_weighting!r}: valid are balanced, none")
        size = self.image_size or spec.default_image_size
        if size < spec.min_image_size:
            raise UsageError(f"--image-size {size}: {self.arch} needs at least {spec.min_image_size}")
        for name, value, low in (("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 2),
                                 ("--num-workers", self.num_workers, 1)):
            if value < low:
                raise UsageError(f"{name} must be >= {low}, got {value}")
        if self.lr <= 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if self.folds == 1 or self.folds < 0:
            raise UsageError(f"--folds must be 0 (one run) or >= 2, got {self.folds}")
        if not 0 <= self.test_fraction < 1 or not 0 < self.val_fraction < 1:
            raise UsageError("--val-fraction must be in (0, 1) and --test-fraction in [0, 1)")
        if self.test_fraction + self.val_fraction >= 0.9:
            raise UsageError("--val-fraction + --test-fraction leave too little to train on (keep them < 0.9)")

    @property
    def resolved_image_size(self) -> int:
        from cxr_ray.models.registry import get_arch

        return int(self.image_size or get_arch(self.arch).default_image_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
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
        from cxr_ray.io.storage import is_remote

        out = self.out.rstrip("/")
        return f"{out}.runs" if is_remote(out) else os.path.abspath(os.path.expanduser(out)) + ".runs"


def _absolute(uri: str) -> str:
    from cxr_ray.io.storage import is_remote

    return uri if is_remote(uri) else os.path.abspath(os.path.expanduser(uri))
