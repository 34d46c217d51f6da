"""The paired benchmarks' command lines and statistics used wrongly: each bad argument is one line and exit 2
before any model is built or timed (and no results file written); the harness' paired statistics refuse what
has no median."""

import statistics

import pytest

from benchmarks import bench_admin_hf, bench_admin_hf_parts
from benchmarks import hf_families as H
from benchmarks.harness import median_with_interval, paired_differences

_BAD = {
    "hidden 0": ["--hidden", "0"],
    "hidden 6 (4 heads)": ["--hidden", "6"],
    "layers 0": ["--layers", "0"],
    "unknown second family": ["--families", "bart", "nope"],
}


@pytest.fixture
def no_build(monkeypatch):
    """Building a model is an error: a refusal must come before it."""
    def build(family):
        raise AssertionError(f"built {family} before refusing the arguments")
    monkeypatch.setattr(H, "build", build)


@pytest.mark.parametrize("paired", [[], ["--paired", "2"]], ids=["rounds", "paired"])
@pytest.mark.parametrize("bad", sorted(_BAD))
def test_bench_admin_hf_refuses_before_building(tmp_path, capsys, no_build, bad, paired):
    """--hidden 0 was a ZeroDivisionError traceback, 6 a ValueError from inside transformers, --layers 0 one from
    admin_torch.convert, and an unknown family after a known one was refused only after the known one ran."""
    with pytest.raises(SystemExit) as e:
        bench_admin_hf.main(_BAD[bad] + paired + ["--out", str(tmp_path / "x.md")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and ": error: --" in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "x.md").exists()


@pytest.mark.parametrize("bad", sorted(_BAD) + ["no family"])
def test_bench_admin_hf_parts_refuses_before_building(tmp_path, capsys, no_build, bad):
    """The same for the parts benchmark; an empty --families wrote an empty table over the results file."""
    argv = ["--families"] if bad == "no family" else _BAD[bad]
    with pytest.raises(SystemExit) as e:
        bench_admin_hf_parts.main(argv + ["--reps", "2", "--out", str(tmp_path / "x.md")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and ": error: --" in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "x.md").exists()


def test_bench_admin_hf_parts_refuses_a_family_without_rescale_sum(tmp_path, capsys):
    """BERT-like layers scale x (scaled_input) and never call rescale_sum: the three variants were the same model,
    timed and tabulated as if they differed."""
    with pytest.raises(SystemExit) as e:
        bench_admin_hf_parts.main(["--families", "bart", "bert", "--reps", "2", "--out", str(tmp_path / "x.md")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "'bert' never calls OmegaResidual.rescale_sum" in err[-1]
    assert not (tmp_path / "x.md").exists()


def test_bench_admin_hf_parts_makes_the_out_directory(tmp_path, monkeypatch):
    """--out in a directory not made yet: the run ended in FileNotFoundError after timing everything."""
    monkeypatch.setattr(bench_admin_hf_parts, "stable_allocator", lambda: False)
    monkeypatch.setattr(bench_admin_hf_parts, "paired_differences",  # no timing: fixed samples, stock 1 ms
                        lambda fns, reps, clock: {k: [1e-3 + 1e-5 * (k != "stock")] * reps for k in fns})
    out = tmp_path / "new" / "dir" / "parts.md"
    bench_admin_hf_parts.main(["--hidden", "8", "--layers", "1", "--reps", "2", "--out", str(out)])
    row = next(line for line in out.read_text().splitlines() if line.startswith("| bart |"))
    assert row.count("+1.00%") == 12  # each of the 4 variants 0.01 ms over a 1 ms stock step: median and both ends


@pytest.mark.parametrize("values, resamples", [([], 1000), ([1.0, 2.0], 0), ([1.0], -1)])
def test_median_with_interval_refuses_what_has_no_median(values, resamples):
    """No values was statistics' StatisticsError, no resample an IndexError: ValueError naming the argument."""
    with pytest.raises(ValueError, match="values|resamples"):
        median_with_interval(values, resamples=resamples)


@pytest.mark.parametrize("resamples", [1, 10, 19, 1000])
def test_median_with_interval_is_symmetric_in_its_resamples(resamples):
    """The interval's ends are the k-th smallest and k-th largest bootstrap median (written out here): with 10
    resamples the upper end was the second largest while the lower was the smallest."""
    import random

    values = [random.Random(5).random() for _ in range(30)]
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    k = int(0.05 * resamples)
    assert median_with_interval(values, resamples=resamples) == (statistics.median(values), meds[k], meds[-1 - k])


@pytest.mark.parametrize("reps, fns", [(0, {"a": lambda: None}), (-3, {"a": lambda: None}), (2, {}),
                                       (2, {"a": 1})])
def test_paired_differences_refuses_no_repetition_or_no_callable(reps, fns):
    with pytest.raises((ValueError, TypeError), match="reps|fns"):
        paired_differences(fns, reps)
