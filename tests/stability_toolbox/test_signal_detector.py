"""stability_toolbox.signal_detector: the rule against a brute-force reading of its formula (hypothesis
streams), online == offline, and refused arguments."""

import math
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stability_toolbox.signal_detector import DEFAULT_SIGNAL_RULES, SignalDetector, SignalRule, detect, first_alarm


def brute_first_fire(xs, r):
    """The rule written out: level = median of the last `smooth`, base = median of the `baseline` values
    ending `lag + 1` before; held `persist` updates in a row from update `start`."""
    held = 0
    for t in range(len(xs)):
        if not math.isfinite(xs[t]):
            return t
        if t < r.lag + r.baseline or t < r.start:
            held = 0
            continue
        level = statistics.median(xs[max(0, t - r.smooth + 1): t + 1])
        base = statistics.median(xs[t - r.lag - r.baseline: t - r.lag])
        if r.direction == "rising":
            ok = base > 0 and level >= r.factor * base and (r.level is None or level >= r.level)
        else:
            ok = base > 0 and level * r.factor <= base and (r.level is None or level <= r.level)
        held = held + 1 if ok else 0
        if held >= r.persist:
            return t
    return None


def brute_first_fire_within(xs, r):
    """The hold with gaps written out: the first t at which the condition holds and holds on >= `persist` of
    the updates t - within + 1 .. t (an update before `start` or without a full baseline: not holding)."""
    holds = []
    for t in range(len(xs)):
        ok = False
        if t >= r.lag + r.baseline and t >= r.start:
            level = statistics.median(xs[max(0, t - r.smooth + 1): t + 1])
            base = statistics.median(xs[t - r.lag - r.baseline: t - r.lag])
            if r.direction == "rising":
                ok = base > 0 and level >= r.factor * base
            else:
                ok = base > 0 and level * r.factor <= base
        holds.append(ok)
        if ok and sum(holds[max(0, t - r.within + 1): t + 1]) >= r.persist:
            return t
    return None


within_rules = st.builds(SignalRule, signal=st.just("x"), factor=st.sampled_from([1.1, 1.5, 2.0, 4.0]),
                         direction=st.sampled_from(["rising", "falling"]), baseline=st.integers(1, 8),
                         lag=st.integers(0, 4), smooth=st.integers(1, 4), persist=st.just(2),
                         start=st.integers(0, 10), within=st.integers(2, 5))


@given(rule=within_rules, xs=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=40))
def test_a_hold_within_a_window_is_the_formula_written_out(rule, xs):
    w = first_alarm({"x": xs}, [rule])
    assert (None if w is None else w["update"]) == brute_first_fire_within(xs, rule)


def test_a_noisy_collapse_fires_within_its_window_and_not_in_a_row():
    """A signal at a tenth of its baseline that flickers back to it for 2 updates of every 6: the level (median
    of 3) holds 4 updates in a row, then 2 not (never 5 in a row); 5 of the last 8 at update 47 (held at 41-44
    and 47)."""
    from dataclasses import replace

    xs = [1000.0] * 40 + [1000.0 if i % 6 >= 4 else 100.0 for i in range(40)]
    consecutive = SignalRule("g", 4.0, "falling", baseline=20, lag=5, smooth=3, persist=5, start=20)
    windowed = replace(consecutive, within=8)
    assert first_alarm({"g": xs}, [consecutive]) is None
    assert first_alarm({"g": xs}, [windowed])["update"] == brute_first_fire_within(xs, windowed) == 47
    assert "5 of 8 updates" in first_alarm({"g": xs}, [windowed])["message"]
    # a window equal to the hold is the hold in a row
    steady = [1000.0] * 40 + [100.0] * 40
    assert first_alarm({"g": steady}, [replace(consecutive, within=5)])["update"] == \
        first_alarm({"g": steady}, [consecutive])["update"] == 45


def test_a_state_saved_before_within_existed_still_loads():
    r = SignalRule("a", 2.0, baseline=3, lag=0, smooth=1, persist=2, start=0)
    det = SignalDetector([r])
    for t, v in enumerate([1.0, 1.0, 1.0, 3.0]):
        det.update(t, {"a": v})
    old = det.state_dict()
    old["rules"] = [{k: v for k, v in d.items() if k != "within"} for d in old["rules"]]
    resumed = SignalDetector([r])
    resumed.load_state_dict(old)
    assert resumed.update(4, {"a": 3.0})[0]["update"] == 4   # held at 3 and 4: 2 in a row
    with pytest.raises(ValueError, match="state"):             # a windowed rule is another rule
        SignalDetector([SignalRule("a", 2.0, baseline=3, lag=0, smooth=1, persist=2, start=0, within=3)]
                       ).load_state_dict(old)


