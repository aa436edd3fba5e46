"""The import graph of ``emailops`` and ``prod``, read from the source with ``ast``: no cycle
between modules or between packages, and ``emailops`` never imports ``prod``.

Every import statement counts, also one inside a function or under ``TYPE_CHECKING``: a cycle that
only a deferred import keeps from failing is still a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("emailops", "prod")
# ``python -m emailops``: the command line, which lives in prod (README, "python -m emailops").
ENTRY_POINT = "emailops.__main__"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")}


def _imported(name: str, path: Path, node: ast.Import | ast.ImportFrom, modules: Iterable[str]) -> set[str]:
    """The modules of the project that ``node`` (in module ``name``) imports."""
    known = set(modules)
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            anchor = package[: len(package) - node.level + 1]
            base = ".".join([*anchor, *([node.module] if node.module else [])])
        # ``from package import module`` imports the module; ``from module import name`` the module.
        targets = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
        ]
    return {target for target in targets if target in known and target != name}


def module_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                graph[name] |= _imported(name, path, node, modules)
    return graph


def _package(module: str) -> str:
    """``emailops.replies.outbox`` -> ``emailops.replies``; a top-level module is its own unit."""
    return ".".join(module.split(".")[:2])


def package_graph(modules: Mapping[str, set[str]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in modules.items():
        graph.setdefault(_package(module), set()).update(
            _package(target) for target in targets if _package(target) != _package(module)
        )
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_imports_at_module_level_and_in_functions() -> None:
    graph = module_graph()
    assert "emailops.replies.outbox" in graph["emailops.replies.decisions"]  # from package import module
    assert "emailops.llm.jobs" in graph["emailops.replies.limits"]  # from module import name
    assert "prod.cli_llm" in graph["prod.cli"]  # inside a function
    assert "prod.cli" in graph[ENTRY_POINT]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_back() -> None:
    assert cycles(module_graph()) == []


def test_no_package_imports_itself_back() -> None:
    assert cycles(package_graph(module_graph())) == []


def test_emailops_never_imports_prod() -> None:
    graph = module_graph()
    reaching = {
        module: sorted(target for target in targets if target.split(".")[0] == "prod")
        for module, targets in graph.items()
        if module.split(".")[0] == "emailops" and module != ENTRY_POINT
    }
    assert {module: targets for module, targets in reaching.items() if targets} == {}
