"""``cxr-ray bench SUITE ...``: throughput measurements, JSON on stdout.

Each suite is a module ``cxr_ray/bench/<name>.py`` exposing
``add_parser(subparsers)`` (which adds a sub-command called ``<name>``) and
``run(args) -> int``. Adding a suite = writing that module and adding its name
and one-line help to :data:`SUITES`.

The suite modules import torch, Ray and the surfaces at their top, so this
verb parses in two steps: here only the suite's name (``cxr-ray --help``
stays fast), then, when the verb runs, the suite's own parser on the rest.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

# Suite name == module name under cxr_ray.bench. Order is the order shown in --help.
SUITES = {
    "decode": "decode + resize throughput per format, ours vs a naive baseline",
    "backends": "images/s of torch / ONNX Runtime / TensorRT on one model, vs eager PyTorch",
    "train": "training images/s: Ray Train loop vs a plain PyTorch loop, same data and model",
    "screen": "screening job images/s vs this machine's bound and a plain PyTorch DataLoader",
    "serve": "HTTP endpoint latency / throughput, batching on vs off (Ray Serve, loopback)",
    "gpu": "the GPU path without Ray: engine img/s, GPU decode vs one core, decode -> model end to end",
}


def suite_module(name: str) -> ModuleType:
    """The suite's module, imported now (it loads torch / Ray)."""
    return importlib.import_module(f"cxr_ray.bench.{name}")


def available_suites() -> dict[str, ModuleType]:
    """Every suite's module (imports them all)."""
    return {name: suite_module(name) for name in SUITES}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    listing = "; ".join(f"{name}: {text}" for name, text in SUITES.items())
    parser = subparsers.add_parser(
        "bench",
        help="measure throughput of decode, backends, train, screen or serve (JSON)",
        description="Throughput benchmarks. Each suite prints one JSON document and names its clock. "
        f"Suites: {listing}. `cxr-ray bench SUITE --help` lists a suite's flags.",
    )
    parser.add_argument("suite", choices=tuple(SUITES), metavar="SUITE", help=", ".join(SUITES))
    parser.add_argument("suite_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def parse_suite(name: str, argv: list[str]) -> tuple[ModuleType, argparse.Namespace]:
    """The suite's module and its flags parsed from ``argv``."""
    module = suite_module(name)
    parser = argparse.ArgumentParser(prog="cxr-ray bench")
    suites = parser.add_subparsers(dest="suite", metavar="SUITE")
    module.add_parser(suites)
    if name not in suites.choices:
        raise RuntimeError(f"cxr_ray.bench.{name}.add_parser must add a sub-command named {name!r}")
    return module, parser.parse_args([name, *argv])


def run(args: argparse.Namespace) -> int:
    from cxr_ray.progress import stages

    module, suite_args = parse_suite(args.suite, list(args.suite_args))
    with stages(f"bench {args.suite}"):  # the suite's steps on stderr as they start (stage() calls)
        return int(module.run(suite_args) or 0)
