"""SignalRule(within=...) attacked as a user would: a brute-force reading of the module docstring's formula
(non-finite values, missing values, absolute levels, windowed and consecutive rules side by side) against
`detect` and against an online detector resumed mid-stream through a pickled / deep-copied state; rules that
fire on the same updates are the same rule; malformed states (a hold that is no bit mask of the window, a bool)
are refused and change nothing; a monitor checkpointed mid-hold of a flickering collapse resumes to the
unbroken run's warning."""

import copy
import io
import logging
import math
import pickle
import statistics
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_helpers import feed_grads
from stability_toolbox import StabilityMonitor
from stability_toolbox.signal_detector import DEFAULT_SIGNAL_RULES, SignalDetector, SignalRule, detect


def brute_fires(xs, r):
    """The update indices at which rule ``r`` fires on ``xs`` (one value per update; None: not measured), the
    formula written out over the list of measured values: a non-finite value holds from ``start``; else the
    level (median of the finite ones of the last ``smooth`` measured values) against the base (median of the
    finite ones of the ``baseline`` measured values ending ``lag + 1`` before); fires once, at the first
    update that holds with ``persist`` holds among the last ``within`` (None: ``persist``) measured updates."""
    seen, holds = [], []
    window = r.persist if r.within is None else r.within
    for t, x in enumerate(xs):
        if x is None:
            continue
        seen.append(x)
        n = len(seen)
        if not math.isfinite(x):
            ok = t >= r.start
        elif n < r.lag + r.baseline + 1 or t < r.start:
            ok = False
        else:
            recent = [v for v in seen[n - r.smooth:] if math.isfinite(v)]
            base = [v for v in seen[n - 1 - r.lag - r.baseline: n - 1 - r.lag] if math.isfinite(v)]
            ok = False
            if recent and base:
                lv, b = statistics.median(recent), statistics.median(base)
                if r.direction == "rising":
                    ok = b > 0 and lv >= r.factor * b and (r.level is None or lv >= r.level)
                else:
                    ok = b > 0 and lv * r.factor <= b and (r.level is None or lv <= r.level)
        holds.append(ok)
        if ok and sum(holds[-window:]) >= r.persist:
            return [t]
    return []


@st.composite
def rule_sets(draw):
    """One or two rules on signal x (distinct), windowed or in a row."""
    out = []
    for _ in range(draw(st.integers(1, 2))):
        persist = draw(st.integers(1, 4))
        out.append(SignalRule("x", draw(st.sampled_from([1.5, 2.0, 4.0])),
                              draw(st.sampled_from(["rising", "falling"])), baseline=draw(st.integers(1, 6)),
                              lag=draw(st.integers(0, 3)), smooth=draw(st.integers(1, 3)), persist=persist,
                              level=draw(st.sampled_from([None, 0.5, 2.0])), start=draw(st.integers(0, 8)),
                              within=draw(st.sampled_from([None, persist, persist + 1, persist + 3]))))
    # one rule per behaviour (the detector refuses two that fire on the same updates)
    kept = {}
    for r in out:
        kept.setdefault(replace(r, within=None) if r.within in (None, r.persist) or r.persist == 1 else r, r)
    return list(kept.values())


values = st.one_of(st.sampled_from([0.1, 1.0, 10.0]), st.floats(0.01, 100.0), st.just(float("nan")),
                   st.just(float("inf")), st.none())


@settings(max_examples=150, deadline=None)
@given(rules=rule_sets(), xs=st.lists(values, min_size=1, max_size=36), split=st.integers(0, 36),
       how=st.sampled_from(["pickle", "deepcopy", "dict"]))
def test_offline_and_resumed_online_equal_the_formula_written_out(rules, xs, split, how):
    want = sorted((t, i) for i, r in enumerate(rules) for t in brute_fires(xs, r))
    got = detect({"x": xs}, rules)
    assert sorted((w["update"], rules.index(w["rule"])) for w in got) == want
    # online, checkpointed at `split` and resumed in a new detector from a round-tripped state
    det = SignalDetector(rules)
    for t in range(min(split, len(xs))):
        det.update(t, {"x": xs[t]})
    state = {"pickle": lambda s: pickle.loads(pickle.dumps(s)), "deepcopy": copy.deepcopy,
             "dict": lambda s: s}[how](det.state_dict())
    resumed = SignalDetector(rules)
    resumed.load_state_dict(state)
    for t in range(min(split, len(xs)), len(xs)):
        resumed.update(t, {"x": xs[t]})
    assert [(w["update"], w["message"]) for w in resumed.warnings] == [(w["update"], w["message"]) for w in got]


R = dict(signal="a", factor=2.0, baseline=3, lag=0, smooth=1, start=0)


@pytest.mark.parametrize("windowed,plain", [
    (SignalRule(**R, persist=3, within=3), SignalRule(**R, persist=3)),   # a window of the hold: in a row
    (SignalRule(**R, persist=1, within=6), SignalRule(**R, persist=1)),   # a hold of 1: any window is one update
])
def test_rules_that_fire_on_the_same_updates_are_the_same_rule(windowed, plain):
    xs = [1.0, 1.0, 1.0, 3.0, 1.0, 3.0, 3.0, 3.0, 3.0]
    for xs in ([1.0, 1.0, 1.0] + [3.0 ** k for k in range(1, 8)], [1.0, 1.0, 1.0, 3.0, 9.0, 2.0, 27.0, 81.0, 243.0]):
        assert brute_fires(xs, windowed) == brute_fires(xs, plain) != []  # the same updates by the formula ...
    for rules in ([windowed, plain], [plain, windowed]):  # ... so one rule: not two warnings per firing
        with pytest.raises(ValueError, match=r"rules\[1\] repeats rules\[0\] .*hold in a row"):
            SignalDetector(rules)
    assert windowed.within is not None  # the rules stay as given


