"""No import cycles anywhere in the package: a static walk of every import of every module.

What counts as "module A imports module B" (an edge A -> B), read with `ast` from the source, never by
importing it:
  - every `import ...` and `from ... import ...` statement, wherever it stands: at the top, or inside a
    function, where an import only hides a cycle (it still ties the two modules together);
  - every string constant that names a module of the package, "tinyfractal.x.y" or "tinyfractal.x.y:function":
    these are the targets of `importlib.import_module`, which the package allows in exactly two tables,
    the variant registry (variants/__init__.py) and the command table (cli.py), so that a variant or a
    command is imported only when it is used. A lazy import is still an import, so it is an edge too.
Importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py` first; those implicit edges to parent
packages are not counted (every package would otherwise be in a cycle with its own children).

A cycle means two modules each need the other; the fix is the layering this test enforces: a module
low in the stack (core/, formulas, config, the leaves of text/) never imports one higher up (variants,
training, inference, tools, cli). Pass things in, or move the shared piece down.
"""
import ast
import re
from collections import deque
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tinyfractal"
MODULE_STRING = re.compile(r"tinyfractal(\.\w+)+(:\w+)?")


def modules_of(package_dir):
    """{dotted module name: path} for every .py file under the package folder."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name, modules):
    """The module a dotted name lands in: itself if it is a module, else its longest module prefix."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name, path, modules, root):
    """[(imported module, line)] of one module: its import statements anywhere, and its module-name strings."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:                                   # from . import x / from ..y import z
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                full = f"{source}.{alias.name}"
                found.append((full if full in modules else source, node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.fullmatch(node.value):
            found.append((node.value.split(":")[0], node.lineno))
    out = []
    for target, line in found:
        if target == root or target.startswith(root + "."):
            resolved = _resolve(target, modules)
            if resolved and resolved != name:
                out.append((resolved, line))
    return out


def import_graph(package_dir):
    """{module: {imported module: first line importing it}} for the whole package."""
    modules = modules_of(package_dir)
    graph = {}
    for name, path in modules.items():
        edges = {}
        for target, line in imports_of(name, path, modules, package_dir.name):
            edges.setdefault(target, line)
        graph[name] = edges
    return graph


def strongly_connected(graph):
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
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
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def shortest_cycle(graph, component):
    """One shortest cycle inside a component, as [m0, m1, ..., m0] (breadth-first from each member)."""
    members, best = set(component), None
    for start in component:
        previous, queue = {start: None}, deque([start])
        while queue:
            node = queue.popleft()
            if start in graph[node]:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                cycle = path[::-1] + [start]
                if best is None or len(cycle) < len(best):
                    best = cycle
                break
            for child in sorted(graph[node]):
                if child in members and child not in previous:
                    previous[child] = node
                    queue.append(child)
    return best


def describe(graph, cycle):
    """'a (line 3) -> b (line 9) -> a': each arrow labelled with the line of the import that makes it."""
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps + [cycle[-1]])


def cycles_of(package_dir):
    """One shortest cycle of every knot of modules that import each other, described with its lines."""
    graph = import_graph(package_dir)
    return [describe(graph, shortest_cycle(graph, c)) for c in strongly_connected(graph)]


def knots_of(package_dir):
    """Every knot: the modules that all reach each other through imports."""
    return strongly_connected(import_graph(package_dir))


def test_the_package_has_no_import_cycle():
    """Layering law: no chain of imports (at the top, inside functions, or through the lazy tables) leads
    from any module of tinyfractal back to itself. A failure names every cycle, with the importing lines."""
    assert PACKAGE.is_dir()
    graph = import_graph(PACKAGE)
    assert len(graph) > 30 and graph["tinyfractal.cli"]             # the walk did find the package
    cycles, knots = cycles_of(PACKAGE), knots_of(PACKAGE)
    assert not cycles, "import cycles:\n" + "\n".join(f"{c}\n    (all modules of this knot: {', '.join(k)})"
                                                     for c, k in zip(cycles, knots))


def test_the_lazy_tables_count_as_imports():
    """The variant registry and the command table reach their modules through strings; the walk sees them."""
    graph = import_graph(PACKAGE)
    assert {"tinyfractal.variants.base", "tinyfractal.variants.coupled",
            "tinyfractal.variants.byte_model"} <= set(graph["tinyfractal.variants"])
    assert {"tinyfractal.tools.trace", "tinyfractal.tools.plots", "tinyfractal.training.grow"} <= \
        set(graph["tinyfractal.cli"])


def write(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("files, expected", [
    ({"__init__.py": "", "low.py": "def f():\n    from tinyfractal import high\n", "high.py": "import tinyfractal.low\n"},
     "tinyfractal.high (line 1) -> tinyfractal.low (line 2) -> tinyfractal.high"),
    ({"__init__.py": "", "reg.py": "TABLE = {'a': 'tinyfractal.impl.a:A'}\n", "impl/__init__.py": "",
      "impl/a.py": "from tinyfractal.reg import TABLE\n"},
     "tinyfractal.impl.a (line 1) -> tinyfractal.reg (line 1) -> tinyfractal.impl.a"),
    ({"__init__.py": "", "pkg/__init__.py": "from . import b\n", "pkg/b.py": "from .. import pkg\n"},
     "tinyfractal.pkg (line 1) -> tinyfractal.pkg.b (line 1) -> tinyfractal.pkg"),
])
def test_the_walk_finds_a_cycle_hidden_in_a_function_a_table_or_a_relative_import(tmp_path, files, expected):
    """The detector itself: a cycle through an import inside a function, through a registry string, or
    through relative imports is found and named with its lines; the same package without it is clean."""
    root = tmp_path / "tinyfractal"
    write(root, files)
    assert cycles_of(root) == [expected]
    clean = tmp_path / "clean" / "tinyfractal"
    write(clean, {name: ("" if name.endswith("__init__.py") else "import os\n") for name in files})
    assert cycles_of(clean) == []
