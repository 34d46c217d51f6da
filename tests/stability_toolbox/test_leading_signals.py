"""stability_toolbox.leading_signals: each per-update signal against its formula written out (loops over
plain numbers, scipy's kurtosis, Adam's moment recursion), and no host-device sync per update."""

import math

import pytest
import torch
from scipy import stats

from admin_torch import make_stack
from stability_toolbox.leading_signals import (SIGNALS, LayerGradients, UpdateSignals, UpdateStream,
                                               attention_entropy, excess_kurtosis, grad_rms_over_eps,
                                               second_moment_stats, update_ratio)
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


# ---------------------------------------------------------------- adversarial review (issue 41's public API)

def test_bad_arguments_of_the_formulas_are_refused_by_name():
    for eps in (0.0, -1e-8, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="eps"):
            grad_rms_over_eps([torch.ones(2)], eps)
    with pytest.raises(ValueError, match="before and after"):   # zip would drop the second tensor
        update_ratio([torch.ones(2), torch.ones(2)], [torch.ones(2)])
    with pytest.raises(ValueError, match=r"after\[0\]"):
        update_ratio([torch.ones(2)], [torch.ones(3)])
    with pytest.raises(ValueError, match="n_heads"):
        attention_entropy(torch.randn(1, 3, 4), torch.randn(1, 3, 4), 0)
    with pytest.raises(ValueError, match="n_heads=3"):
        attention_entropy(torch.randn(1, 3, 4), torch.randn(1, 3, 4), 3)
    with pytest.raises(TypeError, match="optimizer"):
        second_moment_stats("adam")


def test_an_empty_parameter_adds_nothing_to_the_second_moment():
    p, q = torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p, q], lr=0.1, betas=(0.9, 0.5))
    p.grad, q.grad = torch.zeros(0), torch.tensor([2.0, 4.0])
    opt.step()
    assert second_moment_stats(opt).tolist() == pytest.approx([math.sqrt(5.0), math.sqrt(8.0)])


@pytest.mark.parametrize("kwargs, error", [(dict(eps=float("inf")), ValueError), (dict(eps="1e-8"), TypeError),
                                           (dict(activations="no"), TypeError)])
def test_bad_keyword_arguments_are_refused(lm, kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        UpdateSignals(*lm, **kwargs)


def _update(model, opt, sig):
    x = torch.randint(0, 11, (2, 5))
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), x.reshape(-1))
    loss.backward()
    sig.after_backward()
    opt.step()
    sig.after_step(loss)
    opt.zero_grad()
    return loss


def test_a_signal_not_measured_reads_none_and_a_bad_loss_changes_nothing(lm):
    model, _ = lm
    opt = torch.optim.SGD(model.parameters(), lr=0.1)   # no exp_avg_sq, no eps: grad_rms_eps in 1e-8
    sig = UpdateSignals(model, opt)
    loss = _update(model, opt, sig)
    with pytest.raises(TypeError, match="loss"):
        sig.after_step("2.0")
    sig.after_step(torch.zeros(0))   # an update without forward pass and with an empty loss
    out = sig.read()
    assert out["log_z_mean"] == [None, None] and out["adam_v_max"] == [None, None]   # never NaN for "absent"
    assert out["loss"] == [pytest.approx(float(loss.detach())), None]
    # the linear rows stay one per update: the second update ran no linear
    assert len(out["linear_rms"]) == 2 and out["linear_rms"][1] == [None] * len(out["linears"])
    assert out["linear_rms_max"][1] is None and all(v is not None for v in out["linear_rms"][0])


class _PlainDescent(torch.optim.Optimizer):
    """A custom optimizer: no eps, no moments."""

    def __init__(self, params):
        super().__init__(params, dict(lr=0.01))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-g["lr"])


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.1), _PlainDescent,
                                  lambda ps: __import__("sign_optim").AddSign(ps, lr=1e-3)],
                         ids=["sgd", "custom", "addsign"])
def test_optimizers_without_adams_moments(lm, make):
    model, _ = lm
    opt = make(model.parameters())
    sig = UpdateSignals(model, opt)
    loss = _update(model, opt, sig)
    out = sig.read()
    assert out["loss"][0] == pytest.approx(float(loss.detach())) and out["adam_v_rms"] == [None]
    assert 0 < out["update_ratio"][0] < 1 and math.isfinite(out["grad_rms_eps"][0])


def test_half_precision_gradients_are_normed_in_float32():
    # each entry 1000 is a float16, their norm 1000 * sqrt(20000) is not (> 65504): inf would read as a blow-up
    layer = torch.nn.Sequential(torch.nn.LayerNorm(4))
    big = torch.nn.Parameter(torch.zeros(20000, dtype=torch.float16))
    layer.register_parameter("big", big)
    sig = UpdateSignals(layer, torch.optim.SGD(layer.parameters(), lr=0.0), activations=False)
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)
    big.grad = torch.full_like(big, 1000.0)
    sig.after_backward()
    sig.after_step()
    assert sig.read()["grad_norm"][0] == pytest.approx(1000.0 * math.sqrt(20000), rel=1e-4)
    out = LayerGradients([("l0", [("big", big)])])(1e-8)
    assert float(out["grad_norm"]) == pytest.approx(1000.0 * math.sqrt(20000), rel=1e-4)
    assert float(out["grad_rms_eps_min"]) == pytest.approx(1000.0 / 1e-8, rel=1e-4)


