"""The house reads top-down: a package imports only the layers below it, and no two modules import each other.

Every module's imports are read with ``ast`` (function-level imports included: a lazy import is still a
dependency), relative imports resolved, and each module is placed in the layer of the longest prefix that names
it in :data:`LAYERS`. A layer may import its own layer and those below, never one above; a module that no layer
names fails the test (a new package must say where it sits). Imports that close a circle fail too, whether they
cross layers or not. ``msretrieval.`` (the installed name of every package) is stripped before matching.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Bottom to top. Data flows data -> models -> descriptors -> search -> metrics -> report: the search
#: primitives (score sources, FAISS indexes, shards) know nothing of networks, so the method interface, which
#: says how its descriptors compare, sits above them; the baselines are methods like any other, and the harness
#: and its benchmarks evaluate all of them.
LAYERS: list[list[str]] = [
    ["msretrieval", "utils"],
    ["data"],
    ["models"],
    ["losses", "miners"],
    ["retrieval", "retrieval.search"],
    ["retrieval.descriptors"],
    ["retrieval.aggregation"],
    ["baselines"],
    ["retrieval.evaluation"],
    ["release"],
    ["training"],
    ["train", "hubconf", "scripts"],
]
SKIP = {"tests", ".venv", "build", "dist"}


def source_modules(root: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the repository outside tests."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] in SKIP or parts[0].startswith("."):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path) -> list[tuple[str, list[str]]]:
    """What ``module`` imports, as (absolute dotted name, names taken from it): ``import a.b`` gives
    ("a.b", []), ``from a import b, c`` ("a", ["b", "c"]). A module that calls ``importlib.import_module``
    is taken to import every string constant in it that names a module (a plugin list)."""
    tree = ast.parse(path.read_text(), str(path))
    found, dynamic, strings = [], False, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Attribute) and node.attr == "import_module":
            dynamic = True
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.append(node.value)
    if dynamic:
        found.extend((text, []) for text in strings if text.replace(".", "").replace("_", "").isalnum())
    return [(_local_name(base), names) for base, names in found]


def _local_name(name: str) -> str:
    return name if name == "msretrieval" else name.removeprefix("msretrieval.")


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the repository modules it imports (each name resolved to the longest module prefix;
    ``from package import submodule`` counts as importing the submodule)."""
    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = defaultdict(set)
    for module, path in modules.items():
        for base, names in imported_names(module, path):
            submodules = [f"{base}.{name}" for name in names]
            targets = submodules if names and all(name in modules for name in submodules) else [base]
            for target in map(resolve, targets):
                if target and target != module:
                    graph[module].add(target)
    return graph


def layer_of(module: str) -> tuple[int, str] | None:
    """(layer index, unit) of the longest declared prefix naming ``module``."""
    best = None
    for index, units in enumerate(LAYERS):
        for unit in units:
            if (module == unit or module.startswith(unit + ".")) and (best is None or len(unit) > len(best[1])):
                best = (index, unit)
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
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
                    work.append((child, iter(sorted(graph.get(child, ())))))
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
                    found.append(sorted(component))
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` lines for every import of a module from a higher layer."""
    bad = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            if layer_of(target)[0] > layer_of(module)[0]:
                bad.append(f"{module} ({layer_of(module)[1]}) -> {target} ({layer_of(target)[1]})")
    return bad


def test_every_module_has_a_layer():
    assert [module for module in source_modules() if layer_of(module) is None] == []


def test_no_package_imports_one_above_it():
    assert upward_imports(import_graph(source_modules())) == []


def test_no_import_cycles():
    graph = import_graph(source_modules())
    assert cycles(graph) == []
    units = defaultdict(set)
    for module, imported in graph.items():
        units[layer_of(module)[1]].update(layer_of(target)[1] for target in imported)
    assert cycles({unit: targets - {unit} for unit, targets in units.items()}) == []


def test_the_checks_catch_what_they_guard(tmp_path):
    """The checker itself: an upward import, a two-module circle and an unplaced module are all found."""
    for name, text in {"utils/__init__.py": "", "utils/a.py": "from msretrieval.data.b import x\n",
                       "data/__init__.py": "", "data/b.py": "from . import c\n", "data/c.py": "import data.b\n",
                       "stray.py": ""}.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = source_modules(tmp_path)
    graph = import_graph(modules)
    assert upward_imports(graph) == ["utils.a (utils) -> data.b (data)"]
    assert cycles(graph) == [["data.b", "data.c"]]
    assert layer_of("stray") is None
