"""The layer rule, read from the code's imports with ``ast`` (docs/ARCHITECTURE.md).

Layers, top first: ``vlsae/cli/``, ``evals/``, ``steering/``, ``multimodal/``,
then the rest of ``vlsae/``. Imports point down only; nothing but
``vlsae/__main__.py`` imports the CLI; no two modules import each other, not
even through a function-local import (those are kept for deferring heavy
third-party libraries only).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vlsae", "multimodal", "steering", "evals")
LAYER = {"vlsae.cli": 4, "evals": 3, "steering": 2, "multimodal": 1, "vlsae": 0}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> tuple[str, int]:
    if module == "vlsae.__main__":
        return "vlsae.cli", LAYER["vlsae.cli"]  # `python -m vlsae` is the CLI's entry
    for prefix, rank in LAYER.items():
        if module == prefix or module.startswith(prefix + "."):
            return prefix, rank
    raise KeyError(module)


def project_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, child.lineno, in_function))
                found.extend((f"{child.module}.{alias.name}", child.lineno, in_function) for alias in child.names
                             if _is_module(f"{child.module}.{alias.name}"))
            visit(child, nested)

    visit(tree, False)
    return [(name, line, local) for name, line, local in found if name.split(".")[0] in PACKAGES]


def _is_module(name: str) -> bool:
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


FILES = sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))
IMPORTS = {module_name(p): project_imports(p) for p in FILES}


def test_the_packages_are_read():
    assert "vlsae.training.trainer" in IMPORTS and "multimodal.extract" in IMPORTS and "evals.tasks" in IMPORTS


@pytest.mark.parametrize("module", sorted(IMPORTS))
def test_imports_point_down(module):
    here, rank = layer_of(module)
    for imported, line, _ in IMPORTS[module]:
        there, other = layer_of(imported)
        if there == "vlsae.cli":
            assert module.startswith("vlsae.cli") or module == "vlsae.__main__", \
                f"{module}:{line} imports the CLI ({imported}); only vlsae/__main__.py may"
            continue
        assert other <= rank, f"{module}:{line} imports {imported}, a layer above {here} (the layer rule)"


def _resolve(name: str) -> str | None:
    """The project module an imported name refers to (a module, or the module defining a name)."""
    while name and name not in IMPORTS:
        name = name.rpartition(".")[0]
    return name or None


def module_graph(imports: dict[str, list[tuple[str, int, bool]]]) -> dict[str, set[str]]:
    """module -> the project modules it imports (a package's edges into its own submodules, which is
    how a package re-exports, and a submodule's edge to its package are left out)."""
    graph: dict[str, set[str]] = {m: set() for m in imports}
    for module, found in imports.items():
        for imported, _, _ in found:
            target = _resolve(imported)
            if target and target != module and not module.startswith(target + ".") and not target.startswith(module + "."):
                graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_between_modules():
    cycle = find_cycle(module_graph(IMPORTS))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_package_level_cycles():
    edges = set()
    for module, imports in IMPORTS.items():
        for imported, _, _ in imports:
            a, b = layer_of(module)[0], layer_of(imported)[0]
            if a != b:
                edges.add((a, b))
    for a, b in edges:
        assert (b, a) not in edges, f"{a} and {b} import each other"


@pytest.mark.parametrize("module", sorted(IMPORTS))
def test_project_imports_are_at_module_level(module):
    local = [f"{name} (line {line})" for name, line, in_function in IMPORTS[module] if in_function]
    assert not local, f"{module} imports project modules inside functions: {', '.join(local)}; import them at the top"
