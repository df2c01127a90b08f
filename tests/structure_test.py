"""The package's shape: no import cycle (imports inside functions included), floors that
only look down, no module above 400 lines without a reason in its docstring, and only the
entry points read absl FLAGS. Read from the source, so these run in a second."""

from __future__ import annotations

import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Folders of the repository and the package names they install as (setup.py package_dir).
FOLDERS = {"maml_tf": "maml_tf", "models": "maml_tf.models", "data": "maml_tf.data"}
ENTRY_POINTS = {"maml_tf.train", "maml_tf.evaluate", "maml_tf.plot_curve", "maml_tf.report",
                "maml_tf.sweep", "maml_tf.export", "maml_tf.launch"}
# Floors, lowest first: a unit may import its own floor's and lower floors' units only.
FLOORS = [
    {"maml_tf.version", "maml_tf.config", "maml_tf.seeds", "maml_tf.papers"},
    {"maml_tf.data", "maml_tf.models", "maml_tf.losses", "maml_tf.provenance",
     "maml_tf.checkpointing", "maml_tf.distribute", "maml_tf.metrics", "maml_tf.callbacks",
     "maml_tf.run_records", "maml_tf.stop_signals"},
    {"maml_tf.meta_learner", "maml_tf.plots"},
    {"maml_tf.algorithms", "maml_tf.evaluation"},
    {"maml_tf.family"},
    {"maml_tf.harness"},
    {"maml_tf.train_step", "maml_tf.supervised", "maml_tf.rl"},
    {"maml_tf.api", "maml_tf.serving", "maml_tf.report", "maml_tf.flags", "maml_tf.grid"},
    {"maml_tf", "maml_tf.cli"},
    ENTRY_POINTS,
]


def _modules() -> dict[str, str]:
    """{module name: file} of the package, as it installs."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True):
            rel = os.path.relpath(path, os.path.join(ROOT, folder))[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join([package] + rel)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: str) -> set[str]:
    """The package modules that ``name`` imports anywhere in its file (functions too)."""
    tree = ast.parse(open(path).read())
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: resolve against this module's package
                parts = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _unit(module: str) -> str:
    """The unit a module belongs to: its subpackage of maml_tf, or itself."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and os.path.basename(MODULES[module]) == "__init__.py"):
        return ".".join(parts[:2])
    return module


def test_the_module_import_graph_has_no_cycle():
    assert len(MODULES) > 50 and "maml_tf.harness" in MODULES
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH) or [])


def test_the_graph_of_subpackages_and_modules_has_no_cycle():
    units = _unit_graph(GRAPH)
    assert _cycle(units) is None, " -> ".join(_cycle(units) or [])


def test_floors_only_look_down():
    floor = {unit: k for k, units in enumerate(FLOORS) for unit in units}
    placed = {_unit(m) for m in MODULES}
    assert placed <= set(floor), f"place these in FLOORS: {sorted(placed - set(floor))}"
    upward = sorted(f"{_unit(m)} -> {_unit(i)}" for m, imported in GRAPH.items()
                    for i in imported if floor[_unit(i)] > floor[_unit(m)])
    assert not upward, upward


def _unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for module, imported in graph.items():
        units.setdefault(_unit(module), set()).update(
            _unit(i) for i in imported if _unit(i) != _unit(module))
    return units


def test_the_checker_sees_a_cycle_through_an_import_inside_a_function(tmp_path):
    # What models/__init__.py once did: its model factory imported the RL policy inside a
    # function, and maml_tf.rl imports maml_tf.models back.
    source = tmp_path / "models_init.py"
    source.write_text("def get_model(config):\n    from maml_tf.rl.policy import gaussian_mlp\n")
    imported = _imports("maml_tf.models", str(source))
    assert imported == {"maml_tf.rl.policy"}
    graph = {**GRAPH, "maml_tf.models": GRAPH["maml_tf.models"] | imported}
    assert _cycle(_unit_graph(graph)) is not None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_long_modules_say_why(module):
    path = MODULES[module]
    lines = len(open(path).read().splitlines())
    if lines <= 400:
        return
    doc = ast.get_docstring(ast.parse(open(path).read())) or ""
    assert "Why this module is long:" in doc, (
        f"{os.path.relpath(path, ROOT)} has {lines} lines: split it, or say in its docstring "
        "'Why this module is long: ...'.")


def test_only_the_entry_points_read_flags():
    def reads_flags(path):
        return any(isinstance(n, ast.Attribute) and n.attr == "FLAGS" or
                   isinstance(n, ast.Name) and n.id == "FLAGS"
                   for n in ast.walk(ast.parse(open(path).read())))
    assert reads_flags(MODULES["maml_tf.train"])
    readers = sorted(m for m, path in MODULES.items()
                     if reads_flags(path) and m not in ENTRY_POINTS)
    assert readers == [], readers
