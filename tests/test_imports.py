"""The attndsl package has no import cycles, counting function-level (lazy) imports too.

Every module of the package (``codegen/`` and ``grammar/`` as ``attndsl.codegen`` and
``attndsl.grammar``, as pyproject.toml installs them) is parsed with ``ast``; each ``import``
or ``from ... import`` anywhere in it (module level, inside functions, under TYPE_CHECKING)
that names an attndsl module is an edge.  ``from P import n`` is an edge to ``P.n`` when that
is a module, else to ``P``.  A strongly connected component of more than one module (or a
module importing itself) is a cycle, reported as a path.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"attndsl": ROOT / "attndsl", "attndsl.codegen": ROOT / "codegen",
            "attndsl.grammar": ROOT / "grammar"}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for prefix, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((prefix, *rel))] = path
    return out


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    return ".".join(parts[:keep] + ([node.module] if node.module else []))


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The attndsl modules ``module`` imports anywhere in its body."""
    out: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, is_package, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    out.add(sub)
                elif base in modules:
                    out.add(base)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan), iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == node:
                        break
                out.append(sorted(comp))
    return out


def _cycle_path(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One cycle through the component's first module (breadth-first, so a shortest one)."""
    start, members = comp[0], set(comp)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    return comp


def test_the_import_graph_covers_the_whole_package() -> None:
    graph = import_graph()
    for name in ("attndsl.api", "attndsl.autograd", "attndsl.block_mask",
                 "attndsl.codegen.triton", "attndsl.frontend.text", "attndsl.passes.mask"):
        assert name in graph, name
    assert "attndsl.ir.expr" in graph["attndsl.ir.cascade"]


def test_the_cycle_finder_reports_a_lazy_import_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    cycles = [_cycle_path(graph, c) for c in _components(graph)
              if len(c) > 1 or c[0] in graph[c[0]]]
    assert sorted(cycles) == [["a", "b", "c", "a"], ["e", "e"]]


def test_no_attndsl_module_imports_one_that_imports_it_back() -> None:
    graph = import_graph()
    cycles = [" -> ".join(_cycle_path(graph, c)) for c in _components(graph)
              if len(c) > 1 or c[0] in graph[c[0]]]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
