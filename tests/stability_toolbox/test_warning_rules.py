"""The warning rules as pure functions of a history; the monitor's lines (log, monitor.jsonl, TensorBoard
text) are theirs, and name layer, quantity, trend, mechanism and remedy. Malformed histories, records, rules
and ``warned`` are TypeError/ValueError naming the field; random histories and rules (hypothesis) against the
rule's definition written out."""

import json
import logging
import math
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from admin_torch import make_stack
from stability_toolbox import DEFAULT_RULES, StabilityMonitor, WarningRule
from stability_toolbox.warning_rules import DIAGNOSES, check, first_warning, replay


def _hist(quantity, series, row="layers.0", model_level=False):
    out = []
    for i, v in enumerate(series):
        rec = {"step": 10 * i, "quantities": {}}
        if model_level:
            rec[quantity] = v
        else:
            rec["quantities"][quantity] = {row: v, "layers.1": 0.5}
        out.append(rec)
    return out


def test_rising_rule_needs_level_and_rate():
    rule = {"attn_logit_max": WarningRule(threshold=20.0, window=3, min_growth=1.5)}
    # high but growing slowly (x1.1): no warning; growing fast but below threshold: none
    assert replay(_hist("attn_logit_max", [25, 27.5, 30.3, 33.3]), rule) == []
    assert replay(_hist("attn_logit_max", [2, 4, 8, 16]), rule) == []
    w = first_warning(_hist("attn_logit_max", [2, 4, 8, 16, 32, 64]), rule)
    assert w["step"] == 40 and w["layer"] == "layers.0" and w["quantity"] == "attn_logit_max"
    assert "rose 8 -> 16 -> 32 over the last 3 logged steps (x2 per log; >= 20) at step 40" in w["message"]
    assert w["mechanism"] == DIAGNOSES["attn_logit_max"].mechanism
    # warns once per (row, quantity)
    assert len(replay(_hist("attn_logit_max", [2, 4, 8, 16, 32, 64, 128]), rule)) == 1


def test_falling_rule_and_min_rows():
    hist = _hist("grad_ratio", [0.5, 0.05, 0.004, 0.0003])
    w = first_warning(hist, {"grad_ratio": WarningRule(threshold=1e-2, window=3, min_growth=3.0, direction="falling")})
    assert w["step"] == 20 and "fell 0.5 -> 0.05 -> 0.004" in w["message"]
    assert "admin_torch.convert" in w["message"]
    # two rows required: layers.1 stays at 0.5, so no warning
    assert replay(hist, {"grad_ratio": WarningRule(threshold=1e-2, window=3, direction="falling", min_rows=2)}) == []


def test_model_level_quantity_non_finite_and_purity():
    hist = _hist("log_z_rms", [8.0, 9.0, 11.0, 14.0], model_level=True)
    rule = {"log_z_rms": WarningRule(threshold=10.0, window=3, min_growth=1.1)}
    snapshot = json.dumps(hist)
    w = first_warning(hist, rule)
    assert (w["step"], w["layer"]) == (20, "(model)") and "z-loss" in w["remedy"]
    assert json.dumps(hist) == snapshot  # pure: the history is not modified
    assert check(hist[:3], rule, warned={("(model)", "log_z_rms")}) == []
    bad = _hist("grad_norm", [1.0, float("nan")])
    (w,) = check(bad, {"grad_norm": WarningRule(threshold=100.0)})
    assert "is non-finite (nan) at step 10" in w["message"]
    loss = [{"step": 0, "loss_max": float("inf"), "quantities": {}}]
    assert check(loss, {})[0]["quantity"] == "loss"


def test_every_default_rule_has_a_diagnosis():
    for q in DEFAULT_RULES:
        d = DIAGNOSES[q]
        assert d.mechanism and d.remedy


def test_rules_are_checked_and_import_without_torch():
    """WarningRule and DEFAULT_RULES live with the rules: replaying a monitor.jsonl needs no torch."""
    import subprocess
    import sys

    code = ("import sys; from stability_toolbox.warning_rules import DEFAULT_RULES, WarningRule, replay; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    for bad, match in ((dict(threshold="x"), "threshold"), (dict(threshold=1.0, window=0), "window"),
                       (dict(threshold=1.0, min_rows=0), "min_rows"),
                       (dict(threshold=1.0, direction="up"), "direction")):
        with pytest.raises((TypeError, ValueError), match=match):
            WarningRule(**bad)


