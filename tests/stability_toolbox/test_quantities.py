"""stability_toolbox.quantities against hand computations: the Recorder's per-site statistics (training and
probe pass, micro-batches averaged, another monitor's probe ignored), the parameter groups' norms, collect's
host-side quantities (grad_ratio, act_frac, output_change, loss_spike) and the fallback's decision."""

import math

import pytest
import torch
from torch import nn

from stability_toolbox.quantities import QUANTITIES, ParameterGroups, Recorder, Site, collect, resolve_fallback


def _t(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _var(t):
    return t.var(unbiased=False)


def _collect(sites, **kw):
    args = dict(grads={}, update={}, weight={}, attn_max={}, loss=(None, None, 0), log_z=None, range_dtype=None,
                history=[])
    args.update(kw)
    return collect(sites, **args)


def test_recorder_averages_beta_over_calls_and_keeps_the_largest_activation():
    rec, site = Recorder(probe_rows=3), Site("s")
    calls = [(_t(0, 2, 4, 8), _t(1, 2, 4, 8) * 3), (_t(2, 2, 4, 8) * 5, _t(3, 2, 4, 8))]
    for f, s in calls:
        rec.record(site, f, s.half())
    assert site.calls == 2 and site.dtype == torch.float16
    want = sum(_var(f) / _var(s.half().float()) for f, s in calls)
    torch.testing.assert_close(site.beta_sum, want)
    torch.testing.assert_close(site.amax, max(max(f.abs().max(), s.half().float().abs().max()) for f, s in calls))
    quantities, model_q = _collect([site])
    assert quantities["beta"]["s"] == pytest.approx(want.item() / 2, rel=1e-6)
    assert quantities["act_frac"]["s"] == pytest.approx(site.amax.item() / torch.finfo(torch.float16).max)
    assert model_q == {} and list(quantities)[:len(QUANTITIES)] == list(QUANTITIES)
    # range_dtype: the margin against another dtype
    quantities, _ = _collect([site], range_dtype=torch.bfloat16)
    assert quantities["act_frac"]["s"] == pytest.approx(site.amax.item() / torch.finfo(torch.bfloat16).max)
    site.reset()
    assert site.calls == 0 and site.beta_sum is None and site.amax is None


def test_probe_pass_keeps_rows_and_output_change_is_relative_to_the_previous_probe():
    rec, site = Recorder(probe_rows=3), Site("s")
    first, second = _t(0, 2, 4, 8), _t(1, 2, 4, 8)
    with rec.probing():
        rec.record(site, first, first)
    assert site.calls == 0 and site.probe.shape == (3, 8)  # the first probe_rows feature vectors
    quantities, _ = _collect([site])
    assert "s" not in quantities["output_change"]  # nothing to compare with yet
    assert site.prev_probe is site.probe
    with rec.probing():
        rec.record(site, second, second)
    quantities, _ = _collect([site])
    a, b = first.reshape(-1, 8)[:3], second.reshape(-1, 8)[:3]
    assert quantities["output_change"]["s"] == pytest.approx(((b - a).pow(2).sum() / a.pow(2).sum()).item(), rel=1e-6)


def test_another_monitors_probe_pass_is_not_recorded():
    mine, other, site = Recorder(probe_rows=2), Recorder(probe_rows=2), Site("s")
    with other.probing():
        assert mine.foreign and not other.foreign
        mine.record(site, _t(0, 4, 8), _t(1, 4, 8))
    assert site.calls == 0 and site.probe is None and not mine.foreign


def test_fallback_keeps_both_readings_and_resolve_fallback_decides_once():
    rec, site = Recorder(probe_rows=2), Site("n2")
    s_prev, y_prev = _t(0, 4, 8), _t(1, 4, 8)
    s = y_prev + 0.1 * _t(2, 4, 8)  # Post-LN-like: the branch off the previous norm's output is small
    rec.record_fallback(site, s, s_prev, y_prev)
    torch.testing.assert_close(site.beta_sum, _var(s - y_prev) / _var(s))
    torch.testing.assert_close(site.alt_sum, _var(s - s_prev) / _var(s))
    assert site.pre_sum.item() == 0.0
    quantities, _ = _collect([site])
    post = dict(quantities["beta"])
    assert resolve_fallback(quantities, "auto") == "post_ln"
    assert "_beta_pre" not in quantities and "_pre_vote" not in quantities and quantities["beta"] == post
    quantities, _ = _collect([site])
    assert resolve_fallback(quantities, "pre_ln") == "pre_ln"
    assert quantities["beta"]["n2"] == pytest.approx(site.alt_sum.item())
    votes = {"beta": {}, "_pre_vote": {"a": 1.0, "b": 1.0, "c": 0.0}, "_beta_pre": {"a": 0.5}}
    assert resolve_fallback(votes, "auto") == "pre_ln" and votes["beta"] == {"a": 0.5}
    assert resolve_fallback({"beta": {}}, "auto") == "auto"  # no fallback site: nothing to decide


def test_parameter_groups_gradients_updates_and_grad_ratio():
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    head = nn.Linear(4, 1)
    groups = [(f"layers.{i}", list(m.named_parameters())) for i, m in enumerate(layers)] + \
        [("(other)", list(head.named_parameters()))]
    pg, handles = ParameterGroups(groups), []
    pg.arm(handles)
    before = [p.detach().clone() for p in layers[0].parameters()]
    x = torch.randn(3, 4)
    head(layers[1](layers[0](x) * 0.01)).sum().backward()
    with torch.no_grad():
        for p in layers[0].parameters():
            p -= 0.1 * p.grad
    grads, update, weight = pg.squares()
    sq = {row: sum(p.grad.pow(2).sum() for _, p in params) for row, params in groups}
    for row in sq:
        torch.testing.assert_close(grads[row], sq[row])
    torch.testing.assert_close(update["layers.0"], sum((p - b).pow(2).sum() for p, b in zip(layers[0].parameters(),
                                                                                            before)))
    assert update["layers.1"].item() == 0.0
    torch.testing.assert_close(weight["layers.0"], sum(b.pow(2).sum() for b in before))
    quantities, _ = _collect([], grads=grads, update=update, weight=weight)
    gn = quantities["grad_norm"]
    top = max(gn["layers.0"], gn["layers.1"])  # "(other)" is no layer: not in grad_ratio
    assert quantities["grad_ratio"] == {"layers.0": pytest.approx(gn["layers.0"] / top),
                                        "layers.1": pytest.approx(gn["layers.1"] / top)}
    assert quantities["update_ratio"]["layers.0"] == pytest.approx(math.sqrt(update["layers.0"] / weight["layers.0"]))
    # capture(): the gradients read now replace the accumulated ones
    for p in layers[1].parameters():
        p.grad.mul_(2.0)
    pg.capture()
    torch.testing.assert_close(pg.squares()[0]["layers.1"], 4 * sq["layers.1"])
    pg.clear()
    assert pg.before is None and pg.grads is None and pg.hooked == {}
    for h in handles:
        h.remove()


def test_model_quantities_and_loss_spike_against_the_recent_median():
    history = [{"loss": v} for v in (1.0, 2.0, float("nan"), 3.0)]  # non-finite losses are left out
    loss = (torch.tensor(12.0), torch.tensor(8.0), 3)
    lz = torch.tensor([1.0, 3.0])
    _, model_q = _collect([], loss=loss, log_z=(lz.sum(), lz.pow(2).sum(), 2), history=history)
    assert model_q == {"loss": 4.0, "loss_max": 8.0, "log_z": 2.0, "log_z_rms": pytest.approx(math.sqrt(5.0)),
                       "loss_spike": 4.0}
    assert list(model_q) == ["loss", "loss_max", "log_z", "log_z_rms", "loss_spike"]
    _, model_q = _collect([], loss=loss)
    assert "loss_spike" not in model_q  # no earlier loss to compare with
