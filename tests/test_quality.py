"""The package stays `mypy --strict` and `ruff` clean: the test suite checks it, so CI does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_mypy_strict_is_clean() -> None:
    pytest.importorskip("mypy")
    result = run(sys.executable, "-m", "mypy", "--strict", "aiotimer")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    result = run(ruff, "check", "aiotimer", "tests", "benchmarks", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


def _package_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports, ``TYPE_CHECKING`` blocks included.

    Importing ``a.b.c`` runs ``a.b``'s ``__init__`` first, so that counts as an import too.
    """
    import ast

    package = ROOT / "aiotimer"
    modules: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        base = name.split(".") if is_package else name.split(".")[:-1]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                prefix = base[: len(base) - node.level + 1] if node.level else []
                mod = ".".join([*prefix, *([node.module] if node.module else [])])
                targets = [mod] + [f"{mod}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    candidate = ".".join(parts[:i])
                    if candidate in modules and candidate != name:
                        edges.add(candidate)
        graph[name] = edges
    return graph


def test_no_import_cycles_type_checking_imports_included() -> None:
    graph = _package_imports()
    # Importing a package's own submodules from its __init__ is how it re-exports.
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name != "aiotimer" and t == "aiotimer")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if target.startswith(node + ".") and state.get(target) != 1:
                continue  # a package importing its own submodule
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


#: The watchdog's core: it knows processes, not a launcher's workers.
CORE = (
    "aiotimer._heap",
    "aiotimer._scheduler",
    "aiotimer._killer",
    "aiotimer._expiry",
    "aiotimer._processes",
    "aiotimer._dispatch",
)


def test_the_core_never_imports_workers_or_the_launcher() -> None:
    # The package's __init__ runs first but imports nothing eagerly (PEP 562).
    graph = {name: edges - {"aiotimer"} for name, edges in _package_imports().items()}

    def reach(name: str, seen: set[str]) -> set[str]:
        for target in graph.get(name, set()) - seen:
            seen.add(target)
            reach(target, seen)
        return seen

    for core in CORE:
        forbidden = reach(core, set()) & {"aiotimer._workers", "aiotimer.launcher"}
        assert not forbidden, f"{core} imports {sorted(forbidden)} (TYPE_CHECKING included)"


def test_the_dispatcher_loads_no_transport() -> None:
    """``Channel`` lives in the core: dispatching loads no transport, nor multiprocessing."""
    code = (
        "import sys, aiotimer._dispatch\n"
        "print(sorted(m for m in sys.modules if m.startswith('aiotimer.transports')"
        " or m == 'multiprocessing'))"
    )
    result = run(sys.executable, "-c", code)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
