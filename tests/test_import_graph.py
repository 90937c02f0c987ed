"""facenet_jax's import graph has no cycle: module-level and function-level imports both count,
relative imports are resolved, and `from pkg import submodule` is an edge to the submodule."""

import ast
import pathlib


PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "facenet_jax"


def module_files(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """{dotted module name: its file} of every .py file under package_dir (a package's
    __init__.py is the package's own name)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported_names(module: str, path: pathlib.Path, modules: set[str]) -> list[str]:
    """The dotted names every `import` / `from ... import` anywhere in the file (functions
    included) reaches: `from pkg import name` is pkg.name when that is a module, else pkg."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                if node.level - 1 > len(parts):
                    continue  # beyond the top-level package: not ours
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                      for alias in node.names]
    return names


def import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports} (each name resolved to its longest known
    module prefix; imports from outside the package and of itself dropped)."""
    files = module_files(package_dir)
    root = package_dir.name
    graph: dict[str, set[str]] = {module: set() for module in files}
    for module, path in files.items():
        for name in _imported_names(module, path, set(files)):
            if name != root and not name.startswith(root + "."):
                continue
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != module:
                graph[module].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "pkg"


TINY_PACKAGE = {
    "pkg/__init__.py": "",
    "pkg/a.py": "from . import b\n",                           # relative; b is a submodule
    "pkg/b.py": "import os\n\n\ndef f():\n    from pkg.sub import c\n",   # function-level
    "pkg/sub/__init__.py": "",
    "pkg/sub/c.py": "from ..a import anything\nimport pkg.leaf\n",  # two levels up
    "pkg/leaf.py": "import numpy\n",
}


def test_the_checker_finds_a_cycle_through_relative_and_function_level_imports(tmp_path):
    graph = import_graph(_write(tmp_path, TINY_PACKAGE))
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub.c"},
                     "pkg.sub": set(), "pkg.sub.c": {"pkg.a", "pkg.leaf"}, "pkg.leaf": set()}
    assert cycles(graph) == [frozenset({"pkg.a", "pkg.b", "pkg.sub.c"})]
    # Without the function-level import the same package has no cycle.
    acyclic = {**TINY_PACKAGE, "pkg/b.py": "import os\n"}
    assert cycles(import_graph(_write(tmp_path / "acyclic", acyclic))) == []


def test_from_package_import_submodule_is_an_edge_to_the_submodule(tmp_path):
    package = _write(tmp_path, {"pkg/__init__.py": "from pkg.a import x\nfrom pkg.c import y\n",
                                "pkg/a.py": "from pkg import helpers\n",  # a submodule
                                "pkg/c.py": "from pkg import VERSION\n",  # a name: the package
                                "pkg/helpers.py": ""})
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.helpers"} and graph["pkg.c"] == {"pkg"}
    assert cycles(graph) == [frozenset({"pkg", "pkg.c"})]


def test_facenet_jax_has_no_import_cycle():
    assert [sorted(cycle) for cycle in cycles(import_graph(PACKAGE))] == []
