"""benchmarks.foresight / foresight_analysis: the onsets on hand-made loss curves, the peers' detectors
against trainscope's own classes (the re-implementations must agree with the package), the z-score rule
written out, the head-to-head counts, and one real (tiny) run with its per-update signals."""

import math
import random
import statistics

import pytest

from benchmarks import foresight as fs
from benchmarks import foresight_analysis as fa


def test_rise_onset_is_where_the_loss_stays_above_its_running_minimum():
    losses = [5.0 - 0.02 * i for i in range(60)] + [6.0] * 60   # learns to 3.82, then jumps to 6.0
    # smoothed over 10: passes 1.05 x min(before) once 2 of the 10 are 6.0 (mean 4.29 > 1.05 * 3.97) -> 61
    u = fa.rise_onset(losses)
    sm = fa.smooth(losses)
    assert u == next(t for t in range(10, len(sm)) if sm[t] > 1.05 * min(sm[:t]))
    assert fa.rise_onset([5.0 - 0.01 * i for i in range(100)]) is None


def test_stall_onset_needs_the_twin_to_improve():
    flat = [5.0] * 40 + [4.8] * 100                   # learns a little (at 40), then stalls
    twin = [5.0 - 0.01 * i for i in range(140)]       # keeps improving, ahead of it from update 20 on
    u = fa.stall_onset(flat, twin)
    # within 1% of the plateau (4.8 / 0.99 = 4.848): the smoothed loss passes below it at update 47
    assert u == 47 and fa.smooth(flat)[47] == pytest.approx(4.84) and fa.smooth(flat)[46] > 4.8 / 0.99
    assert fa.stall_onset(flat, flat) is None          # a twin that stalls too: no onset
    assert fa.own_onset(flat, twin) == u


