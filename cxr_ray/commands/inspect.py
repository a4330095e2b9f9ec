"""``cxr-ray inspect PATH_OR_URI...``: decode metadata or the error, one JSON line per file."""

from __future__ import annotations

import argparse
import json
import os
import sys

from cxr_ray.errors import UsageError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="decode each input and print its metadata or error code (one JSON line per file)",
        description=(
            "Decode every input (files, directories recursively, globs, s3:// prefixes, "
            ".csv/.parquet manifests) and print one JSON object per file: path, status "
            "(ok|error), error_code, error and the image metadata. Bad inputs are reported, "
            "not fatal: the exit status is 0 unless the command line itself is wrong (2)."
        ),
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="PATH_OR_URI",
        help="file, directory, glob, s3:// URI or manifest",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="JSON lines output; this is the only format, the flag is accepted for uniform scripts",
    )
    parser.add_argument(
        "--pseudonym-key-env",
        metavar="VAR",
        help="environment variable holding the HMAC key for patient/study/instance pseudonyms "
        "(without it the pseudonym fields are null)",
    )
    parser.add_argument(
        "--s3-endpoint",
        metavar="URL",
        default=None,
        help="S3 endpoint URL (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS)",
    )


def pseudonym_key_from_env(variable: str | None) -> bytes | None:
    """The key named by ``--pseudonym-key-env`` (never taken from the command line itself)."""
    if not variable:
        return None
    value = os.environ.get(variable)
    if not value:
        raise UsageError(
            f"--pseudonym-key-env {variable}: that environment variable is not set or is empty"
        )
    return value.encode("utf-8")


def run(args: argparse.Namespace) -> int:
    from cxr_ray.inspect import inspect_inputs

    key = pseudonym_key_from_env(args.pseudonym_key_env)
    out = sys.stdout
    for record in inspect_inputs(args.inputs, pseudonym_key=key, s3_endpoint=args.s3_endpoint):
        out.write(json.dumps(record) + "\n")
        out.flush()
    return 0
