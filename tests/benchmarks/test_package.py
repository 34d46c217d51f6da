"""benchmarks/ is a package of runnable modules that import only the libraries and each other (absolutely)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = sorted(p for p in (REPO / "benchmarks").glob("*.py") if p.name != "__init__.py")
OWN = {p.stem for p in MODULES}
TEST_HELPERS = {p.stem for p in (REPO / "tests").rglob("*.py")} | {"tests", "conftest"}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or "")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_imports_are_absolute_and_never_from_tests(path):
    source = path.read_text(encoding="utf-8")
    assert "sys.path" not in source
    for name in _imports(path):
        top = name.split(".")[0]
        assert not name.startswith("."), f"{path.name}: relative import {name} (use benchmarks.<module>)"
        assert top not in OWN, f"{path.name}: bare 'import {name}' (use benchmarks.{name})"
        assert top not in TEST_HELPERS or top in OWN | {"benchmarks"}, f"{path.name}: imports {name} from tests/"
    paths = [n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and (n.value == "tests" or n.value.startswith("tests/") or "/tests/" in n.value)]
    assert not paths, f"{path.name}: a path into tests/ ({paths}): no loading of test files by path either"
    if path.name != "sweep.py":  # parallel runs go through sweep.run_jobs
        assert not any(pool in source for pool in ("concurrent.futures", "ThreadPool", "ProcessPool", "multiprocessing"))
    # result files through toolbox_core.files.atomic_write (sweep.write_json), no temp-file + rename by hand
    assert ".rename(" not in source and "os.replace(" not in source and "mkstemp" not in source
    if "def main(" in source:
        assert 'if __name__ == "__main__":' in source, f"{path.name}: main() without an entry point"


def test_the_package_is_this_checkouts():
    import benchmarks  # fairscale installs another top-level "benchmarks": the repository root must come first

    assert Path(benchmarks.__file__).resolve() == REPO / "benchmarks" / "__init__.py"


def test_a_benchmark_runs_as_a_module_from_the_repository_root():
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_monitor", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "python -m benchmarks.bench_monitor overhead" in run.stdout, run.stderr[-2000:]
