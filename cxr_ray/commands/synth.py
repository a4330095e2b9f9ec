"""``cxr-ray synth OUT_DIR``: write a phantom chest X-ray archive with labels and lesion masks."""

from __future__ import annotations

import argparse
import json
import os
import time

from cxr_ray.commands.options import add_shared


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write a phantom chest X-ray archive (DICOM/PNG/JPEG, labels.csv, lesion masks)",
        description=(
            "Draw procedural chest radiographs with one learnable lesion pattern per class "
            "(covid: bilateral peripheral ground-glass; pneumonia: one lobar consolidation; "
            "normal: clear; other names: other distinct patterns), 2-4 images per patient, "
            "a lesion mask per image, and optionally broken files (truncated, random bytes, "
            "empty, text, lateral view, CT). Writes OUT_DIR/labels.csv (a manifest for the "
            "other verbs) and prints a JSON summary. Same seed, same bytes."
        ),
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output directory (local path or s3:// URI)")
    parser.add_argument("--n", type=int, default=300, help="number of files, corrupt ones included (default 300)")
    parser.add_argument(
        "--formats", default="dcm,png,jpg", help="comma-separated subset of dcm,png,jpg (default all three)"
    )
    parser.add_argument(
        "--classes",
        default="covid,pneumonia,normal",
        help="comma-separated class names (default covid,pneumonia,normal); any names work",
    )
    parser.add_argument(
        "--corrupt-fraction",
        type=float,
        default=0.0,
        help="fraction of the N files that are broken on purpose (default 0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=256, help="image height in pixels (default 256)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous synth output in OUT_DIR (other files there are never touched)",
    )
    add_shared(parser, "s3_endpoint")


def run(args: argparse.Namespace) -> int:
    from cxr_ray.synth import generate_archive, summarize

    start = time.perf_counter()
    labels = generate_archive(
        args.out_dir,
        n=args.n,
        formats=args.formats,
        classes=args.classes,
        corrupt_fraction=args.corrupt_fraction,
        seed=args.seed,
        size=args.size,
        overwrite=args.overwrite,
        s3_endpoint=args.s3_endpoint,
    )
    out_dir = args.out_dir if "://" in args.out_dir else os.path.abspath(args.out_dir)
    print(json.dumps(summarize(labels, out_dir, time.perf_counter() - start)))
    return 0
