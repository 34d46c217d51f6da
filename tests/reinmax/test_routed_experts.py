"""RoutedFeedForward with each router, against computations written out independently (the routing functions
on their own: test_routing.py).

The independent side runs each expert as a plain ``F.linear -> relu -> F.linear`` on the token
(never the layer's dispatch), writes each router's gradient from the formulas of the paper
(explicit Jacobians), and gets the exact gradient of the expected loss by enumerating the experts.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from reinmax import ROUTERS, SPARSE_ROUTERS, RoutedFeedForward, moe_balance_loss, moe_load
from torch_helpers import expert_outputs, softmax_jacobian

D, H = 6, 10


def make_layer(router, experts=3, **kwargs):
    torch.manual_seed(1)
    return RoutedFeedForward(D, H, experts, router=router, **kwargs).double()


def router_logit_grad(layer, x, w, seed):
    """Run the layer on one token with a seeded generator; (dL/dtheta, chosen expert, output) for L = w.y."""
    layer.zero_grad()
    y = layer(x.unsqueeze(0), generator=torch.Generator().manual_seed(seed))[0]
    (w @ y).backward()
    # dL/dW_r = dL/dtheta x^T: recover dL/dtheta from the router weight's gradient
    grad_theta = layer.router.weight.grad @ x / (x @ x)
    return grad_theta.detach(), int(layer.stats.index[0]), y.detach()


# ------------------------------------------------------------------ E = 1: a plain FFN


@pytest.mark.parametrize("router, capacity_factor", [(r, None) for r in ROUTERS] + [(r, 1.0) for r in SPARSE_ROUTERS])
def test_one_expert_is_a_plain_ffn(router, capacity_factor):
    layer = RoutedFeedForward(D, H, 1, router=router, capacity_factor=capacity_factor, tau=1.3)
    fc1, fc2 = torch.nn.Linear(D, H), torch.nn.Linear(H, D)
    with torch.no_grad():
        fc1.weight.copy_(layer.fc1_weight[0]), fc1.bias.copy_(layer.fc1_bias[0])
        fc2.weight.copy_(layer.fc2_weight[0]), fc2.bias.copy_(layer.fc2_bias[0])
    x = torch.randn(4, 5, D)
    for training in (True, False):
        layer.train(training)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, ref = layer(x1), fc2(torch.relu(fc1(x2)))
        assert torch.equal(y, ref)
        (y * ref.detach()).sum().backward()
        (ref * ref.detach()).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad)
        torch.testing.assert_close(layer.fc1_weight.grad[0], fc1.weight.grad)
        layer.zero_grad(), fc1.zero_grad(), fc2.zero_grad()


# ------------------------------------------------------------------ one sample: the written-out formulas


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("seed", range(4))
def test_router_gradient_matches_its_formula(router, seed):
    tau = 1.3
    layer = make_layer(router, experts=4, tau=tau, jitter_eps=0.5)
    torch.manual_seed(10 + seed)
    x, w = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    grad, d, y = router_logit_grad(layer, x, w, seed)
    with torch.no_grad():
        theta = layer.router.weight @ x
        outs = expert_outputs(layer, x)
    g = outs @ w  # g_i = dL/dy . f_i
    e_d = F.one_hot(torch.tensor(d), 4).double()
    pi = torch.softmax(theta, 0)
    if router == "switch":
        assert d == int(theta.argmax())
        torch.testing.assert_close(y, pi[d] * outs[d])
        expected = g[d] * pi[d] * (e_d - pi)
    elif router == "straight_through":
        p = torch.softmax(theta / tau, 0)
        torch.testing.assert_close(y, outs[d])
        expected = g[d] * p[d] * (e_d - p) / tau
    elif router == "gumbel_softmax":
        u = torch.rand(1, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)[0]
        u = u.clamp(torch.finfo(torch.float64).tiny, 1 - torch.finfo(torch.float64).eps / 2)
        perturbed = theta - torch.log(-torch.log(u))
        assert d == int(perturbed.argmax())
        s = torch.softmax(perturbed / tau, 0)
        expected = g[d] * s[d] * (e_d - s) / tau
    elif router == "sparsemixer":
        top = theta.max()
        kept = (top - theta) <= 2 * 0.5 * torch.maximum(theta.abs(), top)
        pi_k = torch.where(kept, torch.exp(theta - top), torch.zeros_like(theta))
        pi_k = pi_k / pi_k.sum()
        assert kept[d]
        scale = float((y @ outs[d]) / (pi_k[d] * outs[d] @ outs[d]))
        assert scale == pytest.approx(1.0) or (scale == pytest.approx(0.5) and d != int(theta.argmax()))
        expected = 2 * g[d] * pi_k[d] * (e_d - pi_k)
    else:  # reinmax: 2 J(pi1) G - J(pi0) G / 2 with G over every expert
        pi1 = (e_d + torch.softmax(theta / tau, 0)) / 2
        torch.testing.assert_close(y, outs[d])
        expected = 2 * softmax_jacobian(pi1) @ g - 0.5 * softmax_jacobian(pi) @ g
    torch.testing.assert_close(grad, expected)


# ------------------------------------------------------------------ expectation over the experts, enumerated


def outcomes(layer, x, w, want):
    """Per distinct outcome (expert, forward scale), its estimator gradient: seeds searched until ``want``
    outcomes are seen (each outcome's gradient is deterministic)."""
    seen = {}
    for seed in range(2000):
        grad, d, y = router_logit_grad(layer, x, w, seed)
        f_d = expert_outputs(layer, x)[d].detach()
        scale = round(float((y @ f_d) / (f_d @ f_d)), 6)
        seen.setdefault((d, scale), grad)
        if len(seen) == want:
            return seen
    raise AssertionError(f"saw only {sorted(seen)}")


@pytest.mark.parametrize("router", ["reinmax", "straight_through", "sparsemixer"])
def test_expected_router_gradient_by_enumeration(router):
    """Linear loss L = w.y: ReinMax (tau = 1) and SparseMixer are unbiased; sparse straight-through is not."""
    E = 3
    layer = make_layer(router, experts=E, tau=1.0, jitter_eps=1e3)  # no SparseMixer masking here
    torch.manual_seed(5)
    x, w = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    with torch.no_grad():
        theta0 = layer.router.weight @ x
        losses = expert_outputs(layer, x) @ w  # L_i: the loss if the token goes to expert i
    pi = torch.softmax(theta0, 0)
    top = int(theta0.argmax())
    if router == "sparsemixer":  # the argmax has scale 1; every other expert 1 or 1/2, each with prob 1/2
        seen = outcomes(layer, x, w, want=2 * E - 1)
        expected_grad = sum(pi[d] * (0.5 if d != top else 1.0) * g for (d, _), g in seen.items())
    else:
        seen = outcomes(layer, x, w, want=E)
        expected_grad = sum(pi[d] * g for (d, _), g in seen.items())

    theta = theta0.clone().requires_grad_()
    p = torch.softmax(theta, 0)
    if router == "reinmax":  # E_D[L] = sum_i pi_i L_i
        exact = torch.autograd.grad((p * losses).sum(), theta)[0]
    elif router == "sparsemixer":  # forward value pi_D f_D: E_D[L] = sum_i pi_i (pi_i L_i)
        exact = torch.autograd.grad((p * p * losses).sum(), theta)[0]
    else:  # sparse straight-through's mean: sum_D pi_D L_D grad pi_D, the gradient of sum pi^2 L / 2
        exact = torch.autograd.grad((p * p * losses).sum() / 2, theta)[0]
    torch.testing.assert_close(expected_grad, exact)


# ------------------------------------------------------------------ balance, capacity, eval, compute


def test_capacity_drops_later_tokens_in_order():
    layer = RoutedFeedForward(D, H, 2, router="switch", capacity_factor=1.0)
    with torch.no_grad():  # every token to expert 0
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0
    x = torch.randn(4, D).abs() + 0.1
    y = layer(x)
    assert layer.capacity(4) == 2
    assert torch.equal(layer.stats.index, torch.zeros(4, dtype=torch.long))
    assert float(layer.stats.dropped) == 0.5
    assert torch.equal(y[2:], torch.zeros(2, D)) and (y[:2].abs().sum(1) > 0).all()
    unlimited = RoutedFeedForward(D, H, 2, router="switch")
    unlimited.load_state_dict(layer.state_dict())
    torch.testing.assert_close(y[:2], unlimited(x)[:2])


@pytest.mark.parametrize("router", SPARSE_ROUTERS)
def test_capacity_mode_equals_sorting_mode_when_nothing_drops(router):
    a = RoutedFeedForward(D, H, 4, router=router)
    b = RoutedFeedForward(D, H, 4, router=router, capacity_factor=4.0)  # C = N
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 7, D)
    ya, yb = (m(x.clone().requires_grad_(), generator=torch.Generator().manual_seed(3)) for m in (a, b))
    torch.testing.assert_close(ya, yb)
    ya.sum().backward(), yb.sum().backward()
    torch.testing.assert_close(a.router.weight.grad, b.router.weight.grad)
    torch.testing.assert_close(a.fc2_weight.grad, b.fc2_weight.grad)
    assert float(b.stats.dropped) == 0.0