def test_rules_that_differ_only_in_a_real_window_are_two_rules():
    a, b = SignalRule(**R, persist=2, within=3), SignalRule(**R, persist=2, within=4)
    assert a != b and len({a, b, SignalRule(**R, persist=2)}) == 3
    assert len(SignalDetector([a, b, SignalRule(**R, persist=2)]).rules) == 3


def _fed(rules, xs):
    det = SignalDetector(rules)
    for t, x in enumerate(xs):
        det.update(t, {"a": x})
    return det


WIN = SignalRule(**R, persist=3, within=4)
ROW = SignalRule(**R, persist=3)


@pytest.mark.parametrize("rules,held,match", [
    ([WIN], [16], r"'held'\[0\] must be a bit mask"),    # 2**within: no mask of 4 updates
    ([WIN], [2 ** 70], r"'held'\[0\] must be a bit mask"),
    ([WIN], [True], "one count / flag per rule"),        # a bool is no count nor mask
    ([ROW], [True], "one count / flag per rule"),
    ([WIN], [-1], "one count / flag per rule"),
    ([WIN], [3.0], "one count / flag per rule"),
    ([ROW, WIN], [0, 1 << 4], r"'held'\[1\] must be a bit mask"),
])
def test_a_hold_that_is_no_count_or_mask_is_refused_and_changes_nothing(rules, held, match):
    det = _fed(rules, [1.0, 1.0, 1.0, 3.0])
    before = det.state_dict()
    with pytest.raises(ValueError, match=match):
        det.load_state_dict({**before, "held": held})
    assert det.state_dict() == before


def test_a_windowed_state_and_a_consecutive_state_are_not_read_as_each_other():
    xs = [1.0, 1.0, 1.0, 3.0, 1.0, 3.0]
    win, row = _fed([WIN], xs), _fed([ROW], xs)
    assert win.state_dict()["held"] == [0b101] and row.state_dict()["held"] == [1]  # a mask vs a count
    for det, state in ((win, row.state_dict()), (row, win.state_dict())):
        before = det.state_dict()
        with pytest.raises(ValueError, match="are not this detector's"):
            det.load_state_dict(state)
        assert det.state_dict() == before
    # an old state (no `within` key) is a consecutive rule's; a windowed detector refuses it
    old = row.state_dict()
    old["rules"] = [{k: v for k, v in d.items() if k != "within"} for d in old["rules"]]
    with pytest.raises(ValueError, match="are not this detector's"):
        win.load_state_dict(old)


def test_the_default_rules_message_names_its_window():
    xs = [1000.0] * 40 + [1000.0 if i % 6 >= 4 else 100.0 for i in range(40)]
    (w,) = detect({"grad_rms_eps_min": xs})
    assert w["update"] == brute_fires(xs, DEFAULT_SIGNAL_RULES[0])[0] == 47
    assert "rule x4, 5 of 8 updates)" in w["message"] and w["message"].startswith("stability warning: update 47:")


# --- the monitor checkpointed mid-hold of a flickering collapse ---------------------------------------------

EPS = 1e-8  # the unit of grad_rms_eps_min without an attached optimizer
HIGH = (33, 34)  # after the drop at 30 the gradient RMS flickers back up for these updates


def _rms(t: int) -> float:
    return 1e-6 if t < 30 or t in HIGH else 1e-7


# By hand (default rule: level = median of the last 3 values, base = median of updates t-25..t-6, 100 eps):
# the level is 10 eps (holds) at 31, 32, 33, back to 100 at 34, 35, 10 at 36 on: holds 31-33, 36, 37 = 5 of the
# 8 updates 30-37: fires at 37; in a row it would fire at 40 (36-40).
FIRES_AT = 37


def _feed(mon, model, steps):
    feed_grads(mon, model, steps, _rms)


@pytest.mark.parametrize("split", [32, 35, 36])  # in the first hold, in the flicker, on the hold's return
def test_a_monitor_saved_mid_hold_resumes_to_the_unbroken_runs_warning(model, split):
    logging.getLogger("stability_toolbox").setLevel(logging.ERROR)
    try:
        assert brute_fires([_rms(t) / EPS for t in range(45)], DEFAULT_SIGNAL_RULES[0]) == [FIRES_AT]
        unbroken = StabilityMonitor(model, every=1000)
        _feed(unbroken, model, range(45))
        first = StabilityMonitor(model, every=1000)
        _feed(first, model, range(split))
        buf = io.BytesIO()
        torch.save(first.state_dict(), buf)
        first.close()
        buf.seek(0)
        resumed = StabilityMonitor(model, every=1000)
        resumed.load_state_dict(torch.load(buf, weights_only=True))
        _feed(resumed, model, range(split, 45))
        got = [(w["update"], w["message"]) for w in resumed.warnings if "update" in w]
        assert got == [(w["update"], w["message"]) for w in unbroken.warnings if "update" in w]
        assert [u for u, _ in got] == [FIRES_AT]
        for m in (unbroken, resumed):
            m.close()
    finally:
        logging.getLogger("stability_toolbox").setLevel(logging.NOTSET)
