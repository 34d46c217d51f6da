"""The warning rules as pure functions of a history; the monitor's lines (log, monitor.jsonl, TensorBoard
text) are theirs, and name layer, quantity, trend, mechanism and remedy."""

import json
import logging
import struct

import pytest
import torch

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