def test_a_parameter_without_gradient_is_left_out_of_the_layer_rms():
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (4, 1, 2))
    a.grad, b.grad = torch.full((4,), 3e-8), torch.tensor([4e-8])   # c: unused by the forward pass, no grad
    groups = [("l0", [("a", a), ("c", c)]), ("l1", [("b", b)])]
    out = LayerGradients(groups)(1e-8)
    assert float(out["grad_norm"]) == pytest.approx(math.sqrt(4 * 9e-16 + 16e-16), rel=1e-5)
    assert float(out["grad_rms_eps_min"]) == pytest.approx(3.0, rel=1e-5)   # l0 over a only; l1: 4
    b.grad = None   # l1 has no gradient at all: it is no layer at this step
    assert float(LayerGradients(groups)(1e-8)["grad_rms_eps_min"]) == pytest.approx(3.0, rel=1e-5)


def test_a_copy_of_the_model_does_not_report_and_the_model_pickles(lm):
    import copy
    import io
    model, opt = lm
    sig = UpdateSignals(model, opt)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(10.0)
    x = torch.randint(0, 11, (2, 5))
    model(x)
    ema(x)   # an EMA copy's forward between the update's forward and after_step
    sig.after_step()
    got = sig.read()["linear_rms"][0]
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, _a, out, n=n: seen.__setitem__(n, float(out.detach().pow(2).mean().sqrt()))) for n in sig.linears]
    model(x)
    for h in hooks:
        h.remove()
    assert got == pytest.approx([seen[n] for n in sig.linears], rel=1e-5)
    torch.save(model, io.BytesIO())
    sig.remove()


def test_update_stream_refuses_bad_values_and_reads_none_for_absent():
    s = UpdateStream()
    with pytest.raises(TypeError, match="value"):
        s.put("loss", torch.ones(3))
    with pytest.raises(TypeError, match="value"):
        s.put("loss", "1.0")
    with pytest.raises(TypeError, match="name"):
        s.put(3, 1.0)
    s.put("loss", 2.0)
    s.end(0)
    s.put("grad_norm", torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="step"):
        s.end(-1)
    s.end(1)
    out = s.read()
    assert out["loss"] == [2.0, None] and out["grad_norm"][0] is None and math.isnan(out["grad_norm"][1])


# ------------------------------------------------------------------ the host path of CPU gradients

# huge: every gradient holds one; each tensor's norm is a float32, the sum of two squares is not
_SPECIAL = {"finite": None, "nan": math.nan, "inf": math.inf, "huge": 1.5e19}


@pytest.mark.parametrize("model_norm", [True, False])
@pytest.mark.parametrize("special", sorted(_SPECIAL))
@pytest.mark.parametrize("seed", range(4))
def test_the_host_path_gives_the_device_path_values(monkeypatch, seed, special, model_norm):
    """CPU gradients are reduced on the host (Python floats, float64 sums); the device path (a GPU's: torch ops
    in float32) is taken by telling it CPU tensors are no host memory. Both agree with the formula written
    out, NaN and inf included; a layer with no gradient, or only empty parameters, is no layer."""
    from stability_toolbox import scalar_reader

    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (0,), (2, 2), (7,), (1,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for i, p in enumerate(params):
        if (seed + i) % 5 != 0:  # some parameters have no gradient at this step
            p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** float(torch.randint(-9, 3, (), generator=gen))
    live = [p for p in params if p.grad is not None and p.grad.numel()]
    if _SPECIAL[special] is not None and live:
        for p in live if special == "huge" else live[seed % len(live):][:1]:
            p.grad.view(-1)[0] = _SPECIAL[special]
    groups = [("l0", [("a", params[0]), ("b", params[1])]), ("l1", [("c", params[2])]),
              ("l2", [("d", params[3]), ("e", params[4])]), ("(other)", [("f", params[5])])]
    host = LayerGradients(groups, model_norm=model_norm)(1e-8)
    with monkeypatch.context() as m:
        m.setattr(scalar_reader, "host_memory", lambda device: False)
        device = {k: float(v) for k, v in LayerGradients(groups, model_norm=model_norm)(1e-8).items()}
    assert all(type(v) is float for v in host.values())
    # written out: each layer's entries, squared and summed in float64
    rms, total = [], 0.0
    for row, ps in groups:
        entries = [x for _, p in ps if p.grad is not None for x in p.grad.double().reshape(-1).tolist()]
        total += sum(x * x for x in entries) if (row != "(other)" or model_norm) else 0.0
        if row != "(other)" and entries:
            rms.append(math.sqrt(sum(x * x for x in entries) / len(entries)))
    want = {}
    if model_norm:
        want["grad_norm"] = math.sqrt(total)
    if any(p.grad is not None for _, ps in groups[:3] for _, p in ps):
        want["grad_rms_eps_min"] = (math.nan if any(r != r for r in rms) else min(rms, default=math.inf)) / 1e-8
    assert set(host) == set(device) == set(want)
    for k in want:
        for got in (host[k], device[k]):
            if math.isnan(want[k]):
                assert math.isnan(got), (k, got)
            else:
                assert got == pytest.approx(want[k], rel=1e-5), (k, got, want[k])