def _tb_texts(directory):
    """The text summaries of the tensorboardX event files under ``directory`` (parsed by hand)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                if v.tag.startswith("stability/warnings"):
                    out += [s.decode() for s in v.tensor.string_val]
    return out


def test_monitor_lines_are_the_rules_lines_in_log_jsonl_and_tensorboard(tmp_path, caplog):
    torch.manual_seed(0)
    model = make_stack("pre_ln", 1, 8, heads=2, seed=0)
    rules = {"attn_logit_max": WarningRule(threshold=1.0, window=2, min_growth=1.5)}
    mon = StabilityMonitor(model, tmp_path, every=1, rules=rules, heatmaps=False)
    with caplog.at_level(logging.WARNING, logger="stability_toolbox.monitor"):
        for scale in (1.0, 3.0, 9.0):
            with torch.no_grad():
                for lin in (model.sublayers[0].q_proj, model.sublayers[0].k_proj):
                    lin.weight.mul_(scale ** 0.5 / (1.0 if scale == 1.0 else 3.0 ** 0.5))
            with mon.step():
                model(torch.randn(2, 4, 8)).sum().backward()
    mon.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stability warning:")]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "attn_logit_max rose" in lines[0] and "qk-layernorm" in lines[0] and "likely mechanism:" in lines[0]
    assert [w["message"] for w in replay(mon.history, rules)] == lines   # the pure function gives them
    recs = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    assert [w for r in recs for w in r["warnings"]] == lines
    assert _tb_texts(tmp_path / "tb") == lines


def test_heatmaps_become_tensorboard_images(tmp_path):
    from tensorboardX.proto import event_pb2

    model = make_stack("post_ln", 2, 8, heads=2, seed=0)
    mon = StabilityMonitor(model, tmp_path, every=1, rules={})
    for _ in range(2):
        with mon.step():
            model(torch.randn(2, 4, 8)).sum().backward()
    mon.close()
    tags = set()
    for path in (tmp_path / "tb").rglob("events.out.tfevents.*"):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            tags |= {v.tag for v in ev.summary.value if v.HasField("image")}
    assert "stability/heatmap_beta" in tags and "stability/heatmap_grad_ratio" in tags


@pytest.mark.parametrize("settings, quantity, remedy", [
    (dict(kind="post_ln", depth=12, lr=2e-3), "grad_ratio", "admin_torch.convert"),
    (dict(kind="admin", depth=12, lr=2e-3), None, None),
    (dict(kind="pre_ln", depth=2, lr=0.1), "attn_logit_max", "add_qk_norm"),
    (dict(kind="pre_ln", depth=2, lr=0.1, qk_norm=True), None, None),
])
def test_real_runs_get_the_mechanism_and_remedy_right(tmp_path, settings, quantity, remedy, shared_data):
    """The grid's settings on Multi30k, first 21 updates (seed 2): the failing kinds warn at update 20 naming
    their mechanism's remedy; with the remedy applied, no warning."""
    from benchmarks import stability_grid as sg

    sg.train_one(tmp_path, settings, 2, 21, 40, 10, _DATA())   # logs at 0, 10, 20; warm-up as in the grid
    warnings_ = [w for h in sg.read_history(tmp_path) for w in h["warnings"]]
    if quantity is None:
        assert warnings_ == []
    else:
        assert warnings_ and all(f": {quantity} " in w for w in warnings_)
        assert remedy in warnings_[0] and " at step 20;" in warnings_[0]


_CACHE = {}


def _DATA():
    from benchmarks import stability_grid as sg

    if "data" not in _CACHE:
        _CACHE["data"] = sg.load_data()
    return _CACHE["data"]


# ---------------------------------------------------------------- the arguments: checked, named, nothing read first

