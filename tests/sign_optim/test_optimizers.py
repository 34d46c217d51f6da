"""AddSign and PowerSign against their update rules written out in numpy (REFERENCE section 3), the
foreach path against the single-tensor path, state_dict round trips, and bad input."""

import copy
import math
import pickle

import numpy as np
import pytest
import torch

from sign_optim import (
    AddSign,
    CosineInternalDecay,
    LinearInternalDecay,
    PowerSign,
    RestartCosineInternalDecay,
)
from torch_helpers import saved_and_loaded, sign_rule_step

OPTIMIZERS = {"addsign": AddSign, "powersign": PowerSign}


def reference(rule, w0, grads, lr, beta, alpha, decay=None, weight_decay=0.0, maximize=False):
    """TF's rule, step by step (`sign_rule_step`): moving average first, d evaluated at the step before the update."""
    w = np.array(w0, dtype=np.float64)
    m = np.zeros_like(w)
    for t, g in enumerate(grads):
        w, m = sign_rule_step(rule, w, m, g, lr=lr, beta=beta, alpha=alpha, decay=1.0 if decay is None else decay(t),
                              weight_decay=weight_decay, maximize=maximize)
    return w


def run(opt_cls, w0, grads, **kwargs):
    p = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = opt_cls([p], **kwargs)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach().numpy(), opt


def grad_sequence(steps, size, seed=0):
    """Gradients with persistent signs (so sign(g) sign(m) takes both values), some exact zeros."""
    rng = np.random.default_rng(seed)
    drift = rng.normal(size=size)
    grads = drift + rng.normal(scale=1.5, size=(steps, size))
    grads[rng.random((steps, size)) < 0.05] = 0.0
    return grads


DECAYS = {
    "none": None,
    "linear": LinearInternalDecay(60),
    "cosine": CosineInternalDecay(60, num_periods=1.5, zero_after=1),
    "restart": RestartCosineInternalDecay(40, num_periods=3, zero_after=2),
}


@pytest.mark.parametrize("rule", OPTIMIZERS)
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("foreach", [False, True])
def test_rule_matches_formula(rule, decay, foreach):
    grads = grad_sequence(80, 50)
    w0 = np.linspace(-1, 1, 50)
    alpha = 1.0 if rule == "addsign" else math.e
    got, _ = run(OPTIMIZERS[rule], w0, grads, lr=0.01, beta=0.9, alpha=alpha, sign_internal_decay=DECAYS[decay], foreach=foreach)
    want = reference(rule, w0, grads, 0.01, 0.9, alpha, DECAYS[decay])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule,alpha", [("addsign", 0.5), ("addsign", 0.0), ("powersign", 2.0), ("powersign", 0.3), ("powersign", 1.0)])
@pytest.mark.parametrize("weight_decay,maximize", [(0.0, True), (0.1, False), (0.05, True)])
def test_options_match_formula(rule, alpha, weight_decay, maximize):
    grads = grad_sequence(40, 20, seed=1)
    w0 = np.linspace(-2, 2, 20)
    decay = LinearInternalDecay(30)
    got, _ = run(OPTIMIZERS[rule], w0, grads, lr=0.03, beta=0.5, alpha=alpha, sign_internal_decay=decay,
                 weight_decay=weight_decay, maximize=maximize)
    want = reference(rule, w0, grads, 0.03, 0.5, alpha, decay, weight_decay, maximize)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule", OPTIMIZERS)
@pytest.mark.parametrize("foreach", [False, True])
def test_zero_moving_average_means_factor_one(rule, foreach):
    """beta=0.5, g = 2 then -1: m is exactly 0 after the second step, so sign(m) = 0 and the factor is
    alpha (AddSign) or 1 (PowerSign); beta=0: m = g, the factor is always alpha + d or base**d."""
    grads = np.array([[2.0, 1.0], [-1.0, -1.0]])
    got, opt = run(OPTIMIZERS[rule], [0.0, 0.0], grads, lr=1.0, beta=0.5, alpha=3.0, foreach=foreach)
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg"][0].item() == 0.0
    np.testing.assert_allclose(got, reference(rule, [0.0, 0.0], grads, 1.0, 0.5, 3.0), rtol=1e-14)
    got, _ = run(OPTIMIZERS[rule], [0.0], [[2.0]], lr=1.0, beta=0.0, alpha=3.0, foreach=foreach)
    assert got[0] == pytest.approx(-2.0 * 4.0 if rule == "addsign" else -2.0 * 3.0, rel=1e-14)


