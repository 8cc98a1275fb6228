"""The package's shape: layers (no library module imports the CLI), no import cycles, short modules.

The import graph is read from the source with `ast` (relative imports resolved), so the checks see
every import, including those inside functions, without importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hf_gradfilter"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (``from . import x`` counts as module ``x`` when it is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_resolves_relative_imports_and_finds_a_cycle(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    graph = import_graph()
    assert "hf_gradfilter.proxy.record" in graph["hf_gradfilter.proxy.trainer"]  # from .record import ...
    assert "hf_gradfilter.data.formatting" in graph["hf_gradfilter.proxy.config"]  # from ..data.formatting
    assert "hf_gradfilter.publish.hub" in graph["hf_gradfilter"]  # from .publish import hub


def test_no_import_cycle_among_the_package_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_library_module_imports_the_cli():
    importers = sorted(name for name, deps in import_graph().items() if "hf_gradfilter.cli" in deps)
    assert importers == [], f"the CLI is the top floor; these import it: {importers}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_500_lines(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES}): split it by concern"


def test_old_flat_module_paths_import_the_moved_modules():
    import importlib

    from hf_gradfilter._moved import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(f"hf_gradfilter.{old}") is importlib.import_module(f"hf_gradfilter.{new}")


def test_importing_an_old_path_leaves_the_moved_module_its_own_spec():
    import subprocess
    import sys

    code = ("import importlib, hf_gradfilter.hub as old, hf_gradfilter.publish.hub as new\n"
            "assert old is new and new.__spec__.name == 'hf_gradfilter.publish.hub', new.__spec__\n"
            "assert new.__spec__.parent == new.__package__ == 'hf_gradfilter.publish'\n"
            "assert importlib.reload(new) is new and new.__spec__.name == 'hf_gradfilter.publish.hub'\n")
    subprocess.run([sys.executable, "-W", "error::ImportWarning", "-c", code], check=True)
