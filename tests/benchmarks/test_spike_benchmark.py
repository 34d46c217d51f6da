"""benchmarks/spike_benchmark.py: the guard's overhead measurement reports the whole-step paired difference with a
bootstrap interval (the median of the per-iteration differences, by wall clock and by CPU time), and the command
line refuses bad settings in one line."""

import json
import statistics

import pytest

from benchmarks import spike_benchmark


def test_overhead_reports_the_paired_whole_step_difference():
    out = spike_benchmark.overhead(reps=8, skip=2, size="toy")
    assert out["steps"] == 8 and out["events"] == 0
    for clock in ("wall", "cpu"):
        steps = out["steps_s"][clock]
        assert all(len(steps[arm]) == 8 for arm in ("none", "guard", "given"))
        for arm in ("guard", "given"):
            cell = out["step_paired_pct"][arm][clock]
            # written out: the median of each iteration's guarded minus unguarded step, over the unguarded median
            diffs = [g - n for g, n in zip(steps[arm], steps["none"])]
            assert cell["median"] == pytest.approx(100 * statistics.median(diffs) / statistics.median(steps["none"]))
            lo, hi = cell["interval_5_95"]
            assert lo <= cell["median"] <= hi


def test_the_command_line_refuses_bad_settings_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        spike_benchmark.main([str(tmp_path), "--methods", "nope"])
    assert err.value.code == 2 and "--methods: unknown 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        spike_benchmark.main([str(tmp_path), "--steps", "10"])
    assert err.value.code == 2 and "--steps" in capsys.readouterr().err


def test_an_output_directory_inside_the_repository_is_recorded_by_its_relative_path(tmp_path):
    inside = spike_benchmark.REPO / "results" / "guard"
    assert spike_benchmark._relative(str(inside)) == "results/guard"
    assert spike_benchmark._relative("results/guard") == "results/guard"  # a relative one stays (from any directory)
    assert spike_benchmark._relative(str(tmp_path)) == str(tmp_path)  # outside: as given (not committed)


def test_overhead_sizes_are_checked_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        spike_benchmark.main([str(tmp_path), "--overhead", "4", "--overhead-sizes", "toy,huge"])
    assert err.value.code == 2 and "--overhead-sizes: unknown 'huge'" in capsys.readouterr().err
    assert not (tmp_path / "overhead.json").exists()  # refused before anything ran


def test_measuring_one_size_keeps_the_others_in_overhead_json(tmp_path, monkeypatch):
    (tmp_path / "overhead.json").write_text('{"realistic": {"steps": 100}, "command": "old", "torch": "x"}')
    monkeypatch.setattr(spike_benchmark, "overhead", lambda reps, size: {"steps": reps, "size": size})
    assert spike_benchmark.main([str(tmp_path), "--overhead", "30", "--overhead-sizes", "toy,realistic_2k"]) == 0
    data = json.loads((tmp_path / "overhead.json").read_text())
    assert data["realistic"] == {"steps": 100}  # kept
    assert data["toy"]["steps"] == 30 and data["realistic_2k"]["steps"] == 20  # STEPS, and STEPS // 3 (at least 20)
    assert data["toy"]["command"].endswith("--overhead 30 --overhead-sizes toy,realistic_2k")
