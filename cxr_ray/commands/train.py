"""``cxr-ray train``: fine-tune or train a CNN on Ray Train; one run or patient-level k-fold CV.

Writes the model artifact (model.safetensors + model.json) with metrics.json,
roc.png, confusion.png and training_curves.png next to it (and cv_summary.json
with --folds). Per-epoch progress goes to stderr; the final JSON summary to
stdout. Re-running the same command after an interruption resumes every run
from its last checkpoint (same run name under the same --storage-path)
without repeating finished epochs.

Splits are by patient (manifest column patient_id; files without one are
each their own patient, and the summary says how many). With --folds K the
artifact is the final model trained on all non-test images (see
cxr_ray/train/protocols.py for the exact protocol).
"""

from __future__ import annotations

import argparse
import json
import os

from cxr_ray.commands.options import add_config_flags, add_shared, config_values
from cxr_ray.errors import UsageError
from cxr_ray.ray_session import connect, quiet_ray_data
from cxr_ray.train.config import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training flags (shared with ``jobs/train.py``), from :class:`TrainConfig`'s fields."""
    add_config_flags(parser, TrainConfig)
    add_shared(parser, "address")  # where the run goes: not part of what is trained


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train / fine-tune a model on Ray Train (one run or k-fold CV), write an artifact",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = config_values(args, TrainConfig)
    if values.get("fail_after_epoch") is None and os.environ.get("CXR_RAY_FAIL_AFTER_EPOCH"):
        values["fail_after_epoch"] = int(os.environ["CXR_RAY_FAIL_AFTER_EPOCH"])
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    config.validate()
    if config.use_gpu:
        import torch

        if not torch.cuda.is_available() and not args.address and not os.environ.get("RAY_ADDRESS"):
            raise UsageError("--use-gpu: no CUDA GPU is visible here; drop --use-gpu or pass --address of a GPU cluster")
    from cxr_ray.io.storage import check_writable
    from cxr_ray.train.protocols import train  # the surface (Ray, torch): loaded when the verb runs

    check_writable(config.out, config.s3_endpoint, option="--out")  # before Ray starts, not after training
    connect(args.address)
    quiet_ray_data()
    summary = train(config)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0
