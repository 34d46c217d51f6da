"""The monitor's per-update stream (``record["updates"]``), its new logged quantities (``attn_entropy``,
``update_rms``) and the per-update rules (``signal_rules``), each against a direct computation."""

import math

import pytest
import torch

from admin_torch import make_stack
from stability_toolbox import StabilityMonitor, scalar_reader
from stability_toolbox.leading_signals import attention_entropy
from stability_toolbox.signal_detector import SignalRule


@pytest.fixture
def lm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), make_stack("pre_ln", depth=2, dim=8, heads=2, seed=0,
                                                                      causal=True), torch.nn.Linear(8, 11))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def test_the_updates_between_logging_steps_are_recorded_at_the_next_one(lm):
    model, opt = lm
    rule = SignalRule("loss", 1.01, "falling", baseline=1, lag=0, smooth=1, persist=1, start=0)
    mon = StabilityMonitor(model, every=3, signal_rules=[rule], per_update=True)
    want = {"loss": [], "grad_norm": [], "log_z_rms": [], "grad_rms_eps_min": []}
    layers = [[p for _, p in ps] for row, ps in mon._site_plan.groups if row != "(other)"]
    for _ in range(4):
        x = torch.randint(0, 11, (2, 5))
        with mon.step() as s:
            logits = model(x)
            mon.observe_logits(logits)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), x.reshape(-1))
            loss.backward()
            mon.capture_grads()
            gn = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
            rms = min(math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ps) / sum(p.numel() for p in ps))
                      for ps in layers)
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            opt.zero_grad()
            s.loss = loss
        lz = logits.detach().logsumexp(-1).reshape(-1).tolist()
        want["loss"].append(float(loss.detach()))
        want["grad_norm"].append(gn)
        want["grad_rms_eps_min"].append(rms / 1e-8)
        want["log_z_rms"].append(math.sqrt(sum(v * v for v in lz) / len(lz)))
        if len(want["loss"]) == 1:
            first_update = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(model.parameters(),
                                                                                                before))
                                     / sum(float(b.pow(2).sum()) for b in before))
    r0, r1 = mon.history
    assert r0["updates"]["update"] == [0] and r1["updates"]["update"] == [1, 2, 3]
    for key, vals in want.items():
        got = r0["updates"][key] + r1["updates"][key]
        assert got == pytest.approx(vals, rel=1e-4), key
    assert r0["update_rms"] == pytest.approx(first_update, rel=1e-4)
    assert set(r0["quantities"]["attn_entropy"]) == {"1.sublayers.0", "1.sublayers.2"}
    assert all(0 < v <= math.log(5) for v in r0["quantities"]["attn_entropy"].values())
    # the per-update rule: the loss fell below its previous value at some update, warned with that update
    falls = [t for t in range(1, 4) if want["loss"][t] * 1.01 <= want["loss"][t - 1]]
    signal_warnings = [w for w in mon.warnings if w["quantity"] == "loss"]
    assert falls and [w["update"] for w in signal_warnings] == falls[:1]
    mon.close()


def test_the_logged_attention_entropy_is_the_formula_on_the_projections(lm):
    model, _ = lm
    mon = StabilityMonitor(model, every=1)
    x = torch.randint(0, 11, (2, 5))
    with mon.step():
        model(x).sum().backward()
    with torch.no_grad():
        h = model[1].norms[0](model[1].input_norm(model[0](x)))
        att = model[1].sublayers[0]
        want = attention_entropy(att.q_proj(h), att.k_proj(h), 2)
    assert mon.history[0]["quantities"]["attn_entropy"]["1.sublayers.0"] == pytest.approx(float(want), rel=1e-5)
    mon.close()


def test_bad_signal_rules_are_refused_before_anything_is_attached(lm):
    model, _ = lm
    with pytest.raises(TypeError, match="rules"):
        StabilityMonitor(model, signal_rules="loss")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_step_between_logging_steps_brings_nothing_to_the_host(lm, monkeypatch):
    model, opt = lm
    mon = StabilityMonitor(model, every=100, per_update=True)
    x = torch.randint(0, 11, (2, 5))
    with mon.step():  # step 0: logged
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()

    def refuse(*_a, **_k):
        raise AssertionError("host-device sync between logging steps")

    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), x.reshape(-1))
    loss.backward()
    with monkeypatch.context() as m:
        # the device path (a GPU's): CPU tensors taken as no host memory (on a CPU reading them is no sync, and the
        # monitor reads the norms and the loss there: test_monitor_signals_adversarial.py counts those reads)
        m.setattr(scalar_reader, "host_memory", lambda device: False)
        for name in ("item", "tolist", "__bool__", "__float__", "cpu"):
            m.setattr(torch.Tensor, name, refuse)
        mon.begin_step()
        mon.observe_logits(logits)
        mon.capture_grads()
        mon.end_step(loss)
    assert mon.step_count == 2
    mon.close()


