"""The libraries' import graph has floors: no import runs upward, sideways or in a circle.

Floor 0 is `toolbox_core` (shared helpers, no torch at import); floor 1 the libraries, which import only floor 0;
floor 2 the live monitor (`stability_toolbox`), floor 3 the fairseq plugins. Every import is read from the source
(module level and inside functions alike), so an import hidden in a function is caught too.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FLOORS = {"toolbox_core": 0, "admin_torch": 1, "reinmax": 1, "sign_optim": 1, "stability_toolbox": 2,
          "fairseq_plugins": 3}


def imports_of(package: str):
    """(file, line, imported package, at module level?) for every import of another of the project's packages."""
    for path in sorted((REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root in FLOORS and root != package:
                    yield path.relative_to(REPO), node.lineno, root, id(node) in top


@pytest.mark.parametrize("package", list(FLOORS))
def test_no_import_runs_upward_or_sideways(package):
    bad = [f"{path}:{line} imports {target} (floor {FLOORS[target]})"
           for path, line, target, _ in imports_of(package) if FLOORS[target] >= FLOORS[package]]
    assert not bad, f"{package} is on floor {FLOORS[package]}: " + "; ".join(bad)


def test_the_package_graph_has_no_circle():
    graph = {p: {t for _, _, t, _ in imports_of(p)} for p in FLOORS}

    def reaches(start, goal, seen=()):
        return any(t == goal or (t not in seen and reaches(t, goal, (*seen, t))) for t in graph[start])

    assert not [p for p in FLOORS if reaches(p, p)]


def test_the_ground_imports_no_torch_at_module_level():
    for path in sorted((REPO / "toolbox_core").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("torch", "numpy", "fairseq") for n in names), f"{path}: {names}"
