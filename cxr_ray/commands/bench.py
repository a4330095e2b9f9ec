"""``cxr-ray bench SUITE ...``: throughput measurements, JSON on stdout.

Each suite is a module ``cxr_ray/bench/<name>.py`` exposing
``add_parser(subparsers)`` (which adds a sub-command called ``<name>``) and
``run(args) -> int``. Adding a suite = writing that module and adding its name
to :data:`SUITES`. As for the top-level verbs, heavy imports belong inside
``run`` so that ``cxr-ray --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

# Suite name == module name under cxr_ray.bench. Order is the order shown in --help.
SUITES = ("decode", "backends", "train", "screen", "serve")


def available_suites() -> dict[str, ModuleType]:
    """Suite modules that exist (a listed suite whose module is not written yet is skipped)."""
    modules = {}
    for name in SUITES:
        try:
            modules[name] = importlib.import_module(f"cxr_ray.bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"cxr_ray.bench.{name}":
                raise
    return modules


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure throughput of decode, backends, train, screen or serve (JSON)",
        description="Throughput benchmarks. Each suite prints one JSON document and names its clock.",
    )
    suites = parser.add_subparsers(dest="suite", metavar="SUITE")
    suites.required = True
    for name, module in available_suites().items():
        module.add_parser(suites)
        if name not in suites.choices:
            raise RuntimeError(
                f"cxr_ray.bench.{name}.add_parser must add a sub-command named {name!r}"
            )
        suites.choices[name].set_defaults(bench_module=module)


def run(args: argparse.Namespace) -> int:
    return int(args.bench_module.run(args) or 0)