def test_first_update_uses_decay_at_step_zero():
    seen = []

    def decay(step):
        seen.append(step)
        return 0.0 if step == 0 else 1.0

    got, _ = run(AddSign, [0.0], [[1.0], [1.0]], lr=1.0, beta=0.9, alpha=1.0, sign_internal_decay=decay)
    assert seen == [0, 1]
    assert got[0] == pytest.approx(-1.0 - 2.0)  # first update: alpha * g; second: (alpha + 1) * g


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)
    ).to(dtype)


def train(model, opt, steps, seed=1, skip_bias_every=0):
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    for t in range(steps):
        x = torch.randn(32, 6, generator=gen, dtype=params[0].dtype)
        y = torch.randint(0, 3, (32,), generator=gen)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if skip_bias_every and t % skip_bias_every == 0:
                params[-1].grad = None  # this parameter's step counter falls behind: per-tensor decays
            return loss

        loss = opt.step(closure)
        assert torch.isfinite(loss)
    return loss


@pytest.mark.parametrize("rule", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.01, "maximize": True}, {"skip": 3}])
def test_foreach_equals_single_tensor(rule, dtype, options):
    options = dict(options)
    skip = options.pop("skip", 0)
    results = []
    for foreach in (False, True):
        model = make_model(dtype)
        opt = OPTIMIZERS[rule](model.parameters(), lr=0.01, foreach=foreach,
                               sign_internal_decay=CosineInternalDecay(12, num_periods=1), **options)
        train(model, opt, 15, skip_bias_every=skip)
        results.append([p.detach().clone() for p in model.parameters()] + [opt.state[p]["exp_avg"] for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    if skip:
        steps = [opt.state[p]["step"] for p in model.parameters()]
        assert steps[-1] < steps[0] == 15


def test_foreach_default_on_for_cpu_tensors():
    model = make_model()
    opt = AddSign(model.parameters())
    assert opt.param_groups[0]["foreach"] is None  # resolved per step, like torch.optim
    train(model, opt, 2)


def test_state_is_one_tensor_per_parameter():
    model = make_model()
    opt = PowerSign(model.parameters())
    train(model, opt, 3)
    for p in model.parameters():
        state = opt.state[p]
        assert set(state) == {"step", "exp_avg"} and state["step"] == 3
        assert state["exp_avg"].shape == p.shape and state["exp_avg"].dtype == p.dtype


@pytest.mark.parametrize("rule", OPTIMIZERS)
@pytest.mark.parametrize("decay", ["linear", "cosine", "restart"])
@pytest.mark.parametrize("via_file", [False, True])
def test_state_dict_resume_continues_exactly(rule, decay, via_file):
    def fresh(with_decay=True):
        model = make_model()
        opt = OPTIMIZERS[rule]([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:], "lr": 0.003}],
                               lr=0.01, weight_decay=0.01, sign_internal_decay=DECAYS[decay] if with_decay else None)
        return model, opt

    model, opt = fresh()
    train(model, opt, 10, seed=1)
    train(model, opt, 10, seed=2)
    unbroken = [p.detach().clone() for p in model.parameters()]

    model, opt = fresh()
    train(model, opt, 10, seed=1)
    sd = opt.state_dict()
    model_sd = copy.deepcopy(model.state_dict())
    if via_file:
        loaded = saved_and_loaded({"optimizer": sd, "model": model_sd})
        sd, model_sd = loaded["optimizer"], loaded["model"]
    pickle.dumps(sd)
    model2, opt2 = fresh(with_decay=False)  # the decay comes back from the state dict
    model2.load_state_dict(model_sd)
    opt2.load_state_dict(sd)
    assert opt2.sign_internal_decay == DECAYS[decay]
    assert opt2.state_dict()["sign_internal_decay"] == sd["sign_internal_decay"]
    train(model2, opt2, 10, seed=2)
    for a, b in zip(unbroken, model2.parameters()):
        assert torch.equal(a, b)


def test_custom_callable_decay_is_kept_not_serialized():
    def decay(step):
        return 1.0 / (1 + step)

    model = make_model()
    opt = AddSign(model.parameters(), sign_internal_decay=decay)
    train(model, opt, 3)
    sd = opt.state_dict()
    assert sd["sign_internal_decay"]["kind"] == "custom"
    sd = saved_and_loaded(sd)
    with pytest.raises(ValueError, match="custom sign_internal_decay"):
        AddSign(make_model().parameters()).load_state_dict(sd)
    again = AddSign(make_model().parameters(), sign_internal_decay=decay)
    again.load_state_dict(sd)
    assert again.sign_internal_decay is decay


