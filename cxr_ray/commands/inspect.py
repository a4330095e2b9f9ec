"""``cxr-ray inspect PATH_OR_URI...``: decode metadata or the error, one JSON line per file."""

from __future__ import annotations

import argparse
import json
import sys

from cxr_ray.commands.options import add_shared
from cxr_ray.io.pseudonym import key_from_env


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
        help="file, directory, glob, s3:// URI, manifest, or dicomweb://HOST[:PORT]/PATH?QUERY (QIDO-RS study search)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="JSON lines output; this is the only format, the flag is accepted for uniform scripts",
    )
    add_shared(parser, "pseudonym_key_env", pseudonym_key_env="environment variable holding the HMAC key for "
               "patient/study/instance pseudonyms (without it the pseudonym fields are null)")
    add_shared(parser, "s3_endpoint", "dicomweb_user_env", "dicomweb_password_env", "dicomweb_token_env")


def run(args: argparse.Namespace) -> int:
    from cxr_ray.dicomnet.web import auth_from_env
    from cxr_ray.inspect import inspect_inputs

    key = key_from_env(args.pseudonym_key_env)
    auth = auth_from_env(args.dicomweb_user_env, args.dicomweb_password_env, args.dicomweb_token_env)
    out = sys.stdout
    for record in inspect_inputs(args.inputs, pseudonym_key=key, s3_endpoint=args.s3_endpoint, dicomweb_auth=auth):
        out.write(json.dumps(record) + "\n")
        out.flush()
    return 0
