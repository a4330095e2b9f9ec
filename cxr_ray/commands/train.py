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
cxr_ray/train/runner.py for the exact protocol).
"""

from __future__ import annotations

import argparse
import json
import os

from cxr_ray.errors import UsageError
from cxr_ray.ray_session import connect  # noqa: F401  (also used by evaluate and bench train)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training flags (shared with ``jobs/train.py``). No torch import here: --help stays fast."""
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="LABELS_OR_DIR",
                      help="folder tree root/<class>/<image> or a .csv/.parquet manifest path,label[,patient_id] (local or s3://)")
    data.add_argument("--image-size", type=int, default=None, metavar="PX", help="square input size (default: the architecture's)")
    data.add_argument("--val-fraction", type=float, default=0.15, help="validation share of patients (default 0.15)")
    data.add_argument("--test-fraction", type=float, default=0.2, help="held-out test share of patients; 0 = none (default 0.2)")
    data.add_argument("--folds", type=int, default=0, metavar="K", help="K-fold patient-level CV + a final model (default: one run)")
    data.add_argument("--positive-class", default="auto",
                      help="class for the binary report and the operating threshold ('auto': covid when present; 'none')")
    data.add_argument("--class-weights", dest="class_weighting", choices=("balanced", "none"), default="balanced",
                      help="loss weights against class imbalance (default balanced)")
    data.add_argument("--no-augment", dest="augment", action="store_false", help="no training-time augmentation")
    data.add_argument("--hflip", action="store_true", help="also flip horizontally (off by default: anatomy is not symmetric)")
    data.add_argument("--pseudonym-key-env", metavar="VAR",
                      help="environment variable holding the HMAC key for DICOM patient pseudonyms (grouping only)")

    model = parser.add_argument_group("model")
    model.add_argument("--arch", required=True,
                       help="architecture, e.g. mobilenet_v2, densenet121, vgg19, resnet50, resnet18 (an unknown name lists all)")
    model.add_argument("--mode", choices=("scratch", "frozen", "finetune"), default="scratch",
                       help="scratch: all weights from random init; frozen: train the head only; finetune: head + backbone at a lower LR")
    model.add_argument("--pretrained", metavar="URI", help="ImageNet weights: 'imagenet' (download) or a state-dict path/URI")
    model.add_argument("--init", "--init-from", dest="init", metavar="URI",
                       help="start from an earlier chest X-ray model (artifact or state dict): backbone + kept output neurons")
    model.add_argument("--label-space", choices=("keep", "extend"), default="keep",
                       help="with --init: keep = the data's classes; extend = source classes + the data's new ones (DETL)")
    model.add_argument("--backbone-lr-factor", type=float, default=0.1, help="finetune: backbone LR = lr x this (default 0.1)")
    model.add_argument("--finetune-blocks", type=int, default=None, metavar="N", help="finetune: train only the last N backbone stages")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=10)
    opt.add_argument("--batch-size", type=int, default=32, help="images per step per worker (default 32)")
    opt.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the head / whole model (default 1e-3)")
    opt.add_argument("--weight-decay", type=float, default=1e-4)
    opt.add_argument("--schedule", choices=("cosine", "step", "none"), default="cosine", help="LR schedule after warmup")
    opt.add_argument("--warmup-epochs", type=float, default=1.0, help="linear LR warmup (default 1 epoch)")
    opt.add_argument("--step-size", type=int, default=10, help="step schedule: epochs between decays")
    opt.add_argument("--gamma", type=float, default=0.1, help="step schedule: decay factor")
    opt.add_argument("--patience", type=int, default=5, help="early stopping: epochs without improvement (0 = off)")
    opt.add_argument("--monitor", choices=("val_loss", "val_accuracy", "val_balanced_accuracy", "val_auc"),
                     default="val_loss", help="validation metric for best epoch / early stopping")
    opt.add_argument("--target-sensitivity", type=float, default=0.95,
                     help="operating threshold: highest with this sensitivity on validation data (default 0.95)")
    opt.add_argument("--precise-bn-images", type=int, default=256, metavar="N",
                     help="re-estimate BatchNorm statistics on N training images after each epoch (0 = off)")
    opt.add_argument("--seed", type=int, default=0)

    run = parser.add_argument_group("cluster and output")
    run.add_argument("--out", required=True, metavar="ARTIFACT_DIR", help="artifact directory (local or s3://)")
    run.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP), default 1")
    run.add_argument("--use-gpu", action="store_true", help="one GPU per worker (AMP + channels_last)")
    run.add_argument("--cpus-per-worker", type=float, default=None, help="default: 1 with GPUs, else CPUs / workers")
    run.add_argument("--storage-path", metavar="URI",
                     help="Ray Train checkpoints (local or s3://; shared storage on multi-node clusters); default <out>.runs")
    run.add_argument("--run-name", help="Ray Train run name (default: derived from --out and the training config)")
    run.add_argument("--max-failures", type=int, default=1, help="worker failures retried from the last checkpoint (default 1)")
    run.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0 = none)")
    run.add_argument("--s3-endpoint", metavar="URL", help="S3 endpoint (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS)")
    run.add_argument("--address", help="Ray cluster address (else RAY_ADDRESS, else a local Ray)")
    run.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    # Fault injection for resume tests: the run raises after this epoch (not after a resume).
    run.add_argument("--fail-after-epoch", type=int, default=None, help=argparse.SUPPRESS)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train / fine-tune a model on Ray Train (one run or k-fold CV), write an artifact",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)


def config_from_args(args: argparse.Namespace):
    from cxr_ray.train.config import TrainConfig

    fail = args.fail_after_epoch
    if fail is None and os.environ.get("CXR_RAY_FAIL_AFTER_EPOCH"):
        fail = int(os.environ["CXR_RAY_FAIL_AFTER_EPOCH"])
    return TrainConfig(
        data=args.data, arch=args.arch, out=args.out, mode=args.mode, init=args.init, pretrained=args.pretrained,
        label_space=args.label_space, epochs=args.epochs, image_size=args.image_size, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, backbone_lr_factor=args.backbone_lr_factor,
        finetune_blocks=args.finetune_blocks, schedule=args.schedule, warmup_epochs=args.warmup_epochs,
        step_size=args.step_size, gamma=args.gamma, patience=args.patience, monitor=args.monitor,
        precise_bn_images=args.precise_bn_images,
        class_weighting=args.class_weighting, augment=args.augment, hflip=args.hflip, folds=args.folds,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, positive_class=args.positive_class,
        target_sensitivity=args.target_sensitivity, num_workers=args.num_workers, use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker, storage_path=args.storage_path, run_name=args.run_name,
        max_failures=args.max_failures, seed=args.seed, s3_endpoint=args.s3_endpoint,
        pseudonym_key_env=args.pseudonym_key_env, n_bootstrap=args.n_bootstrap, fail_after_epoch=fail,
        quiet=args.quiet,
    )


def quiet_ray_data() -> None:
    """Ray Data progress bars would drown the per-epoch lines on stderr."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    config.validate()
    if config.use_gpu:
        import torch

        if not torch.cuda.is_available() and not args.address and not os.environ.get("RAY_ADDRESS"):
            raise UsageError("--use-gpu: no CUDA GPU is visible here; drop --use-gpu or pass --address of a GPU cluster")
    from cxr_ray.train.runner import train

    connect(args.address)
    quiet_ray_data()
    summary = train(config)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0
