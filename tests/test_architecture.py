"""The shape of the package: layers point one way, no import circles, no hidden imports.

Read from the source (every ``import`` statement, at module level and inside
functions), not from what happens to be loaded:

- packages sit in layers (cli → bench → train → ps / checkpoint / workloads / ... →
  model / data → gpu / metrics / optim → runtime / backend / config → errors); a
  module imports only from its own layer or below;
- the module graph has no cycle;
- an ``hpcps`` import inside a function says why in a comment (a real cycle, or an
  optional dependency behind it).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hpcps"

LAYERS = [
    {"errors", "(root)"},
    {"runtime", "backend", "config"},
    {"gpu", "metrics", "optim"},
    {"model", "data"},
    {"ps", "checkpoint", "workloads", "inference", "export", "importer"},
    {"train"},
    {"bench"},
    {"cli", "__main__"},
]
LAYER_OF = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _resolve(name: str, known: dict) -> str:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def import_edges(known: dict) -> dict[str, dict[str, list]]:
    """module -> {imported module: [(line, inside a function?), ...]}."""
    edges: dict = defaultdict(lambda: defaultdict(list))
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_function = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function.update(id(n) for n in ast.walk(node) if n is not node)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
                           else node.module for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != "hpcps":
                    continue
                resolved = _resolve(target, known)
                if resolved and resolved != name:
                    edges[name][resolved].append((node.lineno, id(node) in in_function))
    return edges


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(root)"


def layer_violations(edges) -> list[str]:
    bad = []
    for src, targets in edges.items():
        for dst in targets:
            a, b = package_of(src), package_of(dst)
            if LAYER_OF[b] > LAYER_OF[a]:
                bad.append(f"{src} imports {dst}: {a} is below {b}")
    return bad


def cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))
    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def unexplained_local_imports(edges, known) -> list[str]:
    bad = []
    for src, targets in edges.items():
        lines = known[src].read_text(encoding="utf-8").splitlines()
        for dst, uses in targets.items():
            for line, local in uses:
                if not local:
                    continue
                here = lines[line - 1]
                above = lines[line - 2] if line >= 2 else ""
                if "#" not in here and not above.strip().startswith("#"):
                    bad.append(f"{src}:{line} imports {dst} inside a function without a reason")
    return bad


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return known, import_edges(known)


def test_every_package_has_a_layer(graph):
    known, _ = graph
    assert {package_of(m) for m in known} <= set(LAYER_OF)


def test_layers_point_one_way(graph):
    _, edges = graph
    assert layer_violations(edges) == []


def test_ps_is_a_library_below_train(graph):
    _, edges = graph
    assert not [(s, d) for s, t in edges.items() for d in t
                if package_of(s) == "ps" and package_of(d) in ("train", "cli", "bench")]


def test_no_import_cycles(graph):
    _, edges = graph
    assert cycles(edges) == []


def test_local_imports_say_why(graph):
    known, edges = graph
    assert unexplained_local_imports(edges, known) == []


def test_negative_controls_each_check_can_fail(graph):
    known, edges = graph
    upward = {k: dict(v) for k, v in edges.items()}
    upward.setdefault("hpcps.ps.server", {})["hpcps.train.loop"] = [(1, False)]
    assert layer_violations(upward) == ["hpcps.ps.server imports hpcps.train.loop: ps is below train"]
    circle = {"hpcps.a": {"hpcps.b": []}, "hpcps.b": {"hpcps.c": []}, "hpcps.c": {"hpcps.a": []}}
    assert cycles(circle) == [["hpcps.a", "hpcps.b", "hpcps.c"]]
    fake = {"hpcps.ps.server": {"hpcps.ps.control": [(1, True)]}}
    assert unexplained_local_imports(fake, {"hpcps.ps.server": known["hpcps.ps.server"]}) != []