def test_by_default_no_per_update_stream_is_kept(lm):
    model, opt = lm
    mon = StabilityMonitor(model, every=2)
    for _ in range(3):
        x = torch.randint(0, 11, (2, 5))
        with mon.step() as s:
            logits = model(x)
            mon.observe_logits(logits)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), x.reshape(-1))
            loss.backward()
            mon.capture_grads()
            opt.step()
            opt.zero_grad()
            s.loss = loss
    assert [r["updates"] for r in mon.history] == [{"update": []}, {"update": []}]
    assert mon.history[1]["loss"] > 0 and "log_z" in mon.history[1]
    with pytest.raises(TypeError, match="per_update"):
        StabilityMonitor(model, per_update="yes")
    mon.close()


# ---------------------------------------------------------------- adversarial review (issue 41's public API)

@pytest.mark.parametrize("kwargs, match", [
    (dict(signal_rules=[SignalRule("grad_nrom", 2.0)], per_update=True), r"signal_rules\[0\].*grad_nrom.*accepted"),
    (dict(signal_rules=[SignalRule("attn_entropy_min", 2.0)], per_update=True), "attn_entropy_min"),
    (dict(signal_rules=[SignalRule("loss", 2.0), SignalRule("loss", 2.0)], per_update=True), "repeats")])
def test_rules_that_could_never_fire_are_refused(lm, kwargs, match):
    model, _ = lm
    with pytest.raises(ValueError, match=match):
        StabilityMonitor(model, **kwargs)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _train(mon, model, opt, n, losses=None):
    for i in range(n):
        x = torch.randint(0, 11, (2, 5))
        with mon.step() as s:
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), x.reshape(-1))
            loss.backward()
            mon.capture_grads()
            opt.step()
            opt.zero_grad()
            s.loss = loss if losses is None else losses[i]


def test_an_update_without_a_loss_is_no_warning_and_a_nan_loss_is(lm, tmp_path):
    from stability_toolbox.records import read_records
    model, opt = lm
    rule = SignalRule("loss", 2.0, baseline=2, lag=0, smooth=1, persist=1, start=0)
    mon = StabilityMonitor(model, tmp_path, every=4, signal_rules=[rule], per_update=True, tensorboard=False,
                           heatmaps=False)
    _train(mon, model, opt, 5, losses=[1.0, None, 1.0, 1.0, 1.0])
    assert mon.history[-1]["updates"]["loss"] == [None, 1.0, 1.0, 1.0] and mon.warnings == []
    mon.close()
    assert read_records(tmp_path / "monitor.jsonl")[-1]["updates"]["loss"] == [None, 1.0, 1.0, 1.0]
    mon = StabilityMonitor(model, every=2, signal_rules=[rule], per_update=True)
    _train(mon, model, opt, 3, losses=[1.0, float("nan"), 1.0])
    assert [w["update"] for w in mon.warnings if "update" in w] == [1]   # (the logged-step rule warns too)
    mon.close()


def test_a_parameter_unused_by_the_forward_pass_keeps_the_default_rules_signal(lm):
    model, opt = lm
    model[1].register_parameter("unused", torch.nn.Parameter(torch.zeros(3)))   # never gets a gradient
    mon = StabilityMonitor(model, every=2, per_update=True)
    layers = [[p for _, p in ps if p is not model[1].unused] for row, ps in mon._site_plan.groups
              if row != "(other)"]
    x = torch.randint(0, 11, (2, 5))
    with mon.step():
        logits = model(x)
        torch.nn.functional.cross_entropy(logits.reshape(-1, 11), x.reshape(-1)).backward()
        mon.capture_grads()
        want = min(math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ps) / sum(p.numel() for p in ps))
                   for ps in layers if ps) / 1e-8
        opt.zero_grad()
    assert mon.history[0]["updates"]["grad_rms_eps_min"] == [pytest.approx(want, rel=1e-4)]
    assert mon.warnings == []
    mon.close()


def test_two_monitors_on_one_model_keep_the_same_stream(lm):
    model, opt = lm
    a, b = StabilityMonitor(model, every=2, per_update=True), StabilityMonitor(model, every=3, per_update=True)
    norms = []
    for _ in range(4):
        x = torch.randint(0, 11, (2, 5))
        a.begin_step()
        b.begin_step()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), x.reshape(-1))
        loss.backward()
        a.capture_grads()
        b.capture_grads()
        norms.append(math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters())))
        opt.step()
        opt.zero_grad()
        a.end_step(loss)
        b.end_step(loss)
    for mon, n in ((a, 3), (b, 4)):
        got = [v for r in mon.history for v in r["updates"]["grad_norm"]]
        assert got == pytest.approx(norms[:n], rel=1e-5)
        mon.close()
