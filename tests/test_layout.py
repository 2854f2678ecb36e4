"""The tree reads as the architecture, and its arrows point one way.

- The hive side stays light: it starts without torch or transformers.
- No import circle anywhere in hive/, worker/ and shared/.
- The terminal client (hive/client/) talks HTTP only: it imports nothing of the server's.
- The services under the endpoints (jobs/, streams/, webhooks/, hub/) never import the
  endpoints (api/, openai/) nor the app that wires them.
- hive/ and worker/ never import each other, except ``hive worker``'s lazy import of
  worker.main; shared/ imports neither.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hive", "worker", "shared")


def module_names() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Each module's imports of the project's modules, lazy ones (inside functions) included."""
    modules = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import module` imports the module; `from module import name`, the module.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            edges |= {target for target in targets if target in modules and target != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def arrows(graph, source: str, target: str) -> list[str]:
    return sorted(f"{a} -> {b}" for a, edges in graph.items() for b in edges if in_package(a, source) and in_package(b, target))


def test_no_import_circle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_the_terminal_client_imports_nothing_of_the_server():
    graph = import_graph()
    server = [m for m in graph if in_package(m, "hive") and not in_package(m, "hive.client")]
    wrong = [arrow for package in server for arrow in arrows(graph, "hive.client", package) if arrow.split(" -> ")[1] == package]
    assert wrong == []
    assert arrows(graph, "hive.client", "worker") == []


@pytest.mark.parametrize("service", ["hive.jobs", "hive.streams", "hive.webhooks", "hive.hub"])
def test_services_never_import_the_endpoints(service):
    graph = import_graph()
    for upper in ("hive.api", "hive.openai", "hive.app", "hive.cli", "hive.embedded"):
        assert arrows(graph, service, upper) == []


def test_hive_and_worker_stay_apart():
    graph = import_graph()
    assert arrows(graph, "hive", "worker") == ["hive.cli -> worker.main"]  # `hive worker`, imported lazily
    assert arrows(graph, "worker", "hive") == []
    assert arrows(graph, "shared", "hive") == arrows(graph, "shared", "worker") == []


def test_hive_never_imports_torch():
    hive_modules = sorted(m for m in module_names() if in_package(m, "hive") and m != "hive.__main__")
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {hive_modules!r}]; "
        "heavy = {'torch', 'transformers', 'accelerate'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
