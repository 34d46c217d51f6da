"""``make gpu-check`` as a user runs it: from a fresh copy of the checkout, no .venv, only a Python with torch.

Without CUDA it runs the whole pipeline at CPU smoke scale; these tests keep that pipeline working.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from checkout import copy_checkout

REPO = Path(__file__).resolve().parents[2]
PARTS = ["build", "tests", "reinmax", "sign_optim", "admin", "moe", "vae"]
TABLES = {"reinmax": "reinmax_speed.md", "sign_optim": "bench_sign_optim.md", "admin": "admin_layers_speed.md",
          "moe": "moe_layer_speed.md", "vae": "vae_paper.md"}


@pytest.fixture(scope="module")
def fresh_checkout(tmp_path_factory):
    """What a clone of this working tree holds (tracked and untracked files git does not ignore), no build."""
    return copy_checkout(tmp_path_factory.mktemp("checkout"))


@pytest.mark.slow
def test_gpu_check_runs_every_part_on_cpu_from_a_fresh_checkout(fresh_checkout, shared_data, tmp_path):
    # MNIST beside the code, the way it travels to a GPU machine (shared/ is ignored by git)
    shutil.copytree(shared_data / "mnist", fresh_checkout / "shared" / "data" / "mnist")
    out = tmp_path / "out"
    run = subprocess.run(["make", "gpu-check", f"PYTHON={sys.executable}", f"OUT={out}"], cwd=fresh_checkout,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    first = next(line for line in run.stdout.splitlines() if line.startswith("gpu-check:"))
    assert "no CUDA device" in first and "CPU at smoke scale" in first
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["parts"]) == PARTS and summary["cuda"] is False
    assert all(p["status"] == "ok" for p in summary["parts"].values()), summary
    assert "fused CPU kernel: loaded" in (out / "build.log").read_text()  # built in place in the fresh copy
    assert list((fresh_checkout / "sign_optim").glob("_C*.so"))
    assert "skipped" in (out / "tests.log").read_text()  # the cuda tests were collected, and skipped on CPU
    for part, table in TABLES.items():
        assert (out / part / table).read_text().count("|") > 10, part
    assert "| 8x4 |" in (out / "vae" / "vae_paper.md").read_text()
    assert "| vae | ok |" in (out / "SUMMARY.md").read_text()


@pytest.mark.slow
def test_a_failing_part_is_reported_and_the_rest_still_run(fresh_checkout, tmp_path):
    broken = tmp_path / "tree"
    shutil.copytree(fresh_checkout, broken)
    (broken / "benchmarks" / "bench_moe_layer.py").write_text("raise SystemExit(3)\n")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(out), "--only", "moe,admin,vae",
                          "--data", str(tmp_path / "no-mnist")], cwd=broken, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    parts = json.loads((out / "summary.json").read_text())["parts"]
    assert parts["moe"]["status"] == "failed (exit 3)"
    assert parts["moe"]["command"][1:3] == ["-m", "benchmarks.bench_moe_layer"]
    assert parts["admin"]["status"] == "ok"
    assert parts["vae"]["status"].startswith("skipped: MNIST not found")


def test_unknown_part_is_one_line_exit_2():
    run = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--only", "tests,warp"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "--only" in run.stderr and "warp" in run.stderr


@pytest.mark.parametrize("cuda", [False, True])
def test_every_benchmark_is_launched_as_a_module_of_the_package(cuda, tmp_path):
    """``python -m benchmarks.<name>`` (run_logged starts it in the checkout's root, also put on PYTHONPATH)."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_under_test", REPO / "tools" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    args = argparse.Namespace(data=tmp_path, remaining=300.0)
    commands = {part.name: [str(c) for c in part.command(args, cuda, tmp_path)] for part in gpu_check.PARTS}
    launched = {name: cmd[cmd.index("-m") + 1] for name, cmd in commands.items()
                if "-m" in cmd and cmd[cmd.index("-m") + 1].startswith("benchmarks.")}
    assert set(launched) == {"reinmax", "sign_optim", "admin", "moe", "vae"}
    for module in launched.values():
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module
    assert not any("benchmarks" in c and c.endswith(".py") for cmd in commands.values() for c in cmd)


def _gpu_check_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("out", ["a_file", "a_file/below"])
def test_an_out_that_is_a_file_is_one_line_exit_2(tmp_path, out):
    """OUT=<a file> (or a path under one): one line naming --out on stderr, exit 2, the file unchanged, no part run."""
    (tmp_path / "a_file").write_text("keep me")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--out", out, "--only", "tests"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error: --out ") and "a_file" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert (tmp_path / "a_file").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("out", ["rel", "nested/rel", "./rel/"])
def test_a_relative_out_puts_every_part_under_it(tmp_path, monkeypatch, out):
    """Run from another directory with a relative --out: every part's table lands under that OUT (the parts run
    from the checkout's root), nothing in the checkout."""
    gpu_check = _gpu_check_module()
    table = "import sys, pathlib; pathlib.Path(sys.argv[1], 'table.md').write_text('| x |')"

    def command(args, cuda, part_out):
        return [sys.executable, "-c", table, str(part_out)]

    monkeypatch.setattr(gpu_check, "PARTS", [gpu_check.Part("one", 1, command), gpu_check.Part("two", 1, command)])
    monkeypatch.setattr(gpu_check, "describe_machine", lambda cuda: "test machine")
    monkeypatch.chdir(tmp_path)
    before = set((REPO / Path(out).parts[0]).glob("**/*")) if (REPO / Path(out).parts[0]).exists() else set()
    assert gpu_check.main(["--out", out, "--only", "one,two", "--cpu"]) == 0
    for part in ("one", "two"):
        assert (tmp_path / out / part / "table.md").read_text() == "| x |"
        assert (tmp_path / out / f"{part}.log").exists()
    assert (tmp_path / out / "SUMMARY.md").exists()
    after = set((REPO / Path(out).parts[0]).glob("**/*")) if (REPO / Path(out).parts[0]).exists() else set()
    assert after == before