def _noisy(seed, n=150, jump_at=100):
    rng = random.Random(seed)
    return [4.0 + 0.05 * rng.gauss(0, 1) + (1.5 if i >= jump_at else 0.0) for i in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cusum_and_crossing_reimplementations_agree_with_trainscope(seed):
    ts = pytest.importorskip("trainscope")  # noqa: F841
    from trainscope.analysis import first_crossing_step
    from trainscope.core.detectors import ChangePointDetector

    xs = _noisy(seed)
    assert fa.cusum_reimpl(xs) == fa.first_call(ChangePointDetector(), xs)
    assert fa.crossing_reimpl(xs) == first_crossing_step(xs)


def test_zscore_alarm_is_the_rule_written_out():
    xs = _noisy(3)
    want = None
    for i in range(len(xs)):
        past = xs[max(0, i - 50): i]
        if len(past) >= 20 and (xs[i] - statistics.fmean(past)) / statistics.pstdev(past) > 3.0:
            want = i
            break
    assert fa.zscore_alarm(xs, 3.0, 50) == want == 100


def test_score_counts_hits_late_missed_and_false_alarms():
    rows = [{"run": "a", "failed": True, "reference_update": 50, "separation": 40},
            {"run": "b", "failed": True, "reference_update": 50, "separation": None},
            {"run": "c", "failed": True, "reference_update": 50, "separation": 45},
            {"run": "d", "failed": False, "reference_update": None, "separation": None},
            {"run": "e", "failed": False, "reference_update": None, "separation": None}]
    s = fa.score(rows, {"a": 45, "b": 48, "c": None, "d": 10, "e": None})
    assert (s["hits"], s["late"], s["missed"], s["false_alarms"], s["failing"], s["stable"]) == (1, 1, 1, 1, 3, 2)
    assert s["median_lead"] == 3.5 and s["median_sep_lead"] == -5


def test_an_alarm_before_the_first_corrupted_batch_is_no_warning_of_it():
    # the grid's bad-data candidate: round(frac * 16) >= 1 first at frac = 4/100 (0.64 rows), update 203
    st = dict(noise_from=200, noise_ramp=100)
    assert fa.first_corrupted_update(st) == 203 and fa.first_corrupted_update({}) is None
    rows = [{"run": "x", "failed": True, "reference_update": 210, "separation": 210, "injected_at": 203}]
    assert fa.score(rows, {"x": 150})["missed"] == 1  # fired on data identical to the clean twin's
    assert (fa.score(rows, {"x": 203})["hits"], fa.score(rows, {"x": 206})["late"]) == (1, 1)


def test_the_default_interval_replays_only_its_own_records():
    def hist(per_10):  # the largest attention logit growing x per_10 every 10 updates, logged every 10
        return [{"step": s, "quantities": {"attn_logit_max": {"a": 1.0 * per_10 ** (s / 10)}}} for s in range(0, 310, 10)]

    # x1.12 per 10 updates: never the doubling per 10 updates (growth_span 10) the rule asks, at either interval;
    # per logged step the interval of 100 saw x3 per record and warned at 300 (before growth_span)
    slow = hist(3 ** 0.1)
    assert fa.monitor_default({"monitor": slow}) is None
    assert fa.monitor_default({"monitor": slow}, every=100) is None
    # x2.5 per 10 updates: past 20 at update 40 (2.5^4 = 39), the 3rd record of a doubling; at every 100 the
    # 3rd record (update 200) grew 2.5^10 = 9537 >= 2^10 = 1024 per record
    fast = hist(2.5)
    assert fa.monitor_default({"monitor": fast}) == 40
    assert fa.monitor_default({"monitor": fast}, every=100) == 200


def _stream_run(values):
    return {"signals": {"grad_rms_eps_min": list(values), "loss": [4.0] * len(values),
                        "grad_norm": [1.0] * len(values), "log_z_rms": [7.0] * len(values)}}


@pytest.mark.parametrize("drop", [2.6, 3.5, 5.5])
def test_calibrated_factor_is_the_margin_over_the_stable_runs_written_out(drop):
    """A stable run whose signal falls x``drop`` and stays: its ratio (held for any persist) is ``drop``; the
    calibrated factor is the smallest of FACTORS with factor / MARGIN above it."""
    stable = _stream_run([1000.0] * 40 + [1000.0 / drop] * 60)
    runs = {"s": stable}
    shape = dict(baseline=20, lag=5, smooth=3, persist=3, start=20)
    want = min(f for f in fa.FACTORS if f / fa.MARGIN > drop)
    assert fa.calibrated_factor(runs, ["s"], "grad_rms_eps_min", "falling", shape) == want
    assert want == {2.6: 4.0, 3.5: 6.0, 5.5: 10.0}[drop]


def test_select_rules_keeps_the_most_warnings_then_the_longest_persist():
    from stability_toolbox.signal_detector import SignalRule

    short = SignalRule("grad_rms_eps_min", 4.0, "falling", baseline=20, lag=5, persist=3)
    held = SignalRule("grad_rms_eps_min", 4.0, "falling", baseline=20, lag=5, persist=5)
    other = SignalRule("grad_norm", 3.0, "rising", persist=3)
    # equal coverage: the longer persist; a rule covering nothing new is dropped; one covering more goes first
    assert fa.select_rules([(short, {"a", "b"}), (held, {"a", "b"}), (other, {"b"})]) == [held]
    assert fa.select_rules([(short, {"a", "b", "c"}), (held, {"a", "b"}), (other, {"d"})]) == [short, other]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("within", [None, 7])
def test_rule_strength_is_the_factor_at_which_the_detector_starts_firing(seed, within):
    """`rule_strength`: the rule at 0.999 x it fires by ``until`` (the detector itself), at 1.001 x it does not."""
    from stability_toolbox.signal_detector import SignalRule, first_alarm

    rng = random.Random(seed)
    xs = [1000.0 * math.exp(rng.gauss(0, 0.3)) for _ in range(40)] + \
        [200.0 * math.exp(rng.gauss(0, 0.8)) for _ in range(40)]   # a noisy fall of ~x5
    shape = dict(direction="falling", baseline=20, lag=5, smooth=3, persist=4, start=20, within=within)
    until = 60
    f = fa.rule_strength(xs, SignalRule("g", 2.0, **shape), until)
    assert f > 1.5

    def fires(factor):
        w = first_alarm({"g": xs[: until + 1]}, [SignalRule("g", factor, **shape)])
        return w is not None

    assert fires(f * 0.999) and not fires(f * 1.001)


def test_select_rules_breaks_a_tie_of_equal_holds_by_the_separation():
    from stability_toolbox.signal_detector import SignalRule

    in_a_row = SignalRule("grad_rms_eps_min", 4.0, "falling", baseline=20, lag=5, persist=5)
    windowed = SignalRule("grad_rms_eps_min", 4.0, "falling", baseline=20, lag=5, persist=5, within=8)
    short = SignalRule("grad_rms_eps_min", 4.0, "falling", baseline=20, lag=5, persist=3)
    cands = [(short, {"a", "b"}, 3.0), (in_a_row, {"a", "b"}, 1.7), (windowed, {"a", "b"}, 1.9)]
    # the hold first (5 over 3, whatever its separation), then the separation
    assert fa.select_rules(cands) == [windowed]
    assert fa.select_rules([(short, {"a", "b"}, 3.0), (in_a_row, {"a", "b"}, 1.7)]) == [in_a_row]


def test_separation_is_the_weakest_failing_run_over_the_strongest_stable_one():
    from stability_toolbox.signal_detector import SignalRule

    rule = SignalRule("g", 2.0, "falling", baseline=20, lag=5, smooth=1, persist=1, start=20)
    runs = {"calm": {"signals": {"g": [1000.0] * 30 + [500.0] * 30}},      # falls x2 and stays
            "fail": {"signals": {"g": [1000.0] * 30 + [125.0] * 30}}}      # falls x8 at update 30
    # the failing run reaches x8 by its reference update - 5 = 35; the calm one x2: 8 / 2
    assert fa.separation(runs, ["calm"], {"fail": 40}, rule) == pytest.approx(4.0)
    assert fa.separation(runs, ["calm"], {}, rule) == 0.0


def test_calibration_on_seed_1_reproduces_the_shipped_defaults():
    """The committed calibration inputs (seed 1's reference-stack runs only, written by `analyze`) give
    DEFAULT_SIGNAL_RULES exactly when the calibration is re-run on them."""
    from stability_toolbox.signal_detector import DEFAULT_SIGNAL_RULES

    runs, rows, seeds, excluded = fa.read_calibration_inputs(fs.OUT / fa.CALIBRATION_FILE)
    assert seeds == fs.CALIBRATION_SEEDS and excluded == fs.UNSEEN_GROUPS
    assert {r["seed"] for r in rows} == set(fs.CALIBRATION_SEEDS) and not {r["group"] for r in rows} & excluded
    assert any(r["failed"] for r in rows) and any(not r["failed"] for r in rows)
    rules, _ = fa.calibrate_monitor_defaults(runs, rows, seeds, excluded)
    assert list(rules) == list(DEFAULT_SIGNAL_RULES)


def test_noise_fraction_ramps_up():
    st = dict(noise_from=10, noise_ramp=4)
    assert [fs.noise_fraction(t, st) for t in (9, 10, 11, 13, 20)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert fs.noise_fraction(100, {}) == 0.0


@pytest.mark.slow
def test_a_tiny_real_run_records_every_update(tmp_path, monkeypatch):
    import torch

    gen = torch.Generator().manual_seed(0)   # word ids standing in for Multi30k (the loop is what is tested)
    monkeypatch.setattr(fs.sg, "load_data", lambda: (torch.randint(0, fs.sg.VOCAB, (500,), generator=gen),
                                                     torch.randint(0, fs.sg.VOCAB, (200,), generator=gen)))
    settings = dict(model="tnn", norm_first=True, depth=1, lr=1e-3, warmup=2)
    job = [("g__tiny__s1", settings, 1, {"group": "g", "variant": "tiny", "role": "twin"})]
    fs.run_grid(job, tmp_path, budget_min=5.0, updates=3)
    runs = fa.load_runs(tmp_path)
    r = runs["g__tiny__s1"]
    assert len(r["signals"]["loss"]) == 3 and r["signals"]["loss"][0] == pytest.approx(math.log(fs.sg.VOCAB), abs=0.5)
    assert all(v > 0 for v in r["signals"]["attn_logit_max"]) and len(r["signals"]["linear_rms_gmean"]) == 3
    assert [h["step"] for h in r["monitor"]] == [0]
    mtime = (tmp_path / "g__tiny__s1.json").stat().st_mtime
    fs.run_grid(job, tmp_path, budget_min=5.0, updates=3)   # done before: skipped
    assert (tmp_path / "g__tiny__s1.json").stat().st_mtime == mtime
