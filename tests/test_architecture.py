"""The package's shape: layers whose imports point down only, no import cycles, the runtime path free of
training-only imports.

Every import that runs counts: at module level and inside functions (lazy, for start-up cost);
those under TYPE_CHECKING never run and do not. docs/design.md#layers explains the order; a new
package must be placed in it here.
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "inspectd"


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` blocks: imports there never run."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the inspectd modules it imports, at the top or inside functions (lazy imports count too)."""
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_lines(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
                # `from pkg import sub` imports the submodule `pkg.sub` when there is one.
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                deps.update(subs or {node.module})
                if len(subs) < len(node.names):
                    deps.add(node.module)
        graph[name] = deps - {name}
    return graph


def test_the_graph_sees_lazy_imports():
    """The checker itself: a function-level import is an edge (reload -> daemon was one, hidden that way)."""
    graph = import_graph()
    assert "inspectd.pipeline.engine" in graph["inspectd.toolkit.infer"] | graph["inspectd.toolkit.evaluate"]
    assert "inspectd.service.daemon" in graph["inspectd.cli"]  # imported inside _cmd_run


def test_no_import_cycles():
    try:
        tuple(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle among inspectd modules: {' -> '.join(exc.args[1])}")


def test_a_cycle_is_found(tmp_path):
    """The check can fail: two modules importing each other lazily form a cycle."""
    pkg = tmp_path / "inspectd"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from inspectd.b import g\n")
    (pkg / "b.py").write_text("from inspectd import a\n")
    with pytest.raises(graphlib.CycleError):
        tuple(graphlib.TopologicalSorter(import_graph(pkg)).static_order())


RUNTIME_PACKAGES = ("inspectd.sources", "inspectd.pipeline", "inspectd.outputs", "inspectd.service")
TRAINING_ONLY = (
    "inspectd.toolkit.train",
    "inspectd.toolkit.augment",
    "inspectd.toolkit.evaluate",
    "inspectd.toolkit.plots",
    "inspectd.toolkit.scoring",
    "inspectd.toolkit.dataset",
    "inspectd.toolkit.pipeline",
)


def test_runtime_path_does_not_reach_the_training_code():
    """The daemon's packages never import training, augmentation, plotting or metric code (even transitively)."""
    graph = import_graph()
    for start in (m for m in graph if m.startswith(RUNTIME_PACKAGES)):
        seen, todo = set(), [start]
        while todo:
            mod = todo.pop()
            if mod not in seen:
                seen.add(mod)
                todo.extend(graph.get(mod, ()))
        assert not seen & set(TRAINING_ONLY), f"{start} reaches {sorted(seen & set(TRAINING_ONLY))}"


# Bottom to top. A unit (a top-level module, or a subpackage with everything in it) may import the units of
# the layers below its own; within a layer only the foundation's modules import each other (acyclically).
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "inspectd",
        "inspectd.errors",
        "inspectd.threads",
        "inspectd.losses",
        "inspectd.hangup",
        "inspectd.frames",
        "inspectd.imageio",
        "inspectd.tfload",
        "inspectd.security",
        "inspectd.synth",
        "inspectd.drawing",
    ),  # foundation: no knowledge of the daemon
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
    units = {unit_of(m) for m in import_graph()}
    unplaced = sorted(u for u in units if not any(u in layer for layer in LAYERS))
    assert unplaced == [], f"place these in LAYERS: {unplaced}"


def test_imports_point_down_only():
    assert violations(import_graph()) == []


def test_no_package_cycles():
    assert cycles(import_graph(), key=unit_of) == []


def test_the_rules_can_fail():
    graph = import_graph()
    graph["inspectd.config.model"] = graph["inspectd.config.model"] | {"inspectd.service.daemon"}  # upward
    graph["inspectd.sources.camera"] = graph["inspectd.sources.camera"] | {"inspectd.pipeline.core"}  # sideways
    assert violations(graph) == [
        "inspectd.config.model -> inspectd.service.daemon (inspectd.config in layer 2, inspectd.service in layer 7)",
        "inspectd.sources.camera -> inspectd.pipeline.core (inspectd.sources in layer 4, inspectd.pipeline in layer 4)",
    ]
    assert set(cycles(graph, key=unit_of)) >= {"inspectd.config", "inspectd.service"}
    graph = import_graph()
    graph["inspectd.outputs.archive"] = graph["inspectd.outputs.archive"] | {"inspectd.outputs.replay"}
    assert set(cycles(graph)) >= {"inspectd.outputs.archive", "inspectd.outputs.replay"}
    with pytest.raises(LookupError):
        layer_of("inspectd.newpackage")


def test_the_daemon_never_imports_the_training_toolkit():
    """What a line PC's `inspectd run` loads: no inspectd.toolkit module (statically, and in a real process)."""
    graph = import_graph()
    seen, todo = set(), ["inspectd.service.daemon"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph.get(module, ())
    assert sorted(m for m in seen if m.startswith("inspectd.toolkit")) == []
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, inspectd.service.daemon; print(sorted(m for m in sys.modules if m.startswith('inspectd.toolkit')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert loaded == "[]"


def _reached(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph.get(module, ())
    return seen


def test_the_consumer_library_takes_only_the_wire_protocol_from_the_daemon():
    """client.py (and so `inspectd watch`) reaches no daemon module: of outputs/ only wire.py, where the
    protocol constants live, and nothing of service/, pipeline/, sources/ or config/."""
    reached = _reached(import_graph(), "inspectd.client")
    daemon_side = sorted(
        m
        for m in reached
        if m.startswith(
            (
                "inspectd.outputs.",
                "inspectd.service",
                "inspectd.pipeline",
                "inspectd.sources",
                "inspectd.config",
                "inspectd.model",
            )
        )
        and m != "inspectd.outputs.wire"
    )
    assert daemon_side == [] and "inspectd.outputs.wire" in reached
