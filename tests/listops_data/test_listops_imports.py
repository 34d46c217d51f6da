"""ListOps' data code and its data recipes are pure Python: they load neither torch nor fairseq.

Each check runs in a fresh interpreter (the project's python), since this test process has torch
loaded already, and lists the heavy modules left in ``sys.modules`` afterwards.
"""

import json
import os
import subprocess
import sys

from fairseq_helpers import REPO_ROOT as REPO
HEAVY = ("torch", "fairseq", "fairseq_plugins")

# run CODE (a statement), then print the heavy top-level packages it imported, as JSON
PROBE = """
import json, runpy, sys
{code}
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})))
"""


def heavy_modules_after(code: str) -> list:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(code=code, heavy=set(HEAVY))], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_listops_package_imports_neither_torch_nor_fairseq():
    assert heavy_modules_after("import listops_data, toolbox_core.checks, toolbox_core.files") == []


def test_the_ground_does_not_import_listops_until_its_old_name_is_asked_for():
    # listops sits a floor above toolbox_core: the deprecated name toolbox_core.listops is resolved on demand only
    code = ("import toolbox_core, toolbox_core.files, toolbox_core.validation\n"
            "assert 'listops_data' not in sys.modules\n"
            "import listops_data, toolbox_core.listops, stability_toolbox.listops\n"
            "assert toolbox_core.listops is listops_data is stability_toolbox.listops\n"
            "assert listops_data.__spec__.name == 'listops_data'  # the alias leaves the package's own spec alone")
    assert heavy_modules_after(code) == []


def _run_recipe(name, *args):
    """The heavy modules loaded by running ``recipes/listops/<name>.py args`` as a script in a fresh interpreter."""
    script = str(REPO / "recipes" / "listops" / f"{name}.py")
    argv = [script, *map(str, args)]
    return heavy_modules_after(f"sys.argv = {argv!r}\nrunpy.run_path({script!r}, run_name='__main__')")


def test_generate_recipe_imports_neither_torch_nor_fairseq(tmp_path):
    out = tmp_path / "gen.tsv"
    assert _run_recipe("generate", "--num-examples", 5, "--seed", 1, "--max-length", 20, "--output", out) == []
    assert len(out.read_text().splitlines()) == 5


def test_prepare_recipe_imports_neither_torch_nor_fairseq(tmp_path):
    dest = tmp_path / "data"
    assert _run_recipe("prepare", "--dest", dest, "--num-train", 5, "--num-eval", 3, "--max-length", 20,
                       "--official", tmp_path / "no-official") == []
    assert [len((dest / f"{split}.tsv").read_text().splitlines()) for split in ("train", "valid", "test")] == [5, 3, 3]


def test_package_import_is_torch_free():
    assert heavy_modules_after("import stability_toolbox") == []


def test_package_reexports_load_torch_on_first_use():
    """The monitor (torch-based) still imports lazily, and the probe sees torch once it is loaded, so the checks
    above are not vacuous."""
    loaded = heavy_modules_after("from stability_toolbox import StabilityMonitor; assert callable(StabilityMonitor)")
    assert "torch" in loaded and not any(m.split(".")[0] in ("fairseq", "fairseq_plugins") for m in loaded)


def test_the_data_check_switch_is_torch_free():
    """set_data_checks lives in the ground package (toolbox_core.validation), which imports no torch."""
    assert heavy_modules_after("from stability_toolbox import set_data_checks; set_data_checks(True)") == []