FUNCTIONS = {"check": check, "replay": replay, "first_warning": first_warning}
RULE = {"attn_logit_max": WarningRule(threshold=20.0, window=3, min_growth=1.5)}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_a_single_record_is_a_type_error_naming_history(name):
    record = _hist("attn_logit_max", [2.0])[0]
    with pytest.raises(TypeError, match=r"history must be a sequence of records .*single record \(dict\): pass "
                                        r"\[record\]"):
        FUNCTIONS[name](record, RULE)
    for bad in ("records", iter([record]), 3, None):
        with pytest.raises(TypeError, match="history must be a sequence of records"):
            FUNCTIONS[name](bad, RULE)
    assert FUNCTIONS[name]((record,), RULE) in ([], None)   # a tuple is a sequence


BAD_RULES = [
    ([("attn_logit_max", RULE["attn_logit_max"])], TypeError, r"rules must be a dict"),
    (None, TypeError, r"rules must be a dict"),
    ({"attn_logit_max": 20.0}, TypeError, r"rules\['attn_logit_max'\] must be a WarningRule"),
    ({"attn_logit_max": None}, TypeError, r"rules\['attn_logit_max'\] must be a WarningRule"),
    ({3: RULE["attn_logit_max"]}, TypeError, r"rules must have quantity names \(str\) as keys"),
    ({"": RULE["attn_logit_max"]}, ValueError, r"rules: '' is not a quantity name"),
    ({"step": RULE["attn_logit_max"]}, ValueError, r"rules: 'step' is not a quantity name"),
    ({"attn_logit_max": {"window": 3}}, TypeError, r"rules\['attn_logit_max'\]\.threshold is required"),
    ({"attn_logit_max": {"threshold": 1, "thresh": 2}}, TypeError, r"unknown field 'thresh'"),
    ({"attn_logit_max": {"threshold": 1, "window": 0}}, ValueError, r"rules\['attn_logit_max'\]\.window must be"),
    ({"attn_logit_max": {"threshold": "20"}}, TypeError, r"rules\['attn_logit_max'\]\.threshold must be"),
    ({"attn_logit_max": {"threshold": float("nan")}}, ValueError, r"\.threshold must be a finite"),
    ({"attn_logit_max": {"threshold": 1, "min_growth": -1}}, ValueError, r"\.min_growth must be"),
    ({"attn_logit_max": {"threshold": 1, "min_rows": True}}, TypeError, r"\.min_rows must be"),
    ({"attn_logit_max": {"threshold": 1, "direction": "up"}}, ValueError, r"\.direction must be one of"),
]


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("rules, exc, match", BAD_RULES)
def test_malformed_rules_are_named_down_to_the_field(name, rules, exc, match):
    with pytest.raises(exc, match=match):
        FUNCTIONS[name](_hist("attn_logit_max", [2, 4, 8, 16, 32]), rules)


def _bad(i, **change):
    hist = _hist("attn_logit_max", [2, 4, 8, 16, 32, 64])
    hist[i] = {**hist[i], **change}
    return hist


BAD_HISTORIES = [
    ([{"quantities": {}}], ValueError, r"history\[0\] has no 'step'"),
    ([{"step": 0}, 3], TypeError, r"history\[1\] must be a record"),
    (_bad(2, step="20"), TypeError, r"history\[2\]\['step'\] must be an integer"),
    (_bad(2, step=None), TypeError, r"history\[2\]\['step'\] must be an integer"),
    (_bad(0, quantities=[("attn_logit_max", 2.0)]), TypeError, r"history\[0\]\['quantities'\] must be a dict"),
    (_bad(4, quantities={"attn_logit_max": 32.0}), TypeError, r"history\[4\]\['quantities'\]\['attn_logit_max'\] "
                                                              r"must be a dict"),
    (_bad(5, quantities={"attn_logit_max": {"layers.0": "NaN"}}), TypeError,
     r"history\[5\]\['quantities'\]\['attn_logit_max'\]\['layers.0'\] must be a real number .*read_records"),
    (_bad(5, quantities={"attn_logit_max": {"layers.0": None}}), TypeError, r"\['layers.0'\] must be a real"),
    (_bad(5, quantities={"attn_logit_max": {"layers.0": True}}), TypeError, r"\['layers.0'\] must be a real"),
    (_bad(5, quantities={"attn_logit_max": {"layers.0": 10 ** 400}}), ValueError, r"\['layers.0'\] must be a real "
                                                                                  r"number that fits a float"),
    (_bad(5, quantities={"attn_logit_max": {0: 1.0}}), TypeError, r"must have row names \(str\) as keys"),
    (_bad(5, loss_max="inf"), TypeError, r"history\[5\]\['loss_max'\] must be a real"),
    (_bad(5, loss_spike=[3.0]), TypeError, r"history\[5\]\['loss_spike'\] must be a real"),
    (_bad(1, warnings="stability warning: x"), TypeError, r"history\[1\]\['warnings'\] must be a list of str"),
]


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("history, exc, match", BAD_HISTORIES)
def test_malformed_records_are_named_down_to_the_field(name, history, exc, match):
    with pytest.raises(exc, match=match):
        FUNCTIONS[name](history, RULE)


