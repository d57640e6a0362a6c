"""The layers of posttrain_cli point down: the package import graph has no circle, the libraries
under the stages know nothing of the run around them, and the stage worker needs no launcher.

Read from the source with ast, every import counted (top-level and inside functions: a lazy
import is still a dependency)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import posttrain_cli

ROOT = Path(posttrain_cli.__file__).parent
# Libraries a stage is built from: they take what they need as arguments.
LOW = ("engine", "data", "losses", "rollout", "rewards", "merge", "models")
# What describes or drives a run.
HIGH = ("pipeline", "launch", "config", "cli", "ui", "stages")


def _imports(path: Path) -> list[tuple[str, int]]:
    """-> (dotted module under posttrain_cli, line) for each import of posttrain in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(path.relative_to(ROOT.parent).with_suffix("").parts)[:-node.level]
                names = [".".join(base + ([node.module] if node.module else []))]
            elif node.module == "posttrain_cli":
                names = [f"posttrain_cli.{a.name}" for a in node.names]
            else:
                names = [node.module]
        else:
            continue
        out += [(n, node.lineno) for n in names if n.startswith("posttrain_cli.")]
    return out


def _part(module: str) -> str:
    """posttrain_cli.pipeline.runner -> pipeline; posttrain_cli.cli -> cli."""
    return module.split(".")[1]


def _edges() -> dict[tuple[str, str], list[str]]:
    """(importing part, imported part) -> the places, for imports between parts."""
    edges = defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        src = rel.parts[0].removesuffix(".py")
        for module, line in _imports(path):
            if _part(module) != src:
                edges[(src, _part(module))].append(f"{rel}:{line}")
    return edges


def _cycle(edges) -> list[str] | None:
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_package_import_graph_has_no_cycle():
    edges = _edges()
    cycle = _cycle(edges)
    assert cycle is None, "import circle " + " -> ".join(cycle) + ": " + "; ".join(
        f"{a} -> {b} at {', '.join(edges[(a, b)])}" for a, b in zip(cycle, cycle[1:]))


def test_the_libraries_do_not_import_what_drives_a_run():
    wrong = {k: v for k, v in _edges().items() if k[0] in LOW and k[1] in HIGH}
    assert not wrong, "\n".join(f"{a} imports {b} at {', '.join(places)}" for (a, b), places in sorted(wrong.items()))


def test_the_worker_imports_no_launcher():
    found = [f"line {line}: {m}" for m, line in _imports(ROOT / "pipeline" / "worker.py") if _part(m) == "launch"]
    assert not found, found


def test_the_scan_sees_lazy_imports():
    # Guard the guard: the local launcher imports the worker inside a function.
    assert "posttrain_cli.pipeline.worker" in {m for m, _ in _imports(ROOT / "launch" / "local.py")}
