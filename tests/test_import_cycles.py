"""No import cycles among distill_dag modules, counting imports inside functions too.

A function-level import that closes a loop is still a cycle: it only moves the failure from import
time to the first call (or hides a design knot). The graph is built from the source with ``ast``:
every ``import``/``from ... import`` of a ``distill_dag`` module, at module level or inside a
function or class, is an edge. Imports under ``if TYPE_CHECKING:`` are left out (they never run).
Parent packages are not edges: importing ``distill_dag.data.pack`` runs ``distill_dag/__init__.py``
first, but that is Python's package machinery, not a loop in our code.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "distill_dag"
PACKAGE = "distill_dag"


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` for every .py file of the package (a package is its __init__)."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[tuple[ast.stmt, int]]:
    """Every Import / ImportFrom node outside ``if TYPE_CHECKING:`` blocks, with its line."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """``{module: {imported distill_dag module: line of the first such import}}``."""
    mods = module_names(root)
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        here = mod if is_pkg else mod.rpartition(".")[0]  # the package relative imports start from
        for node, line in _imports(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = here.split(".")
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in mods else base)  # `from pkg import submodule`
            for t in targets:
                # `import distill_dag.a.b` names the deepest module that exists
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t.split(".")[0] == PACKAGE and t != mod:
                    graph[mod].setdefault(t, line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (each one holds a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # recursive: the graph is ~100 modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def a_cycle(graph: dict[str, dict[str, int]], comp: list[str]) -> list[str]:
    """One concrete loop through the first module of a component (breadth-first: the shortest)."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start] + path[::-1][1:] + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    mods = module_names()
    return " -> ".join(
        f"{a} ({mods[a].relative_to(ROOT.parent)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])
    ) + f" -> {cycle[-1]}"


def test_the_graph_sees_module_and_function_level_imports():
    g = import_graph()
    # module level, `from x import y` of a function, and the package root
    assert "distill_dag.io" in g["distill_dag.data.pack"]
    assert "distill_dag.model" in g["distill_dag"]
    assert len(g) > 40


def test_cycle_finder_reports_every_cycle_of_a_hand_made_graph():
    g = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"e": 1}, "e": {"d": 1}, "f": {"a": 1}}
    assert strongly_connected(g) == [["a", "b", "c"], ["d", "e"]]
    assert a_cycle(g, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_distill_dag_has_no_import_cycles():
    g = import_graph()
    comps = strongly_connected(g)
    report = "\n".join(f"- {len(c)} modules {c}\n    e.g. {describe(g, a_cycle(g, c))}" for c in comps)
    assert not comps, f"{len(comps)} import cycle(s) among distill_dag modules:\n{report}"