@pytest.mark.parametrize("warned", ["ab", [("layers.0",)], [("layers.0", 3)], {"layers.0": "q"}, 3])
def test_malformed_warned_is_named(warned):
    with pytest.raises(TypeError, match="warned must"):
        check(_hist("attn_logit_max", [2, 4, 8, 16, 32]), RULE, warned)


def test_a_rule_as_a_dict_of_its_fields_is_that_rule():
    hist = _hist("attn_logit_max", [2, 4, 8, 16, 32, 64])
    assert replay(hist, {"attn_logit_max": {"threshold": 20.0, "window": 3, "min_growth": 1.5}}) == replay(hist, RULE)
    assert len(replay(hist, RULE)) == 1


def test_a_rule_stores_plain_numbers():
    """NumPy numbers given to WarningRule are stored as the Python numbers they hold: equal, hashable, and they
    format and slice as those."""
    np = pytest.importorskip("numpy")
    rule = WarningRule(np.float32(20.0), window=np.int64(3), min_growth=np.float64(1.5))
    assert rule == RULE["attn_logit_max"] and hash(rule) == hash(RULE["attn_logit_max"])
    assert type(rule.threshold) is float and type(rule.window) is int


def test_a_loss_spike_without_its_maximum_still_warns():
    (w,) = check([{"step": 5, "loss_spike": 3.0, "quantities": {}}], {})
    assert w["quantity"] == "loss_spike" and "is 3.00x the recent median at step 5" in w["message"]


def test_a_refused_call_reads_nothing_and_the_history_is_unchanged():
    hist = _bad(5, quantities={"attn_logit_max": {"layers.0": "NaN"}})
    snapshot = json.dumps(hist)
    with pytest.raises(TypeError):
        replay(hist, RULE)
    assert json.dumps(hist) == snapshot


# ---------------------------------------------------------------- random histories and rules (hypothesis)

def _oracle(history, rules):
    """The warnings of replay(history, rules) as {(step, layer, quantity)}, from the rule's definition in the
    docs: a (row, quantity) warns the first time its value is non-finite, or its last `window` values are all
    finite, the latest is past the threshold, each moved the rule's way by at least the factor, and at least
    `min_rows` rows of the quantity fire together; a non-finite loss_max warns once, a loss_spike >= 2 each time."""
    def values(record, q):
        per_row = record.get("quantities", {}).get(q)
        if per_row:
            return dict(per_row)
        v = record.get(q)
        return {"(model)": v} if isinstance(v, (int, float)) and not isinstance(v, bool) else {}

    out, done = set(), set()
    for n, record in enumerate(history):
        now = set()
        for q, rule in rules.items():
            fired = []
            for row, v in values(record, q).items():
                if (row, q) in done:
                    continue
                if not math.isfinite(v):
                    now.add((record["step"], row, q))
                    continue
                if n + 1 < rule.window:
                    continue
                seq = [values(history[j], q).get(row) for j in range(n + 1 - rule.window, n + 1)]
                if any(x is None or not math.isfinite(x) for x in seq):
                    continue
                if rule.direction == "rising":
                    ok = v >= rule.threshold and all(b > a and b >= rule.min_growth * a for a, b in zip(seq, seq[1:]))
                else:
                    ok = v <= rule.threshold and all(b < a and rule.min_growth * b <= a for a, b in zip(seq, seq[1:]))
                if ok:
                    fired.append(row)
            if len(fired) >= rule.min_rows:
                now |= {(record["step"], row, q) for row in fired}
        lmax = record.get("loss_max")
        if lmax is not None and not math.isfinite(lmax):
            if ("(model)", "loss") not in done:
                now.add((record["step"], "(model)", "loss"))
        elif record.get("loss_spike") is not None and record["loss_spike"] >= 2.0:
            now.add((record["step"], "(model)", "loss_spike"))
        done |= {(row, q) for _, row, q in now}
        out |= now
    return out


