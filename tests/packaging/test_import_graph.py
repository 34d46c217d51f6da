"""The libraries' import graph has floors: no import runs upward, sideways or in a circle.

Floor 0 is `toolbox_core` (shared helpers, no torch at import); floor 1 the libraries, which import only floor 0
(`listops_data`, the ListOps data code, torch-free, among them); floor 2 the live monitor (`stability_toolbox`), floor 3
the fairseq plugins. Every import is read from the source
(module level and inside functions alike), so an import hidden in a function is caught too.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FLOORS = {"toolbox_core": 0, "admin_torch": 1, "listops_data": 1, "reinmax": 1, "sign_optim": 1, "stability_toolbox": 2,
          "fairseq_plugins": 3}
#: the only upward edges, drawn here: a deprecated name of a module that moved up, resolved when the old name is
#: imported (an alias module nothing in the lower package imports), so the lower package never imports the upper one itself
MOVED_UP = {("toolbox_core", "listops_data")}


def dynamic_import(node: ast.AST):
    """The module an ``importlib.import_module(...)`` / ``__import__(...)`` call imports: its name when it is a
    string constant, ``"."`` when it is relative to the calling package (``f"{__name__}.x"``, or a package=
    argument), None for any other node; ``"?"`` for a name the source does not spell out."""
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if called not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return "." if arg.value.startswith(".") else arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values:
        first = arg.values[0]
        if isinstance(first, ast.FormattedValue) and isinstance(first.value, ast.Name) and \
                first.value.id in ("__name__", "__package__", "package"):
            return "."
        if isinstance(first, ast.Constant) and str(first.value).startswith("."):
            return "."
    return "?"


def imports_of(package: str):
    """(file, line, imported package, at module level?) for every import of another of the project's packages:
    import statements, and ``importlib.import_module`` calls (an import the graph cannot read is an error)."""
    for path in sorted((REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif dynamic_import(node) is not None:
                name = dynamic_import(node)
                assert name != "?", f"{path.relative_to(REPO)}:{node.lineno}: an import the graph cannot read"
                names = [] if name == "." else [name]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root in FLOORS and root != package:
                    yield path.relative_to(REPO), node.lineno, root, id(node) in top


@pytest.mark.parametrize("package", list(FLOORS))
def test_no_import_runs_upward_or_sideways(package):
    bad = [f"{path}:{line} imports {target} (floor {FLOORS[target]})"
           for path, line, target, top in imports_of(package)
           if FLOORS[target] >= FLOORS[package] and (package, target) not in MOVED_UP]
    assert not bad, f"{package} is on floor {FLOORS[package]}: " + "; ".join(bad)


def test_the_moved_up_aliases_are_the_drawn_ones():
    """Each drawn upward edge exists (an alias that is gone is undrawn here too) and is the only edge of its kind."""
    upward = {(package, target) for package in FLOORS for _, _, target, _ in imports_of(package)
              if FLOORS[target] > FLOORS[package]}
    assert upward == MOVED_UP


def test_the_package_graph_has_no_circle():
    graph = {p: {t for _, _, t, _ in imports_of(p) if (p, t) not in MOVED_UP} for p in FLOORS}

    def reaches(start, goal, seen=()):
        return any(t == goal or (t not in seen and reaches(t, goal, (*seen, t))) for t in graph[start])

    assert not [p for p in FLOORS if reaches(p, p)]


@pytest.mark.parametrize("package", ["toolbox_core", "listops_data"])
def test_torch_free_packages_import_no_torch_at_module_level(package):
    for path in sorted((REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("torch", "numpy", "fairseq") for n in names), f"{path}: {names}"


# ---------------------------------------------------------------- inside admin_torch: a core below its adapter

ADMIN_TORCH = REPO / "admin_torch"
#: admin_torch's HuggingFace adapter, and the public modules above it: the only ones that may import it. Every other
#: module is the pure-torch core (stacks, hooks, conversion, folding and the rest), below the adapter.
ADMIN_ADAPTER = "hf_io"
#: the adapter's knowledge of HuggingFace's families (descriptions, refusals), imported by the adapter only
ADMIN_ADAPTER_MODULES = {ADMIN_ADAPTER, "hf_architectures"}
ADMIN_ABOVE_ADAPTER = {"__init__", "api"}
#: what only the adapter may import (inside its functions: importing admin_torch imports neither)
FRAMEWORKS = {"transformers", "safetensors"}


def module_graph(sources, package):
    """``{module: {modules of package it imports}}`` for ``sources`` (``{module name: source}``, ``__init__`` for the
    package itself), every import read, at module level and inside functions alike; ``from package import name``
    of a name that is not a module is an import of ``__init__``. Also ``{module: {other top-level packages}}``."""
    graph, external = {}, {}
    for name, source in sources.items():
        targets, others = set(), set()

        def add(parts, names=()):
            if parts:
                targets.add(parts[0] if parts[0] in sources else "__init__")
            else:  # from package import a, b: modules, or names of __init__
                targets.update(n if n in sources else "__init__" for n in names)

        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == package:
                        add(parts[1:] or ["__init__"])
                    else:
                        others.add(parts[0])
            elif isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{name}: an import from above {package}"
                parts = (node.module or "").split(".") if node.module else []
                if node.level == 0 and parts[0] != package:
                    others.add(parts[0])
                    continue
                add(parts[1:] if node.level == 0 else parts, [alias.name for alias in node.names])
        graph[name], external[name] = targets - {name}, others
    return graph, external


def admin_torch_graph():
    return module_graph({path.stem: path.read_text() for path in sorted(ADMIN_TORCH.glob("*.py"))}, "admin_torch")


def find_cycle(graph):
    """One import circle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target, path + [target])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def reachable(graph, start):
    seen, todo = set(), list(graph[start])
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += graph.get(node, ())
    return seen


