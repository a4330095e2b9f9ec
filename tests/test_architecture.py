"""Guards on the package's shape, checked on every ``make test``:

* the one-way import flow io -> preprocess -> models -> engines -> train / screen / serve / explain
  -> commands (DESIGN.md "Data flow"), with no cycles between modules;
* Ray only where it belongs (train, screen, serve, the CLI and benchmarks);
* imports of the package's own modules at module top, except in the CLI, whose verbs import their
  surfaces when they run (``cxr-ray --help`` must not load torch or Ray);
* no module over 400 lines and no function over 60, except the few listed with their reason.

Read from the source with ``ast``: nothing is imported or run.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cxr_ray"

# Lowest first. A module may import its own layer's and lower layers' modules; the groups of one
# layer (tuples) are independent of each other: train, screen and serve never import one another.
LAYERS: list[tuple[tuple[str, ...], ...]] = [
    (("cxr_ray.errors", "cxr_ray.optional", "cxr_ray.console", "cxr_ray.progress", "cxr_ray.ray_session", "cxr_ray"),),
    (("cxr_ray.dicomnet.web",),),  # DICOMweb transport: what io reads dicomweb:// inputs with
    (("cxr_ray.io",),),
    (("cxr_ray.preprocess",),),
    (("cxr_ray.models",), ("cxr_ray.data",), ("cxr_ray.synth",), ("cxr_ray.evaluate.metrics", "cxr_ray.evaluate.plots")),
    (("cxr_ray.engines",),),
    (("cxr_ray.explain",), ("cxr_ray.inspect",)),
    (("cxr_ray.dicomnet",),),  # results as DICOM (SR, SC) and their destinations
    (("cxr_ray.evaluate.report", "cxr_ray.evaluate"),),
    (("cxr_ray.train",), ("cxr_ray.screen",), ("cxr_ray.serve",)),
    (("cxr_ray.bench",),),
    (("cxr_ray.testing",),),
    (("cxr_ray.commands", "cxr_ray.cli", "cxr_ray.__main__"),),
]
RAY_ALLOWED = ("cxr_ray.train", "cxr_ray.screen", "cxr_ray.serve", "cxr_ray.bench", "cxr_ray.commands",
               "cxr_ray.console", "cxr_ray.ray_session", "cxr_ray.testing")
# Where an import of the package's own modules may sit inside a function, and why.
LAZY_OWN_IMPORTS = {
    "cxr_ray.commands": "each verb imports its surface (torch, Ray) when it runs, so `cxr-ray --help` stays fast",
}

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Longer than the limits on purpose, with the reason.
LONG_MODULES = {
    "cxr_ray.io.storage": "one job (addressing, reading, expanding specs); its long docstring is the streaming contract",
}
LONG_FUNCTIONS = {
    "cxr_ray.screen.passes._pipeline": "the Ray Data pipeline read top to bottom, one stage after the other",
    "cxr_ray.commands.demo.run": "the demo's six stages in order, each a few lines: the product's story in one place",
    "cxr_ray.synth.phantom.render_chest": "one drawing pass, anatomy layer after layer, in painting order",
    "cxr_ray.explain.grid.heatmap_grid": "one figure built cell by cell; its parts share the figure's state",
    "cxr_ray.bench.screen.run": "assembles one benchmark report, each figure next to the ones it is compared with",
    "cxr_ray.bench.serve.bench_serve": "assembles one benchmark report, each figure next to the ones it is compared with",
    "cxr_ray.bench.train.bench_train": "checks its arguments, runs both loops and reports them side by side",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules an import statement names (``from a import b`` may name module ``a.b``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "cxr_ray"]
    if node.level:
        base = module.rsplit(".", node.level)[0]
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    if target.split(".")[0] != "cxr_ray":
        return []
    out = [target]
    out += [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    return out


def _imports(module: str) -> list[tuple[str, ast.AST, bool]]:
    """(imported module, node, inside a function) for every own-package import of ``module``."""
    found = []
    tree = TREES[module]
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _resolve(module, node):
                if target in MODULES and target != module:
                    found.append((target, node, id(node) in in_function))
    return found


def _place(module: str) -> tuple[int, int]:
    """(layer, group) of ``module``: the longest prefix wins."""
    best: tuple[int, int, int] | None = None
    for layer, groups in enumerate(LAYERS):
        for group, prefixes in enumerate(groups):
            for prefix in prefixes:
                if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[2]):
                    best = (layer, group, len(prefix))
    assert best is not None, f"{module} is in no layer of LAYERS; add it"
    return best[0], best[1]


def test_every_module_has_a_layer():
    for module in MODULES:
        _place(module)


def test_imports_flow_one_way():
    wrong = []
    for module in MODULES:
        layer, group = _place(module)
        for target, node, _ in _imports(module):
            if module.startswith(target + ".") or target == "cxr_ray":  # a package's own __init__
                continue
            t_layer, t_group = _place(target)
            if t_layer > layer or (t_layer == layer and t_group != group):
                wrong.append(f"{module}:{node.lineno} imports {target} (layer {t_layer}.{t_group} > {layer}.{group})")
    assert not wrong, "imports against the one-way flow:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = defaultdict(set)
    for module in MODULES:
        for target, _, _ in _imports(module):
            if not module.startswith(target + "."):  # a submodule importing its package's __init__ is no cycle
                graph[module].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(MODULES):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_ray_only_where_it_belongs():
    wrong = []
    for module, tree in TREES.items():
        if module.startswith(RAY_ALLOWED):
            continue
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            wrong += [f"{module}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "ray"]
    assert not wrong, "Ray outside train / screen / serve / the CLI:\n" + "\n".join(wrong)


def test_own_imports_at_module_top():
    lazy = [
        f"{module}:{node.lineno} imports {target} inside a function"
        for module in MODULES
        for target, node, inside in _imports(module)
        if inside and not module.startswith(tuple(LAZY_OWN_IMPORTS))
    ]
    assert not lazy, "move these to the module top (or say why in LAZY_OWN_IMPORTS):\n" + "\n".join(lazy)


def _functions(tree: ast.AST, prefix: str):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}.{node.name}", node
            yield from _functions(node, f"{prefix}.{node.name}")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}.{node.name}")


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function, its docstring not counted (a long why is welcome)."""
    length = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        length -= first.end_lineno - first.lineno + 1
    return length


def test_modules_and_functions_stay_small():
    too_long = []
    for module, path in MODULES.items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES and module not in LONG_MODULES:
            too_long.append(f"module {module}: {lines} lines")
        for name, node in _functions(TREES[module], module):
            length = _code_lines(node)
            if length > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS:
                too_long.append(f"function {name}: {length} lines")
    assert not too_long, (
        f"over {MAX_MODULE_LINES} lines per module / {MAX_FUNCTION_LINES} per function "
        "(split it, or give the reason in LONG_MODULES / LONG_FUNCTIONS):\n" + "\n".join(too_long)
    )


@pytest.mark.parametrize("name", sorted({**LONG_MODULES, **LONG_FUNCTIONS}))
def test_allow_lists_name_what_exists(name):
    module = name if name in MODULES else name.rsplit(".", 1)[0]
    while module not in MODULES:
        module = module.rsplit(".", 1)[0]
    assert name in MODULES or any(n == name for n, _ in _functions(TREES[module], module)), f"{name} does not exist"
