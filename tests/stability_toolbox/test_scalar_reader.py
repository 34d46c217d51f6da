"""The asynchronous per-update scalar reader, and the monitor's per-update rules at its default settings: run at
every update, known at the update itself on a CPU, no tensor read on the host, against the rule written out."""

import math
import statistics

import pytest
import torch

from admin_torch import make_stack
from stability_toolbox import StabilityMonitor, scalar_reader
from stability_toolbox.leading_signals import LayerGradients
from stability_toolbox.scalar_reader import ScalarReader
from stability_toolbox.signal_detector import DEFAULT_SIGNAL_RULES


def test_rows_come_back_once_in_order_with_their_names():
    r = ScalarReader()
    r.put("b", torch.tensor([2.5]))
    r.put("a", 1)
    r.end(4)
    r.end(5)  # an update without a value keeps no row
    r.put("a", torch.tensor(-3.0, dtype=torch.float64))
    r.end(6)
    assert r.pending == 2
    assert r.ready() == [(4, {"a": 1.0, "b": 2.5}), (6, {"a": -3.0})]
    assert r.ready(block=True) == [] and r.pending == 0
    r.put("a", 7.0)
    r.clear()  # a failed step: nothing of it is kept
    r.end(7)
    assert r.ready() == []


@pytest.mark.parametrize("name, value", [("", 1.0), (3, 1.0), ("x", True), ("x", "1"), ("x", torch.zeros(2)),
                                         ("x", torch.tensor(True)), ("x", torch.tensor(1 + 2j))])
def test_bad_values_are_refused_and_change_nothing(name, value):
    r = ScalarReader()
    r.put("ok", 1.0)
    with pytest.raises(TypeError):
        r.put(name, value)
    r.end(0)
    assert r.ready() == [(0, {"ok": 1.0})]
    with pytest.raises(ValueError, match="step"):
        r.end(-1)
    with pytest.raises(TypeError, match="block"):
        r.ready(block="yes")


def _written_out_alarm(xs, factor=4.0, baseline=20, lag=5, smooth=3, persist=5, start=20):
    """The falling rule of the signal detector's docstring, written out: level = median of the last ``smooth``,
    base = median of the ``baseline`` values before the latest ``lag + 1``; held when level * factor <= base."""
    held = 0
    for t in range(len(xs)):
        if t < lag + baseline or t < start:
            held = 0
            continue
        level = statistics.median(xs[t - smooth + 1: t + 1])
        base = statistics.median(xs[t - lag - baseline: t - lag])
        held = held + 1 if base > 0 and level * factor <= base else 0
        if held >= persist:
            return t
    return None


def test_the_default_monitor_runs_its_per_update_rule_at_every_update(monkeypatch):
    torch.manual_seed(0)
    model = make_stack("pre_ln", depth=2, dim=8, heads=2, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # fixed weights: only the loss scale moves the gradients
    mon = StabilityMonitor(model, every=100)  # the defaults: DEFAULT_SIGNAL_RULES, per_update off
    assert [r.signal for r in DEFAULT_SIGNAL_RULES] == ["grad_rms_eps_min"]
    layers = [[p for _, p in ps] for row, ps in mon._site_plan.groups if row != "(other)"]
    x = torch.randn(2, 5, 8)
    rms, known = [], {}

    def refuse(*_a, **_k):
        raise AssertionError("a tensor read on the host between logging steps")

    for t in range(45):
        scale = 1.0 if t < 30 else 1.0 / 16  # the gradients shrink 16-fold from update 30
        loss = model(x).pow(2).mean() * scale
        loss.backward()
        rms.append(min(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in ps) / sum(p.numel() for p in ps))
                       for ps in layers) / 1e-8)
        with monkeypatch.context() as m:
            if t:  # a step between logging steps reads no tensor on the host (the rule reads a host copy)
                m.setattr(scalar_reader, "host_memory", lambda device: False)  # the device path, a GPU's
                for name in ("item", "tolist", "__bool__", "__float__", "cpu"):
                    m.setattr(torch.Tensor, name, refuse)
            mon.begin_step()
            mon.capture_grads()
            opt.step()
            opt.zero_grad()
            mon.end_step(loss.detach())
        known.update({w["update"]: w["known_at"] for w in mon.warnings if "known_at" in w})
    want = _written_out_alarm(rms)
    assert want is not None and 30 <= want < 45
    assert known == {want: want}  # warned at the update it was measured at: on a CPU the host has it at once
    assert len(mon.history) == 1  # no logging step since update 0: the warning did not wait for one
    mon.close()


def test_layer_gradients_without_the_model_norm_read_the_layers_only():
    a, b, e = (torch.nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in (4, 1, 3))
    a.grad, b.grad = torch.full((4,), 3e-8, dtype=torch.float64), torch.tensor([4e-8], dtype=torch.float64)
    e.grad = torch.full((3,), 1e-12, dtype=torch.float64)  # the "other" row: smaller, but no layer
    groups = [("l0", [("a", a)]), ("l1", [("b", b)]), ("(other)", [("e", e)])]
    out = LayerGradients(groups, model_norm=False)(1e-8)
    assert set(out) == {"grad_rms_eps_min"} and float(out["grad_rms_eps_min"]) == pytest.approx(3.0, rel=1e-6)
    full = LayerGradients(groups)(1e-8)  # float64 gradients: the norm is not narrowed by the fused kernel
    assert float(full["grad_norm"]) == pytest.approx(math.sqrt(4 * 9e-16 + 16e-16 + 3e-24), rel=1e-6)
    with pytest.raises(TypeError, match="model_norm"):
        LayerGradients(groups, model_norm="no")
