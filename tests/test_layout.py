"""The house reads one way: lungseg's imports form no circle, and the jobs that promise to run
without Ray load none."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lungseg"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each lungseg module and the lungseg modules it imports, at module level or anywhere in a
    function (``from lungseg import a`` imports ``lungseg.a``)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                inner = {f"{node.module}.{alias.name}" for alias in node.names}
                # "from lungseg.core import qc" imports lungseg.core.qc, not the package's code
                found |= inner if inner & set(modules) else {node.module}
        graph[name] = {m for m in found if m in modules and m != name and m != "lungseg"}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_imports_form_no_circle():
    graph = _imports()
    assert len(graph) > 20 and graph["lungseg.jobs.segment"] >= {
        "lungseg.stages.pipeline",
        "lungseg.runs.table",
    }
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


LAYERS = (("__main__", "cli", "console"), ("jobs",), ("stages",), ("runs",), ("model",), ("io",))
"""lungseg's subpackages from the top down: entry, jobs, Ray stages, run state, model, storage
and catalog; then ``core``, the pure helpers. An import goes down or stays in its layer."""
RANKS = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _layer(module: str) -> int:
    return RANKS.get(module.split(".")[1], len(LAYERS))


def test_imports_run_down_the_layers():
    graph = _imports()
    assert {m.split(".")[1] for m in graph if m.count(".")} <= {*RANKS, "core"}
    upward = [f"{a} -> {b}" for a, deps in graph.items() for b in deps if _layer(b) < _layer(a)]
    assert not upward, upward


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("job", ["lungseg.jobs.report", "lungseg.jobs.export", "lungseg.jobs.fit"])
def test_jobs_without_ray_load_no_ray(job):
    code = (
        f"import sys, {job}, lungseg.cli; "
        "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')); "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_pure_helpers_import_nothing_heavier_than_numpy_and_opencv():
    graph = _imports()
    helpers = (
        "lungseg.core.imaging",
        "lungseg.core.draw",
        "lungseg.core.qc",
        "lungseg.core.metrics",
    )
    # one another, the settings, the fixed names (which import nothing of lungseg) and
    # UserError, nothing else of lungseg
    fixed = {"lungseg.core.errors", "lungseg.core.config", "lungseg.core.layout"}
    for pure in helpers:
        allowed = fixed | set(helpers)
        assert graph[pure] <= allowed, (pure, graph[pure])
        text = (PACKAGE / "core" / f"{pure.split('.')[-1]}.py").read_text()
        for heavy in ("import ray", "import keras", "import tensorflow", "pyarrow"):
            assert heavy not in text, (pure, heavy)
