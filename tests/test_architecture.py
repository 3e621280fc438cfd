"""The package's shape: no import cycles, the runtime path free of training-only imports."""

from __future__ import annotations

import ast
import graphlib
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
    assert "inspectd.pipeline.engine" in graph["inspectd.model.infer"] | graph["inspectd.model.evaluate"]
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
TRAINING_ONLY = ("inspectd.model.train", "inspectd.model.augment", "inspectd.model.evaluate", "inspectd.model.plots",
                 "inspectd.model.scoring", "inspectd.model.dataset", "inspectd.model.pipeline")


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