def test_the_module_graph_reads_imports_inside_functions_and_from_the_package_root():
    sources = {
        "__init__": "from .a import f\nfrom .b import g\n",
        "a": "import torch\nfrom . import b\n",
        "b": "def g():\n    from admin_torch import f\n    import admin_torch.a\n    from transformers import x\n",
    }
    graph, external = module_graph(sources, "admin_torch")
    assert graph == {"__init__": {"a", "b"}, "a": {"b"}, "b": {"__init__", "a"}}
    assert external == {"__init__": set(), "a": {"torch"}, "b": {"transformers"}}
    assert find_cycle(graph) in (["__init__", "a", "b", "__init__"], ["a", "b", "a"])
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_admin_torch_modules_import_in_no_circle():
    """Not at module level, and not hidden in a function either (the core once imported the HuggingFace adapter
    inside convert and fold while the adapter imported them)."""
    graph, _ = admin_torch_graph()
    assert {"stacks", "hooks", "conversion", "folding", "adapter", "api", ADMIN_ADAPTER} <= set(graph)
    assert {"conversion", "folding", "adapter"} <= graph[ADMIN_ADAPTER]  # the adapter sits on the core
    assert {"conversion", "folding", ADMIN_ADAPTER} <= graph["api"]
    cycle = find_cycle(graph)
    assert cycle is None, "admin_torch imports in a circle: " + " -> ".join(cycle)


def test_the_admin_torch_core_never_imports_its_huggingface_adapter():
    graph, external = admin_torch_graph()
    core = set(graph) - ADMIN_ABOVE_ADAPTER - ADMIN_ADAPTER_MODULES
    bad = sorted(m for m in core if reachable(graph, m) & (ADMIN_ADAPTER_MODULES | ADMIN_ABOVE_ADAPTER))
    assert not bad, f"{bad} reach the HuggingFace adapter {ADMIN_ADAPTER} (or the modules above it)"
    framework = sorted(f"{m} imports {sorted(external[m] & FRAMEWORKS)}" for m in core if external[m] & FRAMEWORKS)
    assert not framework, f"the core is pure torch: {framework}"


def test_dynamic_imports_are_read():
    """``importlib.import_module("stability_toolbox")`` inside admin_torch would be an upward import the statements
    do not show (the lazy ``admin_torch.StabilityMonitor`` alias once was one)."""
    def first_call(source):
        return next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call))

    assert dynamic_import(first_call('importlib.import_module("stability_toolbox")')) == "stability_toolbox"
    assert dynamic_import(first_call('import_module(f"{__name__}.{m}")')) == "."
    assert dynamic_import(first_call('importlib.import_module(f".{m}", __name__)')) == "."
    assert dynamic_import(first_call("importlib.import_module(name)")) == "?"
    assert dynamic_import(first_call("print('x')")) is None


def test_the_huggingface_knowledge_sits_in_the_adapter():
    """HuggingFace's class tables, structural recognition and Pre-LN refusals live in hf_architectures, which only
    the adapter imports; the core's architectures module names no HuggingFace class."""
    graph, _ = admin_torch_graph()
    assert "hf_architectures" in graph[ADMIN_ADAPTER]
    assert [m for m in graph if "hf_architectures" in graph[m]] == [ADMIN_ADAPTER]
    assert "transformers." not in (ADMIN_TORCH / "architectures.py").read_text()
