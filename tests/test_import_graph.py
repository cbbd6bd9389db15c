"""The package's modules import each other without a cycle, counting imports made only
for type checking too (a cycle there is a design knot: the client, the server, the worker
and the scheduler each know only what is below them)."""

from __future__ import annotations

import ast
from pathlib import Path

import tasqueue_anyio

PACKAGE = Path(tasqueue_anyio.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Package modules ``path`` imports (relative and absolute, at any level)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[: len(base) - (node.level - 1)]
                target = ".".join([*parts, node.module] if node.module else parts)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = {m for m in _imports(path, name) if m in modules and m != name}
        # a package's __init__ re-exports its modules: importing a module does not
        # import its siblings through it, so edges *into* package __init__s are not kept
        graph[name] = {m for m in edges if modules[m].name != "__init__.py"}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_the_package_modules() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or ())


def test_the_layers() -> None:
    graph = _graph()
    # the producer's client knows nothing of workers, tasks or the scheduler
    assert not graph["tasqueue_anyio._client"] & {
        "tasqueue_anyio._server",
        "tasqueue_anyio._worker",
        "tasqueue_anyio._scheduler",
    }
    assert "tasqueue_anyio._server" not in graph["tasqueue_anyio._worker"]
    assert "tasqueue_anyio._server" not in graph["tasqueue_anyio._scheduler"]


def test_the_checker_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
