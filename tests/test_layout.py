"""The package's shape: rooms in layers (no import runs up the order), no import cycles, short modules.

The import graph is read from the source with `ast` (relative imports resolved), so the checks see
every import, including those inside functions, without importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hf_gradfilter"
MAX_LINES = 500

# The layer order (README: Layout). A room may import only rooms on lower floors: `data` reads rows, `proxy`
# trains the LoRA ensemble and records norms, `scores` makes columns (G-SNR, baselines, the literature's scores,
# target alignment, clusters, near-duplicate flags: all that needs the proxy), `selection` only picks rows from
# columns, `finetuning` trains and judges the target, `publish` talks to the Hub, `run` orders the stages and
# writes the report, `cli` parses flags. The package root re-exports the public API (the floor of `run`).
LAYERS = {"data": 0, "dist": 0, "lora": 0, "plots": 0, "proxy": 1, "demo": 1, "scores": 2, "selection": 3,
          "finetuning": 4, "publish": 4, "run": 5, "": 5, "cli": 6}


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


def room(module: str) -> str:
    """``hf_gradfilter.scores.formulas`` -> ``scores``; the package root -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int] = LAYERS) -> list[str]:
    """Every import whose target's room is not on a lower floor than the importer's (another room of the same
    floor counts too), as ``"a -> b"``; a room missing from ``layers`` is reported, not guessed."""
    bad = []
    for name, deps in sorted(graph.items()):
        for dep in sorted(deps):
            a, b = room(name), room(dep)
            if a == b:
                continue
            if a not in layers or b not in layers:
                bad.append(f"{name} -> {dep} (room {(a if a not in layers else b)!r} has no floor in LAYERS)")
            elif layers[b] >= layers[a]:
                bad.append(f"{name} -> {dep} ({a or 'the package root'} is floor {layers[a]}, "
                           f"{b or 'the package root'} floor {layers[b]})")
    return bad


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


def test_the_layer_check_catches_an_upward_import_a_same_floor_one_and_an_unknown_room():
    graph = {"hf_gradfilter.scores.formulas": {"hf_gradfilter.selection.top", "hf_gradfilter.data.io"},
             "hf_gradfilter.publish.hub": {"hf_gradfilter.finetuning.sft"},
             "hf_gradfilter.extra.thing": {"hf_gradfilter.data.io"},
             "hf_gradfilter.data.io": set(), "hf_gradfilter.selection.top": {"hf_gradfilter.scores.formulas"}}
    bad = upward_imports(graph)
    assert bad[0].startswith("hf_gradfilter.extra.thing -> hf_gradfilter.data.io (room 'extra'")
    assert bad[1].startswith("hf_gradfilter.publish.hub -> hf_gradfilter.finetuning.sft")
    assert bad[2].startswith("hf_gradfilter.scores.formulas -> hf_gradfilter.selection.top (scores is floor 2")
    assert len(bad) == 3  # selection -> scores and scores -> data run down: allowed


def test_no_import_runs_up_the_layer_order():
    bad = upward_imports(import_graph())
    assert bad == [], "imports against the layer order (README: Layout):\n" + "\n".join(bad)


def test_no_library_module_imports_the_cli():
    importers = sorted(name for name, deps in import_graph().items() if "hf_gradfilter.cli" in deps)
    assert importers == [], f"the CLI is the top floor; these import it: {importers}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_500_lines(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES}): split it by concern"


@pytest.mark.slow
def test_importing_the_package_does_not_import_trl():
    import subprocess
    import sys

    code = "import sys, hf_gradfilter\nassert 'trl' not in sys.modules, 'import hf_gradfilter imported trl'\n"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_every_module_imports_by_its_dotted_path_and_no_re_export_shadows_a_room():
    import importlib
    import subprocess
    import sys

    import hf_gradfilter

    rooms = sorted({room(m) for m in modules() if room(m) and "." in m[len("hf_gradfilter."):]})
    shadowed = [r for r in rooms if not isinstance(vars(hf_gradfilter).get(r, hf_gradfilter), type(hf_gradfilter))]
    assert shadowed == [], f"hf_gradfilter.<room> is not the subpackage for {shadowed} (a re-export took its name)"
    code = "".join(f"import {m} as _m\n" for m in sorted(modules()) if m != "hf_gradfilter.cli")
    subprocess.run([sys.executable, "-c", code], check=True)  # `import a.b.c as m` walks attributes
    assert all(importlib.import_module(m) for m in modules())


def test_pyproject_lists_every_subpackage():
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    assert found - listed == set(), f"subpackages missing from pyproject's packages (not installed): {found - listed}"
