"""The package's import graph: no cycle, and internal imports at the top of files.

Read from the source with ``ast`` (nothing is imported), counting imports deferred into
functions; imports under ``if TYPE_CHECKING:`` are annotations only and do not count.
Only ``cli.py`` may defer internal imports (so that ``--help`` answers without torch).
"""

from __future__ import annotations

import ast
from pathlib import Path

import fractalformer

ROOT = Path(fractalformer.__file__).parent
DEFERRING = {"fractalformer.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    return skip


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """module -> the internal modules it imports; and (module, imported, line) of deferred ones."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    deferred = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        top, skip = {id(n) for n in tree.body}, _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                names = [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                while name not in mods and "." in name:
                    name = name.rpartition(".")[0]
                # importing a.b.c runs the packages a and a.b first: they are imported too
                parts = name.split(".")
                for target in {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & mods.keys() - {mod}:
                    if mod.startswith(f"{target}."):
                        continue  # a module's own package is already being imported
                    edges[mod].add(target)
                    if id(node) not in top and mod not in DEFERRING:
                        deferred.append((mod, target, node.lineno))
    return edges, deferred


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                found.append(sorted([v, *comp]))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    edges, _ = import_graph()
    assert len(edges) > 40 and edges["fractalformer.train.trainer"]  # the graph was read
    assert cycles(edges) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_internal_imports_sit_at_the_top_of_files() -> None:
    assert import_graph()[1] == []


def test_models_import_nothing_above_them() -> None:
    edges, _ = import_graph()
    above = ("fractalformer.train", "fractalformer.generate", "fractalformer.serve", "fractalformer.analysis",
             "fractalformer.growth", "fractalformer.cli", "fractalformer.loading", "fractalformer.runs")
    for mod, deps in edges.items():
        if mod.startswith(("fractalformer.models", "fractalformer.nn")):
            assert not [d for d in deps if d.startswith(above)], mod
