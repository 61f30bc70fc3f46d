"""The static import graph of ``src/diffcurate``: no cycles between modules, and the layering
rules the design states (``influence/`` is pure torch + numpy; no module imports upward).

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


# Layers, top to bottom. A module may import its own package, anything in a lower layer, and
# within the domain layer only the peers PEERS allows.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"cli", "dashboards"}),
    # attribution and deployments compose flows (attribution runs the score flow's identity
    # checks and its tasks; deployments schedule the hygiene flow), so they sit with them.
    frozenset({"flows", "attribution", "deployments"}),
    frozenset({"tasks"}),
    # demo writes synthetic corpora and imports nothing of diffcurate.
    frozenset(
        {"curation", "storage", "models", "mitigation", "influence", "metrics", "ingest", "demo"}
    ),
    # The bottom layer: settings, the workspace layout, keyed RNG, content digests.
    frozenset({"", "config", "workspace", "keyed", "digests"}),
)
PEERS: dict[str, tuple[str, ...]] = {
    # `diffcurate serve` starts the dashboard app.
    "cli": ("dashboards",),
    "attribution": ("flows",),
    "deployments": ("flows",),
    # Curation decides on measured data: it reads metrics, generates with models, records in
    # storage.
    "curation": ("metrics", "models", "storage"),
    # Mitigation trains the models it is given and locates risk with the influence scorers.
    "mitigation": ("models", "influence"),
    # Ingestion embeds with CLIP (models) and writes the sample tables (storage).
    "ingest": ("models", "storage"),
    # Training minimises the diffusion objective the scorers differentiate: one definition of
    # the loss, its (t, ε) draws and its device helpers.
    "models": ("influence.objective",),
    # Settings name the workspace; the layout says where things live in it.
    "config": ("workspace",),
}
EXCEPTIONS: dict[tuple[str, str], str] = {}
"""``(importer, imported) -> reason`` for an arrow the rules above forbid. Empty: keep it so."""


def group(module: str) -> str:
    """The top-level part of ``diffcurate.<group>...`` ('' for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer(module: str) -> int:
    found = [i for i, names in enumerate(LAYERS) if group(module) in names]
    assert found, f"{module} is in no layer: add its package to LAYERS"
    return found[0]


def allowed(importer: str, imported: str) -> bool:
    a, b = group(importer), group(imported)
    if a == b or layer(imported) > layer(importer):
        return True
    if layer(imported) < layer(importer):
        return False
    rest = imported.removeprefix(f"{PACKAGE}.")
    return any(rest == p or rest.startswith(p + ".") for p in PEERS.get(a, ()))


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


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)


def test_no_module_imports_upward_or_sideways_outside_the_rules():
    bad = [
        f"{a} imports {b}"
        for a, deps in graph().items()
        for b in sorted(deps)
        if not allowed(a, b) and (a, b) not in EXCEPTIONS
    ]
    assert not bad, "\n".join(bad)


def test_the_layer_rule_rejects_the_arrows_it_exists_for():
    assert not allowed("diffcurate.models.images", "diffcurate.storage.lance_store")
    assert not allowed("diffcurate.storage.validation", "diffcurate.ingest.dedup")
    assert not allowed("diffcurate.models.sample", "diffcurate.influence.trace")
    assert not allowed("diffcurate.tasks.score", "diffcurate.flows.score")
    assert not allowed("diffcurate.config", "diffcurate.storage.ledger")
    assert allowed("diffcurate.ingest.shard", "diffcurate.storage.schemas")
    assert allowed("diffcurate.flows.score", "diffcurate.storage.ledger")
    assert allowed("diffcurate.models.sample", "diffcurate.keyed")


def test_exceptions_are_still_needed():
    edges = graph()
    stale = [f"{a} -> {b}" for a, b in EXCEPTIONS if b not in edges.get(a, set())]
    assert not stale, "remove stale exceptions: " + ", ".join(stale)


def private_names(tree: ast.Module) -> set[str]:
    """Underscore names a module defines at top level or in its classes."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found.update(t.id for t in targets if isinstance(t, ast.Name))
            found.update(t.attr for t in targets if isinstance(t, ast.Attribute))
    return {n for n in found if n.startswith("_") and not n.endswith("__")}


def test_no_module_uses_another_modules_private_names():
    """A helper another module needs is public: private names stay free to change."""
    trees = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in modules().items()}
    own = {name: private_names(tree) for name, tree in trees.items()}
    elsewhere = set().union(*own.values())
    bad = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                bad += [f"{name} imports {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and a.name != "__version__"]  # fmt: skip
            elif (
                isinstance(node, ast.Attribute)
                and node.attr in elsewhere - own[name]
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                bad.append(f"{name}:{node.lineno} uses {ast.unparse(node)}")
    assert not bad, "\n".join(bad)
