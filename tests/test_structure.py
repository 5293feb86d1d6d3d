"""The package's import graph has no cycle (STYLE §10): no module imports, even lazily inside a function or under
TYPE_CHECKING, a module that imports it. Read with `ast`, so nothing is imported and every import statement counts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mistral_tutorial

PACKAGE = "mistral_tutorial"
PACKAGE_DIR = Path(mistral_tutorial.__file__).parent


def _module_name(path: Path, root: Path = PACKAGE_DIR, package: str = PACKAGE) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((package, *parts))


def _imported(path: Path, modules: set[str], root: Path = PACKAGE_DIR, package_name: str = PACKAGE) -> set[str]:
    """Every package module that `path` imports anywhere in its text: top level, in functions, under TYPE_CHECKING."""
    name = _module_name(path, root, package_name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from . import loading` imports the module loading; `from .x import y` the module x (or x.y if a module)
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:          # `mistral_tutorial.x.y` -> the module `mistral_tutorial.x`
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE_DIR, package: str = PACKAGE) -> dict[str, set[str]]:
    paths = sorted(root.rglob("*.py"))
    modules = {_module_name(p, root, package) for p in paths}
    return {_module_name(p, root, package): _imported(p, modules, root, package) for p in paths}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a closed path a -> b -> a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
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
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, set(component)) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest closed path through the first module of a strongly connected component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return sorted(component)


def test_the_cycle_finder_names_each_cycle():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert find_cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]
    assert find_cycles({"p.a": {"p.b"}, "p.b": set()}) == []


def test_the_graph_sees_lazy_type_checking_and_absolute_imports(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    (root / "__init__.py").write_text("from . import a\n")
    (root / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n")
    (root / "b.py").write_text("def f():\n    from p.a import y\n    import p.c\n")
    (root / "c.py").write_text("")
    graph = import_graph(root, "p")
    assert graph == {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p.a", "p.c"}, "p.c": set()}
    assert find_cycles(graph) == [["p.a", "p.b", "p.a"]]


def test_the_graph_covers_the_package():
    graph = import_graph()
    assert f"{PACKAGE}.config" in graph and graph[PACKAGE]  # the package's __init__ imports its modules
    assert all(target in graph for targets in graph.values() for target in targets)


def test_no_import_cycles():
    # the package's __init__ imports everything for users; its modules never import it back, so it is left out
    graph = {name: targets - {PACKAGE} for name, targets in import_graph().items()}
    back = sorted(name for name, targets in import_graph().items() if PACKAGE in targets and name != PACKAGE)
    assert not back, f"modules importing the package's __init__ (a cycle through it): {back}"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in the package:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_tiny_mixtral_is_package_data():
    """Found through the package, not the repository's layout: a plain `pip install` still runs `mistral-tutorial route`."""
    tomllib = pytest.importorskip("tomllib")
    from mistral_tutorial.resolve import TINY_MIXTRAL_DIR

    assert TINY_MIXTRAL_DIR.resolve().is_relative_to(PACKAGE_DIR.resolve())
    names = {p.name for p in TINY_MIXTRAL_DIR.iterdir()}
    assert {"consolidated.safetensors", "params.json", "vocab.json", "training_log.json"} <= names
    pyproject = tomllib.loads((PACKAGE_DIR.parent / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    assert f"{PACKAGE}.data" in setuptools["packages"]
    patterns = setuptools["package-data"][f"{PACKAGE}.data"]
    data_dir = PACKAGE_DIR / "data"
    shipped = {p.relative_to(PACKAGE_DIR).as_posix() for pattern in patterns for p in data_dir.glob(pattern)}
    assert {f"data/tiny-mixtral/{name}" for name in names} <= shipped


MAX_MODULE_LINES = 200      # STYLE §1: past ~200 lines a module is usually two ideas


def test_each_module_is_short():
    long = {p.relative_to(PACKAGE_DIR).as_posix(): n for p in sorted(PACKAGE_DIR.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by job): {long}"
