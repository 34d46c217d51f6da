"""stability_toolbox.leading_signals: each per-update signal against its formula written out (loops over
plain numbers, scipy's kurtosis, Adam's moment recursion), and no host-device sync per update."""

import math

import pytest
import torch
from scipy import stats

from admin_torch import make_stack
from stability_toolbox.leading_signals import (SIGNALS, UpdateSignals, attention_entropy, excess_kurtosis,
                                               grad_rms_over_eps, second_moment_stats, update_ratio)
from stability_toolbox.sites import SitePlan


def test_grad_rms_over_eps_is_the_rms_of_every_entry_over_eps():
    gs = [torch.randn(3, 4), torch.randn(5)]
    flat = [x for g in gs for x in g.reshape(-1).tolist()]
    want = math.sqrt(sum(x * x for x in flat) / len(flat)) / 1e-6
    assert float(grad_rms_over_eps(gs, 1e-6)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="grads"):
        grad_rms_over_eps([], 1e-8)


def test_update_ratio_is_the_norm_of_the_change_over_the_norm_of_the_weights():
    before = [torch.randn(4, 3), torch.randn(2)]
    after = [b + 0.1 * torch.randn_like(b) for b in before]
    num = sum((a - b) ** 2 for x, y in zip(after, before)
              for a, b in zip(x.reshape(-1).tolist(), y.reshape(-1).tolist()))
    den = sum(b ** 2 for y in before for b in y.reshape(-1).tolist())
    assert float(update_ratio(before, after)) == pytest.approx(math.sqrt(num / den), rel=1e-5)


@pytest.mark.parametrize("n_heads", [1, 2])
def test_attention_entropy_is_the_mean_softmax_entropy_per_head_and_query(n_heads):
    b, tq, tk, d = 2, 3, 4, 4
    q, k = torch.randn(b, tq, d) * 2, torch.randn(b, tk, d)
    dh = d // n_heads
    ents = []
    for bi in range(b):
        for h in range(n_heads):
            for i in range(tq):
                z = [sum(q[bi, i, h * dh + c].item() * k[bi, j, h * dh + c].item() for c in range(dh)) / math.sqrt(dh)
                     for j in range(tk)]
                m = max(z)
                e = [math.exp(x - m) for x in z]
                p = [x / sum(e) for x in e]
                ents.append(-sum(x * math.log(x) for x in p))
    assert float(attention_entropy(q, k, n_heads)) == pytest.approx(sum(ents) / len(ents), rel=1e-5)


def test_excess_kurtosis_matches_scipy_and_is_zero_for_a_constant():
    x = torch.randn(200) ** 3
    assert float(excess_kurtosis(x)) == pytest.approx(stats.kurtosis(x.numpy(), fisher=True, bias=True), rel=1e-4)
    assert float(excess_kurtosis(torch.full((5,), 3.0))) == 0.0


def test_second_moment_stats_follow_adams_recursion():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.8))
    assert second_moment_stats(opt) is None   # no state before the first step
    g1, g2 = [1.0, -2.0, 3.0], [0.5, 4.0, -1.0]
    for g in (g1, g2):
        p.grad = torch.tensor(g)
        opt.step()
    v = [0.8 * (0.2 * a * a) + 0.2 * b * b for a, b in zip(g1, g2)]
    rms, top = second_moment_stats(opt).tolist()
    assert rms == pytest.approx(math.sqrt(sum(v) / 3), rel=1e-5) and top == pytest.approx(math.sqrt(max(v)), rel=1e-5)


@pytest.fixture
def lm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), make_stack("pre_ln", depth=2, dim=8, heads=2, seed=0,
                                                                      causal=True), torch.nn.Linear(8, 11))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6)


def test_recorded_signals_equal_the_quantities_computed_directly(lm):
    model, opt = lm
    sig = UpdateSignals(model, opt)
    groups = [(row, [p for _, p in ps]) for row, ps in SitePlan(model).groups if row != "(other)"]
    want = []
    for _ in range(3):
        x = torch.randint(0, 11, (2, 5))
        sig.begin_update()
        logits = model(x)
        sig.observe_logits(logits)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), x.reshape(-1))
        loss.backward()
        sig.after_backward()
        grads = [p.grad.reshape(-1).tolist() for p in model.parameters()]
        flat = [g for gs in grads for g in gs]
        layer = [math.sqrt(sum(float(g.pow(2).sum()) for g in (p.grad for p in ps))) for _, ps in groups]
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        sig.after_step(loss)
        lz = logits.detach().logsumexp(-1).reshape(-1).tolist()
        want.append({"loss": float(loss.detach()), "grad_norm": math.sqrt(sum(g * g for g in flat)),
                     "grad_rms_eps": math.sqrt(sum(g * g for g in flat) / len(flat)) / 1e-6,
                     "grad_ratio_min": min(layer) / max(layer),
                     "update_ratio": float(update_ratio(before, list(model.parameters()))),
                     "log_z_mean": sum(lz) / len(lz), "log_z_rms": math.sqrt(sum(z * z for z in lz) / len(lz))})
        opt.zero_grad()
    got = sig.read()
    assert set(SIGNALS) <= set(got) and len(got["linear_rms"]) == 3 and len(got["linears"]) == 2 * 6 + 1
    for i, w in enumerate(want):
        for key, v in w.items():
            assert got[key][i] == pytest.approx(v, rel=1e-4), key
    assert all(0 < e <= math.log(5) + 1e-6 for e in got["attn_entropy_min"])
    assert all(a > 0 for a in got["attn_logit_max"]) and all(v > 0 for v in got["adam_v_max"])
    assert got["linear_rms_max"][0] == pytest.approx(max(got["linear_rms"][0]), rel=1e-6)
    sig.remove()
    assert not any(m._forward_hooks for m in model.modules())


def test_no_host_sync_per_update(lm, monkeypatch):
    """Between reads nothing is brought to the host: item/tolist/bool/float of a tensor are not called."""
    model, opt = lm
    sig = UpdateSignals(model, opt)

    def refuse(*_a, **_k):
        raise AssertionError("host-device sync inside an update")

    x = torch.randint(0, 11, (2, 5))
    for _ in range(2):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), x.reshape(-1))
        loss.backward()
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__", "cpu"):
                m.setattr(torch.Tensor, name, refuse)
            sig.observe_logits(logits)
            sig.after_backward()
        opt.step()   # (torch's Adam reads its CPU step counter with item(): not ours)
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__", "cpu"):
                m.setattr(torch.Tensor, name, refuse)
            sig.after_step(loss)
        opt.zero_grad()
    assert len(sig.read()["loss"]) == 2


@pytest.mark.parametrize("bad", [None, "x", torch.zeros(0, 3), torch.zeros(3, dtype=torch.long)])
def test_bad_logits_are_refused(lm, bad):
    sig = UpdateSignals(*lm)
    with pytest.raises(TypeError, match="logits"):
        sig.observe_logits(bad)


def test_bad_arguments_are_refused(lm):
    model, opt = lm
    with pytest.raises(TypeError, match="model"):
        UpdateSignals("model", opt)
    with pytest.raises(TypeError, match="optimizer"):
        UpdateSignals(model, "opt")
    with pytest.raises(ValueError, match="eps"):
        UpdateSignals(model, opt, eps=0.0)
