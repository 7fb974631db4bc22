"""The house rules of docs/architecture.md, held against the imports of every module.

Every ``import`` and ``from ... import`` in gateway/ and mllp/ is read with
:mod:`ast`, at any depth (an import inside a function is still a dependency),
and checked against the layer rules; the package graph printed in
docs/architecture.md must be the one the code has.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The pipeline's stages: plain functions of data, no I/O (ARCHITECTURE.md).
STAGES = ("gateway.conversion", "gateway.matching", "gateway.delivery.routing", "gateway.pipeline.process")
#: What a stage may not import: the store, I/O, the application layer, the reactor.
NOT_FOR_STAGES = (
    "gateway.store",
    "gateway.intake.receiver",
    "gateway.delivery.worker",
    "gateway.pipeline.workers",
    "gateway.app",
    "twisted",
    "sqlite3",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names), wherever the import statement is."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # "from gateway.store import messages" imports the module gateway.store.messages too.
            found.update(f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}"))
    return found


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


MODULES = {module_name(p): imports_of(p) for folder in ("gateway", "mllp") for p in (ROOT / folder).rglob("*.py")}


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in ([prefixes] if isinstance(prefixes, str) else prefixes))


def node(name: str) -> str:
    """A module's place in the package graph: its package under gateway (or gateway's own module), or mllp."""
    parts = name.split(".")
    if parts[0] == "mllp":
        return "mllp"
    if len(parts) == 1:
        return "gateway"
    return ".".join(parts[:2])


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, imported in MODULES.items():
        for target in imported:
            if within(target, ("gateway", "mllp")) and node(target) != node(module):
                graph.setdefault(node(module), set()).add(node(target))
        graph.setdefault(node(module), set())
    return graph


def render_graph() -> str:
    """The package graph as docs/architecture.md shows it: one line per package, what it imports."""
    graph = package_graph()
    return "\n".join(f"{p} -> {', '.join(sorted(graph[p])) or '(nothing of Herald)'}" for p in sorted(graph))


def test_mllp_imports_nothing_from_gateway():
    """mllp/ is framing and bytes only: it knows nothing of Herald's gateway."""
    offenders = {m: sorted(i for i in imps if within(i, "gateway")) for m, imps in MODULES.items() if within(m, "mllp")}
    assert not {m: i for m, i in offenders.items() if i}


@pytest.mark.parametrize("stage", STAGES)
def test_stages_import_no_store_and_no_io(stage):
    """A pipeline stage imports no store, no I/O module, no application layer and no reactor."""
    found = {m: sorted(i for i in imps if within(i, NOT_FOR_STAGES)) for m, imps in MODULES.items() if within(m, stage)}
    assert found and not {m: i for m, i in found.items() if i}


def test_the_store_imports_no_stage():
    """The store imports only itself, the records and the errors: it takes and returns value objects."""
    allowed = ("gateway.store", "gateway.records", "gateway.errors")
    found = {
        m: sorted(i for i in imps if within(i, "gateway") and not within(i, allowed))
        for m, imps in MODULES.items()
        if within(m, "gateway.store")
    }
    assert found and not {m: i for m, i in found.items() if i}


def test_only_the_store_speaks_sqlite():
    """No module outside gateway.store imports sqlite3: every SQL statement, and every SQLite error, stays there."""
    found = {m: "sqlite3" for m, imps in MODULES.items() if "sqlite3" in imps and not within(m, "gateway.store")}
    assert not found


def test_records_import_nothing_of_herald():
    """gateway.records is importable by anything because it imports nothing of Herald."""
    assert not [i for i in MODULES["gateway.records"] if within(i, ("gateway", "mllp"))]


def test_the_package_graph_has_no_cycle():
    """No package imports, directly or through others, a package that imports it."""
    graph = package_graph()
    state: dict[str, int] = {}

    def visit(p: str, path: list[str]) -> None:
        state[p] = 1
        for q in sorted(graph.get(p, ())):
            assert state.get(q) != 1, " -> ".join([*path, p, q])
            if q not in state:
                visit(q, [*path, p])
        state[p] = 2

    for p in sorted(graph):
        if p not in state:
            visit(p, [])


def test_the_graph_in_docs_is_the_code_s():
    """docs/architecture.md shows the package graph the imports actually make."""
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert render_graph() in doc, "regenerate it: python tests/test_layers.py\n" + render_graph()


def test_every_gateway_package_is_listed_for_packaging():
    """setup.cfg lists every package under gateway/ (a package left out would be missing from a wheel)."""
    cfg = (ROOT / "setup.cfg").read_text(encoding="utf-8")
    packages = {module_name(p.parent) for p in (ROOT / "gateway").rglob("__init__.py")}
    missing = sorted(p for p in packages if f"\n    {p}\n" not in cfg)
    assert not missing


if __name__ == "__main__":
    print(render_graph())