@pytest.mark.parametrize("within", [3, 65, 2.5])
def test_a_window_shorter_than_the_hold_or_too_long_is_refused(within):
    with pytest.raises((ValueError, TypeError), match="within"):
        SignalRule("g", 4.0, persist=4, within=within)


def test_a_windowed_rule_resumes_from_its_state():
    r = SignalRule("g", 4.0, "falling", baseline=20, lag=5, smooth=3, persist=5, start=20, within=8)
    xs = [1000.0] * 40 + [1000.0 if i % 6 >= 4 else 100.0 for i in range(40)]
    det = SignalDetector([r])
    for t in range(45):
        det.update(t, {"g": xs[t]})
    resumed = SignalDetector([r])
    resumed.load_state_dict(det.state_dict())
    assert [w["update"] for t in range(45, 80) for w in resumed.update(t, {"g": xs[t]})] == [47]

rules = st.builds(SignalRule, signal=st.just("x"), factor=st.sampled_from([1.1, 1.5, 2.0, 4.0]),
                  direction=st.sampled_from(["rising", "falling"]), baseline=st.integers(1, 8),
                  lag=st.integers(0, 4), smooth=st.integers(1, 4), persist=st.integers(1, 3),
                  level=st.sampled_from([None, 0.5, 2.0]), start=st.integers(0, 10))
streams = st.lists(st.floats(0.01, 100.0), min_size=1, max_size=40)


@given(rule=rules, xs=streams)
def test_first_alarm_is_the_formula_written_out(rule, xs):
    w = first_alarm({"x": xs}, [rule])
    assert (None if w is None else w["update"]) == brute_first_fire(xs, rule)


def test_online_equals_offline_and_each_rule_fires_once():
    rs = [SignalRule("a", 2.0, baseline=5, lag=1, smooth=1, persist=1, start=0),
          SignalRule("b", 2.0, "falling", baseline=5, lag=1, smooth=1, persist=2, start=0)]
    stream = {"a": [1.0] * 10 + [3.0] * 10, "b": [1.0] * 12 + [0.1] * 8}
    det = SignalDetector(rs)
    online = [w for t in range(20) for w in det.update(t, {k: v[t] for k, v in stream.items()})]
    offline = detect(stream, rs)
    assert [(w["update"], w["signal"]) for w in online] == [(w["update"], w["signal"]) for w in offline] \
        == [(10, "a"), (13, "b")]
    assert "stability warning: update 10: a rose" in online[0]["message"]


def test_a_non_finite_value_holds_the_rule_and_a_missing_signal_is_skipped():
    r = SignalRule("a", 2.0, baseline=50, lag=10, persist=3, start=2)
    det = SignalDetector([r])
    assert det.update(0, {"b": 1.0}) == []
    assert det.update(1, {"a": float("nan")}) == []          # before start: nothing
    assert det.update(2, {"a": float("inf")}) == []          # one isolated overflow (fp16 GradScaler): nothing
    assert det.update(3, {"a": 1.0}) == []
    fired = [det.update(t, {"a": float("nan")}) for t in range(4, 8)]   # diverged: non-finite from update 4 on
    assert [len(w) for w in fired] == [0, 0, 1, 0]
    assert fired[2][0]["update"] == 6 and "non-finite" in fired[2][0]["message"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(signal="", factor=2.0), "signal"), (dict(signal="a", factor=0.5), "factor"),
    (dict(signal="a", factor=2.0, direction="up"), "direction"), (dict(signal="a", factor=2.0, baseline=0), "baseline"),
    (dict(signal="a", factor=2.0, lag=-1), "lag"), (dict(signal="a", factor=2.0, persist=0), "persist"),
    (dict(signal="a", factor=2.0, smooth=0), "smooth"), (dict(signal="a", factor=2.0, start=-1), "start"),
    (dict(signal="a", factor=2.0, level="x"), "level"),
    (dict(signal="a", factor=float("nan")), "factor"), (dict(signal="a", factor=float("inf")), "factor"),
    (dict(signal="a", factor=1.0), "factor"), (dict(signal="a", factor=2.0, level=float("nan")), "level"),
    (dict(signal="a", factor=2.0, level=float("inf")), "level"),
    (dict(signal="a", factor=2.0, baseline=2.5), "baseline"),
    (dict(signal="a", factor=2.0, persist=True), "persist"), (dict(signal=3, factor=2.0), "signal")])
