"""``cxr-ray screen``: screen an archive into Parquet, one row per input (Ray Data).

The summary (also written to ``OUTPUT/_summary.json``) is printed as JSON on
stdout; progress lines and Ray's own output go to stderr. Exit status 0 when
every input has a row (``_SUCCESS`` written), 1 otherwise, 2 for bad usage.
Re-running the same command resumes: inputs already written are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from cxr_ray.engines.registry import BACKEND_NAMES as BACKENDS
from cxr_ray.engines.registry import PRECISION_NAMES
from cxr_ray.errors import UsageError


def _actors(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--actors takes MIN,MAX or N (integers), got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise argparse.ArgumentTypeError(f"--actors takes MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return parts[0], parts[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The screening flags (shared with ``jobs/screen.py``)."""
    parser.add_argument("--model", required=True, help="model artifact directory (local or s3://)")
    parser.add_argument(
        "--input",
        required=True,
        action="append",
        dest="inputs",
        metavar="URI_GLOB_OR_MANIFEST",
        help="file, directory, s3:// prefix, glob, or .csv/.parquet manifest with a 'path' column (repeatable)",
    )
    parser.add_argument("--output", required=True, help="output prefix (local directory or s3://): parts/, _summary.json, _SUCCESS")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="inference engine (default: auto)")
    parser.add_argument("--precision", choices=PRECISION_NAMES, default="auto", help="auto: fp16 on GPUs (TensorRT / torch), fp32 on CPUs; bf16: opt-in on CPUs with AVX512-BF16 / AMX (torch backend, about 1.5x the fp32 ONNX Runtime speed for DenseNet-121, checked against fp32 at load)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per predict call (default: 32)")
    parser.add_argument("--actors", type=_actors, default=None, metavar="MIN,MAX", help="predict actor pool size (default: 1,<GPUs> on GPU clusters; N,N with N = CPUs on CPU-only ones)")
    parser.add_argument("--gpus-per-actor", type=float, default=None, metavar="F", help="GPUs per predict actor (default: 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--cpus-per-actor", type=float, default=None, metavar="F", help="logical CPUs (and backend threads) per predict actor (default: 1 on GPU, 0.5 and 1 thread on CPU-only clusters)")
    parser.add_argument("--decode-cpus", type=float, default=None, metavar="F", help="logical CPUs per decode task (default: 1 on GPU clusters; on CPU-only ones the predict actors decode their own batches unless this is given)")
    parser.add_argument("--decode-batch-size", type=int, default=16, metavar="N", help="files per decode task (default: 16)")
    parser.add_argument("--rows-per-part", type=int, default=1000, metavar="N", help="rows per Parquet part: the resume granularity (default: 1000)")
    parser.add_argument("--max-file-mb", type=float, default=512, metavar="MB", help="files larger than this get error 'too_large' (default: 512)")
    parser.add_argument("--max-retries", type=int, default=3, metavar="N", help="retries of a batch whose worker died before its files get 'worker_crashed' rows (default: 3)")
    parser.add_argument("--pseudonym-key-env", metavar="VAR", help="environment variable holding the HMAC key for patient/study/instance pseudonyms")
    parser.add_argument("--s3-endpoint", metavar="URL", help="S3 endpoint (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS)")
    parser.add_argument("--address", help="Ray cluster address (else RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--progress-every", type=float, default=15.0, metavar="S", help="seconds between progress lines on stderr (0: off)")
    parser.add_argument("--heatmaps", choices=("none", "flagged"), default="none", help="flagged: write a heatmap overlay PNG (+ raw .npy) per flagged row under OUTPUT/_heatmaps/, its path in the row's heatmap_path column (default: none)")
    parser.add_argument("--heatmap-method", choices=("gradcam", "lrp"), default="gradcam", help="explanation for --heatmaps: gradcam (every architecture) or lrp (vgg19, densenet*, resnet18, resnet50) (default: gradcam)")


def config_from_args(args: argparse.Namespace):
    from cxr_ray.screen.job import ScreenConfig

    if args.max_file_mb <= 0:
        raise UsageError(f"--max-file-mb must be > 0, got {args.max_file_mb}")
    return ScreenConfig(
        model=args.model,
        inputs=list(args.inputs),
        output=args.output,
        backend=args.backend,
        precision=args.precision,
        batch_size=args.batch_size,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        decode_cpus=args.decode_cpus,
        decode_batch_size=args.decode_batch_size,
        rows_per_part=args.rows_per_part,
        max_file_bytes=int(args.max_file_mb * 1024 * 1024),
        pseudonym_key_env=args.pseudonym_key_env,
        s3_endpoint=args.s3_endpoint,
        address=args.address,
        progress_every_s=args.progress_every,
        max_task_retries=args.max_retries,
        heatmaps=args.heatmaps,
        heatmap_method=args.heatmap_method,
    )


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "screen",
        help="screen an archive with a model into Parquet (Ray Data), resumable",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to fd 1 (Ray's worker logs, native libraries) to stderr
    for the duration, so that stdout carries nothing but the summary JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run(args: argparse.Namespace) -> int:
    from cxr_ray.screen.job import run_screen

    config = config_from_args(args)
    with stdout_to_stderr():
        summary = run_screen(config)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0 if summary["complete"] else 1
