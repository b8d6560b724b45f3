"""The package's layers: lower layers never import higher ones, and no module-level import cycle.

Read from the sources (``ast``), so that an import hidden inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "geovlm"

# What each lower layer may import from geovlm (besides itself).
ALLOWED = {
    "geovlm.kernels": set(),
    "geovlm.rewards": {"geovlm.data", "geovlm.tasks", "geovlm.atomic"},
    "geovlm.data": {"geovlm.rewards", "geovlm.tasks", "geovlm.config", "geovlm.runtime"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """geovlm modules the file at ``path`` imports (see ``imports_of``)."""
    is_package = path.name == "__init__.py"
    return imports_of(path.read_text(), module_name(path), is_package, top_level_only)


def imports_of(source: str, here: str, is_package: bool, top_level_only: bool) -> set[str]:
    """geovlm modules ``source`` (the module ``here``) imports: ``from geovlm.x import y`` counts
    ``geovlm.x`` and, when ``y`` is a submodule, ``geovlm.x.y``; relative imports are resolved;
    with ``top_level_only`` imports inside functions are left out."""
    tree = ast.parse(source)
    package = here if is_package else here.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:
                parts = f"{target}.{alias.name}".split(".")
                if (PACKAGE.parent / Path(*parts)).with_suffix(".py").exists() or (
                    PACKAGE.parent / Path(*parts) / "__init__.py"
                ).exists():
                    found.add(".".join(parts))
    return {name for name in found if name == "geovlm" or name.startswith("geovlm.")}


def violations(layer: str, imported: dict[str, set[str]]) -> list[str]:
    """``"<module> imports <target>"`` for every import of ``layer`` outside ``ALLOWED``."""
    bad = []
    for name, targets in imported.items():
        if layer_of(name) != layer:
            continue
        for target in sorted(targets):
            if layer_of(target) == layer:
                continue
            if any(target == a or target.startswith(a + ".") for a in ALLOWED[layer]):
                continue
            bad.append(f"{name} imports {target}")
    return bad


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(name: str) -> str | None:
    return next((layer for layer in ALLOWED if name == layer or name.startswith(layer + ".")), None)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_lower_layers_import_nothing_above_them(layer):
    imported = {name: imports(path, top_level_only=False) for name, path in modules().items()}
    bad = violations(layer, imported)
    assert not bad, "\n".join(bad)


def test_no_module_level_import_cycle():
    graph = {name: imports(path, top_level_only=True) for name, path in modules().items()}
    graph = {
        name: {t for t in targets if t in graph and t != name} for name, targets in graph.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # A package imports its own submodules to re-export them; that is not a cycle.
            if node.startswith(nxt + ".") or nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if state.get(nxt) is None:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name)
            assert cycle is None, " -> ".join(cycle)


def test_the_checker_sees_a_violation_inside_a_function():
    source = "def f():\n    from geovlm.model import unwrap\n    from ..data import schema\n"
    found = imports_of(source, "geovlm.kernels.probe", False, top_level_only=False)
    assert found == {"geovlm.model", "geovlm.data", "geovlm.data.schema"}
    assert imports_of(source, "geovlm.kernels.probe", False, top_level_only=True) == set()
    assert violations("geovlm.kernels", {"geovlm.kernels.probe": found}) == [
        "geovlm.kernels.probe imports geovlm.data",
        "geovlm.kernels.probe imports geovlm.data.schema",
        "geovlm.kernels.probe imports geovlm.model",
    ]