@pytest.mark.parametrize("router", ROUTERS)
def test_eval_is_the_argmax_and_deterministic(router):
    layer = RoutedFeedForward(D, H, 4, router=router).eval()
    x = torch.randn(9, D)
    a, b = layer(x), layer(x)
    assert torch.equal(a, b)
    assert torch.equal(layer.stats.index, layer.router(x).argmax(1))


@pytest.mark.parametrize("router", ROUTERS)
def test_sparse_routers_compute_one_expert_per_token(router):
    E, n = 8, 64
    layer = RoutedFeedForward(32, 64, E, router=router)
    x = torch.randn(n, 32)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    ffn_flops = 2 * n * (32 * 64) * 2  # two matmuls per token, 2 flops per multiply-add
    router_flops = 2 * n * 32 * E
    expected = ffn_flops * (E if router == "reinmax" else 1) + router_flops
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.01)


def test_unused_expert_gets_no_gradient():
    layer = RoutedFeedForward(D, H, 3, router="switch")
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[1, 0] = 10.0
    layer(torch.randn(5, D).abs() + 0.1).sum().backward()
    assert layer.fc1_weight.grad[0].abs().sum() == 0 and layer.fc1_weight.grad[2].abs().sum() == 0
    assert layer.fc1_weight.grad[1].abs().sum() > 0