QS = ["attn_logit_max", "grad_ratio", "log_z_rms"]
# decades make monotone runs (what the rules look for) common; the rest: any value, non-finite ones, ints
value = st.one_of(st.sampled_from([1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3]), st.floats(-1e3, 1e3),
                  st.sampled_from([0.0, float("nan"), float("inf"), float("-inf")]), st.integers(-5, 5))
bad_value = st.sampled_from(["NaN", None, True, [1.0], 10 ** 400])
row_values = st.dictionaries(st.sampled_from(["layers.0", "layers.1"]), value, max_size=2)


@st.composite
def histories(draw):
    """A history, and whether it is well formed (a bad part is drawn with a small probability)."""
    ok = True
    records = []
    for step in range(draw(st.integers(0, 7))):
        record = {"step": step, "quantities": draw(st.dictionaries(st.sampled_from(QS[:2]), row_values, max_size=2))}
        for key in ("log_z_rms", "loss_max", "loss_spike"):
            if draw(st.booleans()):
                record[key] = draw(st.one_of(value, st.floats(1.0, 5.0)))
        if draw(st.integers(0, 30)) == 0:   # a malformed part
            ok = False
            where = draw(st.sampled_from(["step", "quantities", "row", "model", "record"]))
            if where == "step":
                record["step"] = draw(st.sampled_from(["1", 1.0, None, True]))
            elif where == "quantities":
                record["quantities"] = draw(st.sampled_from([[], None, "beta", {"attn_logit_max": 1.0}]))
            elif where == "row":
                record["quantities"] = {"attn_logit_max": {"layers.0": draw(bad_value)}}
            elif where == "model":
                record["loss_max"] = draw(bad_value.filter(lambda v: v is not None))
            else:
                record = draw(st.sampled_from([[], "record", 3, None]))
        records.append(record)
    return records, ok


rule_fields = st.fixed_dictionaries({"threshold": st.one_of(st.sampled_from([0.01, 1.0, 20.0]), st.floats(-50, 50))},
                                    optional={
        "window": st.integers(1, 4), "min_growth": st.floats(0, 3), "min_rows": st.integers(1, 2),
        "direction": st.sampled_from(["rising", "falling"])})


@st.composite
def rule_sets(draw):
    ok = True
    rules = {}
    for q in draw(st.lists(st.sampled_from(QS), unique=True, max_size=3)):
        fields = draw(rule_fields)
        rules[q] = WarningRule(**fields) if draw(st.booleans()) else fields
    if draw(st.integers(0, 10)) == 0:
        ok = False
        q = draw(st.sampled_from(QS + ["step", ""]))
        rules[q] = draw(st.sampled_from([3.0, None, {"window": 2}, {"threshold": 1.0, "window": 0},
                                         {"threshold": 1.0, "windw": 2}, {"threshold": float("inf")},
                                         {"threshold": 1.0, "direction": "sideways"}]))
    return rules, ok


@given(histories(), rule_sets())
def test_random_histories_and_rules_give_the_defined_warnings_or_a_named_error(drawn_history, drawn_rules):
    """check, replay and first_warning on random histories and rules (some malformed): a malformed one is a
    TypeError/ValueError naming history or rules; a well-formed one gives the warnings of the definition
    (_oracle), replay's first is first_warning, and check on the last lookback records gives check's answer."""
    from stability_toolbox.warning_rules import as_rules, lookback

    history, history_ok = drawn_history
    rules, rules_ok = drawn_rules
    if not (history_ok and rules_ok):
        for f in (check, replay, first_warning):
            with pytest.raises((TypeError, ValueError), match="^(history|rules)"):
                f(history, rules)
        return
    got = replay(history, rules)
    assert {(w["step"], w["layer"], w["quantity"]) for w in got} == _oracle(history, as_rules(rules))
    assert first_warning(history, rules) == (got[0] if got else None)
    for end in range(1, len(history) + 1):
        assert check(history[:end], rules) == check(history[max(0, end - lookback(rules)):end], rules)
    assert all(w["message"].startswith("stability warning: layer ") and "\n" not in w["message"] for w in got)


