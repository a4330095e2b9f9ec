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
from collections.abc import Iterator

from cxr_ray.commands.options import add_config_flags, config_values
from cxr_ray.screen.config import ScreenConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The screening flags (shared with ``jobs/screen.py``), from :class:`ScreenConfig`'s fields."""
    add_config_flags(parser, ScreenConfig)


def config_from_args(args: argparse.Namespace) -> ScreenConfig:
    return ScreenConfig(**config_values(args, ScreenConfig))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "screen",
        help="screen an archive with a model into Parquet (Ray Data), resumable",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
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
    from cxr_ray.screen.job import run_screen  # the surface (Ray, torch): loaded when the verb runs

    config = config_from_args(args)
    with stdout_to_stderr():
        summary = run_screen(config)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0 if summary["complete"] else 1
