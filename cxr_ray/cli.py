"""``cxr-ray`` command line: one sub-command module per verb.

Each module in ``cxr_ray.commands`` exposes ``add_parser(subparsers)`` and
``run(args) -> int``. Modules import their heavy dependencies (torch, ray)
inside ``run`` so that ``cxr-ray --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from types import ModuleType

from cxr_ray.errors import CxrRayError, UsageError

# Verb -> module under cxr_ray.commands. Order is the order shown in --help.
VERBS = {
    "demo": "demo",
    "synth": "synth",
    "inspect": "inspect",
    "train": "train",
    "evaluate": "evaluate",
    "export": "export",
    "screen": "screen",
    "serve": "serve",
    "listen": "listen",
    "explain": "explain",
    "bench": "bench",
}


def _available_commands() -> dict[str, ModuleType]:
    modules = {}
    for verb, module_name in VERBS.items():
        try:
            modules[verb] = importlib.import_module(f"cxr_ray.commands.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"cxr_ray.commands.{module_name}":
                raise
    return modules


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    parser = argparse.ArgumentParser(
        prog="cxr-ray",
        description="Distributed chest X-ray screening on Ray. Machine-readable output is JSON.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    commands = _available_commands()
    for module in commands.values():
        module.add_parser(sub)
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(commands[args.verb].run(args) or 0)
    except UsageError as exc:
        print(json.dumps({"error": "usage", "message": str(exc)}), file=sys.stderr)
        return 2
    except CxrRayError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