def test_bad_rules_are_refused(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        SignalRule(**kwargs)


def test_bad_detector_inputs_are_refused_and_change_nothing():
    with pytest.raises(TypeError, match="rules"):
        SignalDetector("grad_norm")
    with pytest.raises(TypeError, match=r"rules\[0\]"):
        SignalDetector([1])
    det = SignalDetector([SignalRule("a", 2.0, baseline=1, lag=0, smooth=1, persist=1, start=0)])
    with pytest.raises(TypeError, match="scalars"):
        det.update(0, [1.0])
    with pytest.raises(TypeError, match=r"scalars\['a'\]"):
        det.update(0, {"a": "1"})
    with pytest.raises((TypeError, ValueError), match="step"):
        det.update(-1, {"a": 1.0})
    det.update(0, {"a": 1.0})
    assert det.update(1, {"a": 3.0})[0]["update"] == 1   # the refused calls left no value behind
    with pytest.raises(TypeError, match="stream"):
        detect([1.0])


def test_default_rules_are_rules():
    assert all(isinstance(r, SignalRule) for r in DEFAULT_SIGNAL_RULES)


def test_the_default_rule_lets_a_short_transient_pass_and_warns_on_a_lasting_collapse():
    """The shipped rule (benchmarks.foresight's calibration on seed 1): the smallest layer's gradient RMS at a
    quarter of its baseline on 5 of the last 8 updates. An early-training dip that lasts 4 updates does not warn
    (it did when the rule held 3); a collapse that stays warns on its 5th update."""
    from dataclasses import replace

    (rule,) = DEFAULT_SIGNAL_RULES
    assert (rule.signal, rule.direction, rule.factor, rule.baseline, rule.lag, rule.smooth, rule.persist,
            rule.start, rule.level, rule.within) == ("grad_rms_eps_min", "falling", 4.0, 20, 5, 3, 5, 20, None, 8)
    transient = [1000.0] * 40 + [150.0] * 4 + [1000.0] * 40
    # the level (median of the last 3) is 150 at updates 41..44, the baseline 1000: 4 updates in a row
    assert first_alarm({"grad_rms_eps_min": transient}) is None and brute_first_fire_within(transient, rule) is None
    assert brute_first_fire_within(transient, replace(rule, persist=3)) == 43
    collapse = [1000.0] * 40 + [100.0] * 40
    assert first_alarm({"grad_rms_eps_min": collapse})["update"] == brute_first_fire_within(collapse, rule) == 45


# ---------------------------------------------------------------- adversarial review (issue 41's public API)

def test_a_factor_of_one_is_refused_and_fields_are_kept_as_plain_numbers():
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="factor"):   # x1 would fire on a flat signal
        SignalRule("a", 1.0)
    r = SignalRule("a", torch.tensor(2.0), baseline=np.int64(3), level=np.float32(0.5))
    assert type(r.factor) is float and type(r.baseline) is int and type(r.level) is float
    assert hash(r) == hash(SignalRule("a", 2.0, baseline=3, level=0.5))


def test_the_same_rule_twice_is_refused():
    r = SignalRule("a", 2.0)
    with pytest.raises(ValueError, match=r"rules\[1\] repeats rules\[0\]"):
        SignalDetector([r, SignalRule("a", 2.0)])


def test_numpy_numbers_are_values_and_none_is_no_value_while_nan_fires():
    np = pytest.importorskip("numpy")
    r = SignalRule("a", 2.0, baseline=3, lag=0, smooth=1, persist=1, start=0)
    det = SignalDetector([r])
    assert [det.update(t, {"a": np.float32(1.0)}) for t in range(4)] == [[]] * 4
    assert det.update(4, {"a": np.float64(3.0)})[0]["update"] == 4
    gap = [1.0, 1.0, None, 1.0, None, 1.0]   # updates with no value: a gap, not a non-finite value
    assert detect({"a": gap}, [r]) == []
    assert detect({"a": gap[:2] + [float("nan")]}, [r])[0]["update"] == 2


def test_a_stream_that_is_not_a_sequence_and_a_negative_first_update_are_refused():
    r = SignalRule("a", 2.0)
    with pytest.raises(TypeError, match=r"stream\['a'\]"):
        detect({"a": 1.0}, [r])
    with pytest.raises(ValueError, match="first_update"):
        detect({"a": [1.0]}, [r], first_update=-1)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copied_detector_carries_its_state(how):
    import copy
    import pickle
    det = SignalDetector([SignalRule("a", 2.0, baseline=3, lag=0, smooth=1, persist=2, start=0)])
    for t, v in enumerate([1.0, 1.0, 1.0, 3.0]):   # held once at update 3; persist=2 fires at 4
        det.update(t, {"a": v})
    twin = pickle.loads(pickle.dumps(det)) if how == "pickle" else copy.deepcopy(det)
    assert twin.update(4, {"a": 3.0})[0]["update"] == 4 == det.update(4, {"a": 3.0})[0]["update"]
