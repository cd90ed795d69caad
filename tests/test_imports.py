"""The import structure: no circles in bench/, nothing in bench/ importing a method by name, and
floors that flow one way (the report reads results; it never imports the runner's machinery)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def modules() -> dict[str, Path]:
    out = {}
    for path in BENCH.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = modules()


def imported(name: str, path: Path) -> set[str]:
    """Every module name `path` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def owner(name: str) -> str | None:
    """The bench module an imported name lives in (a module or an attribute of one)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = {owner(i) for i in imported(name, path)}
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")
                       and not t.startswith(name + ".")}
    return graph


def test_there_is_no_import_circle_in_bench():
    graph = edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert circles == []


def test_nothing_in_bench_imports_a_method_by_name():
    offenders = {name: sorted(i for i in imported(name, path) if i == "methods" or i.startswith("methods."))
                 for name, path in MODULES.items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def reaches(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("low,high", [
    ("bench.report", ("bench.worker", "bench.executors", "bench.runner", "bench.grid")),
    ("bench.stages", ("bench.grid", "bench.worker", "bench.executors", "bench.runner", "bench.report",
                      "bench.commands", "bench.cli")),
    ("bench.train", ("bench.stages", "bench.grid", "bench.report", "bench.method", "bench.finetuning")),
    ("bench.attacks", ("bench.stages", "bench.train", "bench.finetuners", "bench.evaluation", "bench.report")),
    ("bench.models", ("bench.stages", "bench.train", "bench.attacks", "bench.report", "bench.method")),
    ("bench.store", ("bench.stages", "bench.grid", "bench.worker", "bench.report")),
])
def test_imports_flow_from_higher_floors_to_lower_ones(low, high):
    """No module of a floor reaches (directly or not) a module of a higher floor."""
    graph = edges()
    for module in (m for m in MODULES if m == low or m.startswith(low + ".")):
        bad = {m for m in reaches(module, graph) if any(m == h or m.startswith(h + ".") for h in high)}
        assert not bad, f"{module} reaches {sorted(bad)}"
