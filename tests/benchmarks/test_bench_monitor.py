"""benchmarks.bench_monitor's A/B of the monitor against a git revision: the revision's package is its own copy
(its classes are not today's), a bad revision is refused, and a tiny run writes both tables with every row."""

import json
import subprocess
import sys

import pytest

from benchmarks import bench_monitor

# the A/B reads the revision with git: a copy of the sources without their history has none to compare with
pytestmark = pytest.mark.skipif(
    subprocess.run(["git", "rev-parse", "HEAD"], cwd=bench_monitor.REPO, capture_output=True).returncode != 0,
    reason="no git history here")


def test_the_revisions_package_is_a_separate_copy(tmp_path):
    import stability_toolbox

    ref = bench_monitor.load_package_at("HEAD", into=tmp_path)
    assert ref.__name__ == "stability_toolbox_at_HEAD"
    assert ref.StabilityMonitor is not stability_toolbox.StabilityMonitor
    # its modules import each other, not today's
    assert sys.modules["stability_toolbox_at_HEAD.monitor"].Probe.__module__ == "stability_toolbox_at_HEAD.probe"
    assert (tmp_path / "stability_toolbox_at_HEAD" / "monitor.py").is_file()
    assert str(tmp_path) not in sys.path  # the import path is untouched


@pytest.mark.parametrize("rev", ["HEAD; rm -rf x", "", "a b"])
def test_a_bad_revision_is_refused_by_name(rev, tmp_path):
    with pytest.raises(ValueError, match="rev"):
        bench_monitor.load_package_at(rev, into=tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_tiny_ab_run_writes_every_row(tmp_path):
    bench_monitor.main(["overhead-ab", "--layers", "1", "--dim", "16", "--batch", "2", "--tokens", "4", "--pairs",
                        "3", "--logged-pairs", "2", "--interval", "10", "--boot", "20", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "overhead_ab_cpu.json").read_text())
    rows = {(r["clock"], r["monitor"]) for r in data["rows"]}
    assert rows == {(c, m) for c in ("wall", "cpu") for m in ("ref", "new", "new - ref")}
    assert len(data["nonlog_s"]["bare"]) == 3 and len(data["logged_s"]["new"]) == 2
    text = (tmp_path / "overhead_ab_cpu.md").read_text()
    assert "every 10" in text and "today - HEAD" in text and data["ref_commit"] in text
