"""The static import graph of ``src/diffcurate``: no cycles between modules, and the layering
rules the design states (``influence/`` is pure torch + numpy).

Every ``import`` and ``from ... import`` counts, wherever it appears (module level, inside a
function, under ``TYPE_CHECKING``): a deferred import still couples two modules, and a cycle
hidden inside a function breaks as soon as someone hoists the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"
PACKAGE = "diffcurate"
INFLUENCE_FORBIDDEN = (
    "diffcurate.storage", "diffcurate.flows", "diffcurate.tasks", "diffcurate.cli",
    "diffcurate.dashboards", "prefect", "lancedb", "duckdb", "great_expectations",
)  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def imported_names(path: Path, name: str) -> set[str]:
    """Every absolute module name ``path`` imports (relative imports resolved)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from pkg import mod` imports the submodule pkg.mod.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    """Edges between diffcurate modules (a package's ``__init__`` is the package's name)."""
    mods = modules()
    return {
        name: {dep for dep in imported_names(path, name) if dep in mods and dep != name}
        for name, path in mods.items()
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for root in sorted(edges):
        if state.get(root):
            continue
        stack: list[tuple[str, list[str]]] = [(root, sorted(edges[root]))]
        path = [root]
        state[root] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop(0)
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(edges[nxt])))
    return None


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    edges = graph()
    assert "diffcurate.cli.common" in edges["diffcurate.cli.release"]
    assert "diffcurate.storage.releases" in edges["diffcurate.storage.reviews"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_between_modules():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_influence_imports_no_orchestration_storage_or_ui():
    bad = []
    for name, path in modules().items():
        if not name.startswith(f"{PACKAGE}.influence"):
            continue
        for dep in imported_names(path, name):
            if any(dep == f or dep.startswith(f + ".") for f in INFLUENCE_FORBIDDEN):
                bad.append(f"{name} imports {dep}")
    assert not bad, "\n".join(bad)
