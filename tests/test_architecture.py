"""The house's rules, read from the code: layers point one way, no cycles, Prefect and MLflow
only where they belong, no import hidden in a function to dodge a cycle.

Imports are read with :mod:`ast` (nothing is imported), every import counted: at module
level, under ``TYPE_CHECKING`` and inside functions alike.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ops", "flows", "tasks", "fl_components")
# a package may import the ones after it, never the ones before it
LAYER = {name: i for i, name in enumerate(PACKAGES)}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> Iterator[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every first-party import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    functions = [
        node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import module` imports the module; `from module import name` the module
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in MODULES
                else node.module
                for alias in node.names
            ]
        for name in names:
            yield name, node.lineno, id(node) in nested


def _first_party(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for module, path in MODULES.items():
        for name, _, _ in _imports(path):
            target = _first_party(name)
            if target is not None and target != module:
                graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def _package_face_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without a package's ``__init__`` re-exporting its own modules."""
    return {
        module: {t for t in targets if not t.startswith(module + ".")}
        for module, targets in graph.items()
    }


def test_no_import_cycles() -> None:
    cycles = _cycles(_package_face_edges(_graph()))
    assert cycles == [], f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers_point_one_way(module: str) -> None:
    own = LAYER[module.split(".")[0]]
    upward = [
        f"{name} (line {line})"
        for name, line, _ in _imports(MODULES[module])
        if name.split(".")[0] in LAYER and LAYER[name.split(".")[0]] < own
    ]
    assert upward == [], f"{module} imports a layer above it: {upward}"


def test_the_core_never_imports_prefect_and_mlflow_only_in_tracking() -> None:
    offenders = []
    for module, path in MODULES.items():
        if not module.startswith("fl_components"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            if "prefect" in roots:
                offenders.append(f"{module}:{node.lineno} imports prefect")
            if "mlflow" in roots and module != "fl_components.tracking":
                offenders.append(f"{module}:{node.lineno} imports mlflow outside tracking")
    assert offenders == []


def test_no_first_party_import_hidden_in_a_function_below_the_cli() -> None:
    """An import inside a function hides layering; only the CLI (start-up time) and the
    coordinator's choice of backend (the work-pool backend needs a Prefect server) may."""
    allowed = {("flows.coordinator", "tasks.work_pool")}
    hidden = [
        f"{module}:{line} imports {name}"
        for module, path in MODULES.items()
        if not module.startswith("ops")
        for name, line, inside in _imports(path)
        if inside and _first_party(name) is not None and (module, _first_party(name)) not in allowed
    ]
    assert hidden == []


def test_flows_holds_only_flows_and_their_helpers() -> None:
    """No CLI, stack or server code in flows/ (it lives in ops/)."""
    for path in (ROOT / "flows").glob("*.py"):
        text = path.read_text()
        for marker in ("import typer", "subprocess", "uvicorn"):
            assert marker not in text, f"{path.name} holds operator tooling ({marker})"


def test_the_rules_catch_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# Functions longer than this are split into named steps (STYLE.md: small pieces, one job).
MAX_FUNCTION_LINES = 60
# Not held to it: benchmarks and tests (scripts and scenarios), and what is not ours.
LENGTH_EXEMPT = {"tests", "benchmarks", "mlflow", "build"}


def _long_functions(source: str, filename: str) -> list[str]:
    """'file:function (N lines)' for each function in ``source`` over the limit.

    A function's length runs from its ``def`` line to its last line (decorators not counted).
    """
    tree = ast.parse(source, filename=filename)
    return [
        f"{filename}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_no_function_over_60_lines_outside_benchmarks_and_tests() -> None:
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[0] in LENGTH_EXEMPT or any(p.startswith(".") for p in parts):
            continue
        long += _long_functions(path.read_text(), str(path.relative_to(ROOT)))
    assert long == [], f"split these into named steps of at most {MAX_FUNCTION_LINES} lines"


def test_the_length_rule_catches_a_long_function() -> None:
    lines = [f"x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1)]
    short = "def short():\n" + "".join(f"    {line}\n" for line in lines)  # exactly the limit
    long = "class C:\n    async def long(self):\n" + "".join(
        f"        {line}\n" for line in [*lines, "return x0"]
    )
    assert _long_functions(short, "s.py") == []
    assert _long_functions(long, "l.py") == [f"l.py:long ({MAX_FUNCTION_LINES + 1} lines)"]
