"""The layers of `inspectd`, stated as rules and checked on the code: imports point down, never up or sideways.

Every import counts: at module level, inside functions (lazy, for start-up cost) and under
TYPE_CHECKING. docs/design.md#layers explains the order; a new package must be placed in it here.
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "inspectd"

# Bottom to top. A unit (a top-level module, or a subpackage with everything in it) may import the units of
# the layers below its own; within a layer only the foundation's modules import each other (acyclically).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("inspectd", "inspectd.errors", "inspectd.threads", "inspectd.frames", "inspectd.imageio", "inspectd.tfload",
     "inspectd.security", "inspectd.synth"),  # foundation: no knowledge of the daemon
    ("inspectd.model",),  # the deployable model: file, metadata, mask rule, conversion
    ("inspectd.config",),  # configuration: one model per section, each setting declared once
    ("inspectd.metrics",),  # metric definitions
    ("inspectd.sources", "inspectd.pipeline"),  # the stages a frame passes: capture, then batch/infer/inspect
    ("inspectd.outputs",),  # where inspections go: ZeroMQ, replay, archive, live view
    ("inspectd.client",),  # the consumers' library (wire protocol from outputs)
    ("inspectd.service", "inspectd.watch", "inspectd.bridges", "inspectd.toolkit"),  # compose and consume
    ("inspectd.bench",),
    ("inspectd.cli",),
    ("inspectd.__main__",),
)
FOUNDATION = LAYERS[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every inspectd module `path` imports, wherever the import statement stands."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return {m for m in found if m == "inspectd" or m.startswith("inspectd.")}


def module_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in files and m != name} for name, path in files.items()}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def layer_of(unit: str) -> int:
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    raise LookupError(unit)


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that break the layer order: up, or sideways between two units of one layer (outside the foundation)."""
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = unit_of(module), unit_of(target)
            if a == b or a in FOUNDATION and b in FOUNDATION:
                continue
            if layer_of(b) >= layer_of(a):
                found.append(f"{module} -> {target} ({a} in layer {layer_of(a)}, {b} in layer {layer_of(b)})")
    return found


def cycles(graph: dict[str, set[str]], key=lambda m: m) -> list[str]:
    """The first cycle among `key(module)` nodes, as a list ([] when there is none)."""
    nodes: dict[str, set[str]] = {}
    for module, targets in graph.items():
        nodes.setdefault(key(module), set()).update(key(t) for t in targets if key(t) != key(module))
    try:
        tuple(graphlib.TopologicalSorter(nodes).static_order())
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return []


def test_every_unit_has_a_layer():
    units = {unit_of(m) for m in module_graph()}
    unplaced = sorted(u for u in units if not any(u in layer for layer in LAYERS))
    assert unplaced == [], f"place these in LAYERS: {unplaced}"


def test_imports_point_down_only():
    assert violations(module_graph()) == []


def test_no_package_cycles():
    assert cycles(module_graph(), key=unit_of) == []


def test_no_module_cycles():
    """Not even inside a package: no import in a function dodges a cycle."""
    assert cycles(module_graph()) == []


def test_the_rules_can_fail():
    graph = module_graph()
    graph["inspectd.config.model"] = graph["inspectd.config.model"] | {"inspectd.service.daemon"}  # upward
    graph["inspectd.sources.camera"] = graph["inspectd.sources.camera"] | {"inspectd.pipeline.core"}  # sideways
    assert violations(graph) == [
        "inspectd.config.model -> inspectd.service.daemon (inspectd.config in layer 2, inspectd.service in layer 7)",
        "inspectd.sources.camera -> inspectd.pipeline.core (inspectd.sources in layer 4, inspectd.pipeline in layer 4)"]
    assert set(cycles(graph, key=unit_of)) >= {"inspectd.config", "inspectd.service"}
    graph = module_graph()
    graph["inspectd.outputs.archive"] = graph["inspectd.outputs.archive"] | {"inspectd.outputs.replay"}
    assert set(cycles(graph)) >= {"inspectd.outputs.archive", "inspectd.outputs.replay"}
    with pytest.raises(LookupError):
        layer_of("inspectd.newpackage")


def test_the_daemon_never_imports_the_training_toolkit():
    """What a line PC's `inspectd run` loads: no inspectd.toolkit module (statically, and in a real process)."""
    graph = module_graph()
    seen, todo = set(), ["inspectd.service.daemon"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph.get(module, ())
    assert sorted(m for m in seen if m.startswith("inspectd.toolkit")) == []
    loaded = subprocess.run([sys.executable, "-c", "import sys, inspectd.service.daemon; "
                             "print(sorted(m for m in sys.modules if m.startswith('inspectd.toolkit')))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
