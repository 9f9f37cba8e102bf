"""The packages' layering, read from the source (every import, inside functions too): data <- trainers <- study,
search_spaces beside them, and no import cycle between modules."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "search_spaces", "trainers", "study")
MAY_IMPORT = {"data": set(), "search_spaces": set(), "trainers": {"data"},  # besides itself
              "study": {"data", "trainers", "search_spaces"}}


def imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file (``from a.b import c`` counts a.b.c if that
    is a module, else a.b)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {resolve(f"{node.module}.{a.name}") for a in node.names}
        # a module importing its own package (its __init__) is how Python loads it, not a dependency
        graph[name] = {m for m in found if m and m != name and not name.startswith(m + ".")}
    return graph


def test_each_package_imports_only_the_layers_below_it():
    wrong = sorted(f"{a} imports {b}" for a, deps in imports().items() for b in deps
                   if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in MAY_IMPORT[a.split(".")[0]])
    assert not wrong, wrong


def test_no_import_cycle():
    graph, cycles = imports(), []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, [" -> ".join(c) for c in cycles]
