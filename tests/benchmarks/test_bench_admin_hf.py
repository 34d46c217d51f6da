"""benchmarks.bench_admin_hf's A/B against a git revision (``--ref``): the revision's admin_torch is its own copy,
its converted model is timed in the same rotation and the table says today / ref per family; a bad revision is one
line, exit 2."""

import subprocess
import sys

import pytest

from benchmarks import bench_admin_hf
from benchmarks.harness import load_package_at

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(
    subprocess.run(["git", "rev-parse", "HEAD"], cwd=bench_admin_hf.HERE, capture_output=True).returncode != 0,
    reason="no git history here")


def test_the_revisions_admin_torch_is_a_separate_copy(tmp_path):
    import admin_torch

    ref = load_package_at("HEAD", "admin_torch", into=tmp_path)
    assert ref.__name__ == "admin_torch_at_HEAD" and ref.convert is not admin_torch.convert
    assert sys.modules["admin_torch_at_HEAD.residual"].OmegaResidual is not admin_torch.OmegaResidual


def test_a_tiny_ab_run_writes_today_over_the_revision(tmp_path):
    out = tmp_path / "hf.md"
    bench_admin_hf.main(["--hidden", "32", "--layers", "1", "--steps", "1", "--rounds", "2", "--threads", "1",
                         "--families", "bert", "--ref", "HEAD", "--out", str(out)])
    text = out.read_text()
    assert "--ref HEAD" in text and "| bert |" in text
    assert "- bert:  today / HEAD:" in text


def test_a_bad_revision_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_admin_hf", "--families", "bert", "--ref",
                           "no-such-rev", "--out", str(tmp_path / "x.md")], cwd=bench_admin_hf.HERE + "/..",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--ref" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.md").exists()


def test_a_tiny_paired_run_writes_both_columns(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_admin_hf, "stable_allocator", lambda: False)  # this worker's allocator as it is
    out = tmp_path / "paired.md"
    bench_admin_hf.main(["--hidden", "32", "--layers", "1", "--threads", "1", "--paired", "3", "--families", "bert",
                         "--ref", "HEAD", "--out", str(out)])
    text = out.read_text()
    assert "--paired 3" in text and "today - HEAD" in text
    row = next(line for line in text.splitlines() if line.startswith("| bert |"))
    assert row.count("%") == 6  # two cells of median [5%, 95%]


@pytest.mark.parametrize("value", ["1", "-2"])
def test_a_bad_paired_count_is_one_line_exit_2(tmp_path, value):
    with pytest.raises(SystemExit) as e:
        bench_admin_hf.main(["--paired", value, "--out", str(tmp_path / "x.md")])
    assert e.value.code == 2 and not (tmp_path / "x.md").exists()


def test_the_parts_run_puts_rescale_sum_back(tmp_path, monkeypatch):
    from admin_torch.residual import OmegaResidual
    from benchmarks import bench_admin_hf_parts

    monkeypatch.setattr(bench_admin_hf_parts, "stable_allocator", lambda: False)
    before = OmegaResidual.rescale_sum
    out = tmp_path / "parts.md"
    bench_admin_hf_parts.main(["--hidden", "32", "--layers", "1", "--reps", "2", "--out", str(out)])
    assert OmegaResidual.rescale_sum is before
    assert "| bart |" in out.read_text() and "hooks alone" in out.read_text()
