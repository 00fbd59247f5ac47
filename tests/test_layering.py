"""The import graph of glad_core is a DAG: every `from .x import` / `import glad_core.x`, at the top of a
module or inside a function, is an edge; a cycle fails, named. Imports under `if TYPE_CHECKING:` never
run and are not edges."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "glad_core"


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _targets(module: str, is_package: bool, node: ast.AST, known: dict[str, Path]) -> list[str]:
    """The package's modules an import node imports (a name that is a submodule counts as that module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".")[: len(module.split(".")) - (node.level - (1 if is_package else 0))]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
    else:
        return []
    out = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.append(name)
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}."""
    known = modules(root)
    graph: dict[str, dict[str, int]] = {m: {} for m in known}
    for module, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in _runtime_nodes(tree):
            for target in _targets(module, path.name == "__init__.py", node, known):
                graph[module].setdefault(target, node.lineno)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the graph, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, {}):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_is_a_dag():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_walker_sees_function_level_imports_and_names_a_cycle(tmp_path):
    """Top-level, function-level, relative and absolute imports are edges; TYPE_CHECKING ones are not."""
    pkg = tmp_path / "glad_core"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    import glad_core.c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    (pkg / "sub" / "__init__.py").write_text("from . import d\n")
    (pkg / "sub" / "d.py").write_text("from ..a import f\n")
    graph = import_graph(pkg)
    assert graph["glad_core.a"] == {"glad_core.b": 1} and graph["glad_core.b"] == {"glad_core.c": 2}
    assert graph["glad_core.c"] == {} and graph["glad_core.sub"] == {"glad_core.sub.d": 1}
    assert graph["glad_core.sub.d"] == {"glad_core.a": 1}
    assert find_cycle(graph) is None
    (pkg / "c.py").write_text("def g():\n    from .sub.d import f\n")
    assert find_cycle(import_graph(pkg)) == ["glad_core.a", "glad_core.b", "glad_core.c", "glad_core.sub.d",
                                             "glad_core.a"]