def test_no_decay_round_trip_and_deepcopy():
    model = make_model()
    opt = PowerSign(model.parameters(), sign_internal_decay=LinearInternalDecay(5))
    train(model, opt, 2)
    clone = copy.deepcopy(opt)
    assert clone.sign_internal_decay == opt.sign_internal_decay
    none_opt = PowerSign(make_model().parameters())
    sd = none_opt.state_dict()
    assert sd["sign_internal_decay"] is None
    opt.load_state_dict(sd)  # loading a state saved without a decay removes the decay
    assert opt.sign_internal_decay is None


def test_closure_returns_loss():
    model = make_model()
    opt = AddSign(model.parameters(), lr=0.05)
    first = train(model, opt, 1)
    last = train(model, opt, 60)
    assert last < first


def test_sparse_gradients_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    dense = torch.nn.Parameter(torch.ones(3))
    for cls in OPTIMIZERS.values():
        opt = cls([dense, *emb.parameters()])
        dense.grad = torch.ones(3)
        emb(torch.tensor([1, 2])).sum().backward()
        with pytest.raises(TypeError, match="sparse gradients"):
            opt.step()
        assert torch.equal(dense, torch.ones(3)) and len(opt.state) == 0  # nothing half-done
        emb.zero_grad(set_to_none=True)


def p():
    return [torch.nn.Parameter(torch.zeros(2))]


@pytest.mark.parametrize(
    "build,exc,match",
    [
        (lambda: AddSign(p(), lr=-0.1), ValueError, "lr"),
        (lambda: PowerSign(p(), lr=-1e-3), ValueError, "lr"),
        (lambda: AddSign(p(), beta=1.0), ValueError, "beta"),
        (lambda: AddSign(p(), beta=-0.1), ValueError, "beta"),
        (lambda: PowerSign(p(), beta=1.5), ValueError, "beta"),
        (lambda: PowerSign(p(), alpha=0.0), ValueError, "alpha"),
        (lambda: PowerSign(p(), alpha=-2.0), ValueError, "alpha"),
        (lambda: AddSign(p(), alpha=math.inf), ValueError, "alpha"),
        (lambda: AddSign(p(), lr="0.1"), TypeError, "lr"),
        (lambda: AddSign(p(), weight_decay=-1), ValueError, "weight_decay"),
        (lambda: AddSign(p(), sign_internal_decay=3), TypeError, "sign_internal_decay"),
        (lambda: AddSign([{"params": p(), "beta": 2.0}]), ValueError, "beta"),
        (lambda: PowerSign(p(), sign_internal_decay=LinearInternalDecay(0)), ValueError, "T_max"),
        (lambda: PowerSign(p(), sign_internal_decay=CosineInternalDecay(10, num_periods=0)), ValueError, "num_periods"),
        (lambda: AddSign([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))]), TypeError, "complex"),
        (lambda: AddSign(p(), maximize=1), TypeError, "maximize"),
    ],
)
def test_bad_input(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_bad_decay_value_rejected():
    param = p()
    param[0].grad = torch.ones(2)
    opt = AddSign(param, sign_internal_decay=lambda step: math.nan)
    with pytest.raises(ValueError, match="sign_internal_decay"):
        opt.step()


@pytest.mark.parametrize("rule", OPTIMIZERS)
@pytest.mark.parametrize("chunk", [0, 64, 1000, 1 << 16])
def test_cpu_chunked_foreach_equals_single_tensor(rule, chunk):
    """The CPU foreach path works on cache-sized pieces (big tensors cut into flat views): same result."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(300, 70), (37, 29), (1000,), (5, 3), (130, 1), (4097,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(6)]
    grads[2][1] = None  # one tensor without a gradient once: its decay lags behind
    results = []
    for foreach in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = OPTIMIZERS[rule](params, lr=0.1, weight_decay=0.01, maximize=True, foreach=foreach,
                               sign_internal_decay=CosineInternalDecay(5, num_periods=1))
        opt.cpu_chunk_numel = chunk
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g
            opt.step()
        results.append(params + [opt.state[p]["exp_avg"] for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)
