"""The modules of ``maskkv.bench`` import each other in one direction only: no cycle, not even
through an import deferred into a function body (a deferred import hides a cycle, it does not
remove it)."""

import ast
from pathlib import Path

import maskkv.bench

BENCH = Path(maskkv.bench.__file__).parent


def _sibling_imports(path: Path) -> set[str]:
    """Modules of the same package that ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:  # from .runner import x
                found.add(node.module.split(".")[0])
            else:  # from . import runner
                found.update(alias.name for alias in node.names)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_cycle_finder_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_bench_modules_import_in_one_direction():
    # __init__ re-exports every module and is left out; a module importing the package itself
    # (``from .. import bench``) would close a cycle through it, checked below.
    graph = {p.stem: _sibling_imports(p) for p in BENCH.glob("*.py") if p.stem != "__init__"}
    assert {"runner", "report", "result"} <= set(graph)
    assert _cycle(graph) is None, f"import cycle in maskkv.bench: {' -> '.join(_cycle(graph))}"
    assert "runner" not in graph["report"] and "report" not in graph["runner"]
    for path in BENCH.glob("*.py"):
        tree = ast.parse(path.read_text())
        bench_itself = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom)
            and n.level == 2
            and "bench" in [a.name for a in n.names]
        ]
        assert not bench_itself, f"{path.name} imports the maskkv.bench package it belongs to"
