"""The shared timing harness of benchmarks/: interleaving, warm-up, statistics."""

import time

import pytest

from benchmarks.harness import machine, time_interleaved


def test_interleaves_in_shuffled_order_after_warmup():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    out = time_interleaved(fns, reps=20, warmup=2, seed=3)
    assert calls[:8] == list("abcd") * 2  # warm-up: every candidate, untimed
    timed = calls[8:]
    rounds = [timed[i:i + 4] for i in range(0, len(timed), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)  # each repetition runs every candidate once
    assert len({tuple(r) for r in rounds}) > 5  # ... in a fresh random order
    assert all(v["reps"] == 20 and len(v["samples_s"]) == 20 for v in out.values())


def test_median_and_iqr_order_candidates_by_cost():
    out = time_interleaved({"short": lambda: time.sleep(0.001), "long": lambda: time.sleep(0.008)}, reps=7, inner=2)
    assert 0.9 < out["short"]["median_ms"] < out["long"]["median_ms"]
    assert out["long"]["median_ms"] >= 7.9  # a call lasts at least its sleep; per-call, not per inner batch
    for v in out.values():
        assert v["q1_ms"] <= v["median_ms"] <= v["q3_ms"] and v["iqr_ms"] == pytest.approx(v["q3_ms"] - v["q1_ms"])


def test_progress_reports_every_repetition_and_machine_names_torch():
    seen = []
    time_interleaved({"x": lambda: None}, reps=3, progress=lambda rep, last: seen.append((rep, set(last))))
    assert seen == [(1, {"x"}), (2, {"x"}), (3, {"x"})]
    assert "torch " in machine() and "cores" in machine()


def test_paired_differences_are_aligned_by_repetition():
    from benchmarks.harness import paired_differences

    calls = []
    ticks = iter(range(10 ** 6))
    out = paired_differences({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=5,
                             clock=lambda: float(next(ticks)))
    assert calls[:2] in (["a", "b"], ["b", "a"]) and len(calls) == 12  # one untimed call each, then 5 of each
    assert out == {"a": [1.0] * 5, "b": [1.0] * 5}  # each sample is one tick of the fake clock


def test_median_with_interval_brackets_the_median():
    import random
    import statistics

    from benchmarks.harness import median_with_interval

    values = [random.Random(3).gauss(0, 1) for _ in range(200)]
    m, lo, hi = median_with_interval(values)
    assert m == statistics.median(values) and lo <= m <= hi and hi - lo < 0.5


def test_stable_allocator_says_whether_it_applied():
    import subprocess
    import sys

    # in a process of its own: mallopt would change this test worker's allocator for every later test
    code = ("import platform; from benchmarks.harness import stable_allocator; "
            "assert stable_allocator() is (platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc')")
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, timeout=120).returncode == 0