def test_compiles_fullgraph_with_capacity():
    layer = RoutedFeedForward(D, H, 4, router="switch", capacity_factor=1.25)
    x = torch.randn(12, D)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)


def test_model_level_balance_loss_and_load():
    model = torch.nn.Sequential(RoutedFeedForward(D, H, 4), RoutedFeedForward(D, H, 4))
    assert moe_balance_loss(model) is None and moe_load(model) is None
    model(torch.randn(10, D))
    total = moe_balance_loss(model)
    assert torch.equal(total, model[0].stats.balance_loss + model[1].stats.balance_loss)
    assert total.requires_grad
    load = moe_load(model)
    assert load.shape == (2, 4) and torch.allclose(load.sum(1), torch.ones(2))


@given(tokens=st.integers(1, 40), experts=st.integers(1, 6), factor=st.floats(0.1, 3.0))
def test_capacity_property(tokens, experts, factor):
    layer = RoutedFeedForward(4, 4, experts, router="straight_through", capacity_factor=factor)
    y = layer(torch.randn(tokens, 4), generator=torch.Generator().manual_seed(tokens))
    cap = max(1, math.ceil(factor * tokens / experts))
    counts = torch.bincount(layer.stats.index, minlength=experts)
    kept = counts.clamp(max=cap).sum()
    assert float(layer.stats.dropped) == pytest.approx(1 - float(kept) / tokens, abs=1e-6)
    assert int((y.abs().sum(1) == 0).sum()) == tokens - int(kept)


# ------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_experts=0), ValueError, "num_experts must be an integer >= 1"),
    (dict(num_experts=2.5), TypeError, "num_experts"),
    (dict(router="top2"), ValueError, r"router must be one of \['sparsemixer', 'switch', 'straight_through', 'gumbel_softmax', 'reinmax'\]"),
    (dict(tau=0.0), ValueError, "tau"),
    (dict(capacity_factor=0.0), ValueError, "capacity_factor must be a finite real number > 0"),
    (dict(capacity_factor=float("nan")), ValueError, "capacity_factor"),
    (dict(router="reinmax", capacity_factor=1.0), ValueError, "capacity_factor must be None with router='reinmax'"),
    (dict(activation="swish"), ValueError, "activation must be one of"),
    (dict(activation=3), TypeError, "activation"),
    (dict(activation_dropout=1.0), ValueError, "activation_dropout"),
    (dict(jitter_eps=-1), ValueError, "jitter_eps"),
])
def test_bad_arguments_are_refused(kwargs, error, match):
    args = dict(embed_dim=D, ffn_dim=H, num_experts=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        RoutedFeedForward(**args)


def test_bad_inputs_are_refused():
    layer = RoutedFeedForward(D, H, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(\*, embed_dim=6\)"):
        layer(torch.randn(3, D + 1))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, D, dtype=torch.long))
    with pytest.raises(ValueError, match="logits must be finite"):
        layer(torch.full((2, D), float("nan")))


def test_a_layer_pickled_under_the_former_module_name_loads():
    """A model saved while the module was reinmax/moe.py names ``reinmax.moe.RoutedFeedForward``: it still loads,
    as the same class, and computes what it computed."""
    import pickle

    layer = make_layer("switch").eval()
    x = torch.randn(5, D, dtype=torch.float64)
    expected = layer(x)
    data = pickle.dumps(layer, protocol=2)  # torch.save's protocol: classes as text, b"c<module>\n<name>\n"
    assert b"creinmax.routed_experts\n" in data
    old = data.replace(b"creinmax.routed_experts\n", b"creinmax.moe\n")
    assert b"routed_experts" not in old
    loaded = pickle.loads(old)
    assert type(loaded) is RoutedFeedForward
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