def _growth_span_oracle(values, steps, rule):
    """growth_span written out: each of the last ``window`` values past the one before by a factor of at least
    min_growth ** (updates between them / growth_span), the latest past the threshold."""
    for end in range(rule.window, len(values) + 1):
        v, s = values[end - rule.window:end], steps[end - rule.window:end]
        if v[-1] >= rule.threshold and all(
                b > a and b >= a * rule.min_growth ** ((sb - sa) / rule.growth_span)
                for a, b, sa, sb in zip(v, v[1:], s, s[1:])):
            return steps[end - 1]
    return None


@pytest.mark.parametrize("every", [5, 10, 20, 100])
@pytest.mark.parametrize("per_10", [1.5, 1.9, 2.1, 3.0])
def test_growth_span_makes_the_rate_per_updates_whatever_the_interval(every, per_10):
    """The same exponential growth (x per_10 every 10 updates) logged every ``every`` updates: with
    growth_span=10 the rule (a doubling per 10 updates) warns iff per_10 >= 2, at any interval, where the
    oracle says; per logged step (no growth_span) a long interval lets slow growth through."""
    steps = list(range(0, 400, every))
    values = [3.0 * per_10 ** (s / 10) for s in steps]
    hist = [{"step": s, "quantities": {"attn_logit_max": {"a": v}}} for s, v in zip(steps, values)]
    rule = WarningRule(threshold=20.0, window=3, min_growth=2.0, growth_span=10)
    w = first_warning(hist, {"attn_logit_max": rule})
    assert (None if w is None else w["step"]) == _growth_span_oracle(values, steps, rule)
    assert (w is not None) == (per_10 >= 2.0)
    per_log = first_warning(hist, {"attn_logit_max": WarningRule(threshold=20.0, window=3, min_growth=2.0)})
    if every == 100:
        assert per_log is not None  # x per_10^10 per record: past a doubling per log however slow
    if every == 10:
        assert (None if per_log is None else per_log["step"]) == (None if w is None else w["step"])


def test_growth_span_is_checked_and_the_default_attention_rule_uses_it():
    assert DEFAULT_RULES["attn_logit_max"].growth_span == 10
    assert WarningRule(threshold=1.0).growth_span is None
    for bad, exc in ((0, ValueError), (-10, ValueError), (2.5, TypeError), ("10", TypeError)):
        with pytest.raises(exc, match="growth_span"):
            WarningRule(threshold=1.0, growth_span=bad)
    with pytest.raises(ValueError, match=r"rules\['attn_logit_max'\]\.growth_span"):
        first_warning([{"step": 0}], {"attn_logit_max": {"threshold": 1.0, "growth_span": 0}})
    # a rate over very many updates: no finite growth meets it (no OverflowError)
    hist = [{"step": s, "quantities": {"attn_logit_max": {"a": v}}} for s, v in ((0, 1.0), (10 ** 6, 1e300))]
    assert first_warning(hist, {"attn_logit_max": WarningRule(threshold=1.0, window=2, min_growth=2.0,
                                                              growth_span=1)}) is None


@pytest.mark.parametrize("window", [4, 5, 50])
def test_a_window_longer_than_the_history_waits_for_it(window):
    """A rule over ``window`` logs fires only once ``window`` values exist: the same rising series (x2 per log
    past the threshold) warns at its ``window``-th record, not before, and never on a shorter history."""
    series = [2.0 ** i for i in range(1, 6)]  # 2, 4, 8, 16, 32
    rule = {"grad_norm": WarningRule(threshold=1.0, window=window, min_growth=2.0)}
    warnings = replay(_hist("grad_norm", series), rule)
    if window <= len(series):
        assert [w["step"] for w in warnings] == [10 * (window - 1)]
    else:
        assert warnings == [] and first_warning(_hist("grad_norm", series), rule) is None
        assert check(_hist("grad_norm", series), rule) == []
