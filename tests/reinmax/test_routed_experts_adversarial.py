"""Adversarial, property and reference tests of the mixture-of-experts layer and its routers (issue 21).

* refusals and overflow: capacity factors up to the largest float, other dtypes than the layer's,
  tiny temperatures, bad arguments of the model-level balance/load helpers (a refused call changes nothing;
  `route_tokens`, `balance_loss` and `expert_counts` on their own: test_routing.py);
* lifecycle: ``copy.deepcopy`` / pickling after a training forward, stats of skipped layers;
* properties over shapes, dtypes, capacities and routers, against a per-token computation written
  here (each expert a plain ``F.linear -> relu -> F.linear`` on its token);
* the evaluation gate of every router against its training value at the argmax;
* SparseMixer against an independent re-implementation of the authors' router
  (microsoft/SparseMixer ``sparsemixer/sparsemixer.py``), written from its description
  (``REFERENCE.md`` section 6), on the same inputs, masks and noise.
"""

import copy
import math
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import reinmax
from reinmax import ROUTERS, SPARSE_ROUTERS, RoutedFeedForward, moe_balance_loss, moe_load, route_tokens
from reinmax.routed_experts import clear_moe_stats
from reinmax.routing import ROUTER_MIN_TAU, TAU_ROUTERS
from torch_helpers import expert_outputs, sparsemixer_probs

D, H = 6, 10


# ------------------------------------------------------------------ capacity factors that overflow the slot count


@pytest.mark.parametrize("factor", [4.0, 4.000001, 1e18, 1e308, sys.float_info.max])
@pytest.mark.parametrize("router", SPARSE_ROUTERS)
def test_capacity_factor_at_or_beyond_experts_is_exactly_no_drop(router, factor):
    """Regression: capacity_factor=1e18 allocated 1e18 slots and 1e308 overflowed math.ceil (OverflowError)."""
    E, n = 4, 21
    a = RoutedFeedForward(D, H, E, router=router)
    b = RoutedFeedForward(D, H, E, router=router, capacity_factor=factor)
    b.load_state_dict(a.state_dict())
    assert b.capacity(n) == n and b.capacity(0) == 1
    x = torch.randn(3, 7, D)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa, generator=torch.Generator().manual_seed(2)), b(xb, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(yb, ya)
    (ya * x).sum().backward(), (yb * x).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(b.router.weight.grad, a.router.weight.grad)
    assert float(b.stats.dropped) == 0.0


@given(tokens=st.integers(0, 300), experts=st.integers(1, 16),
       factor=st.one_of(st.floats(1e-6, 64.0), st.floats(64.0, sys.float_info.max)))
def test_capacity_is_the_clamped_ceiling(tokens, experts, factor):
    layer = RoutedFeedForward(2, 2, experts, router="switch", capacity_factor=factor)
    exact = math.ceil(factor * tokens / experts) if factor * tokens < 1e300 else math.inf
    assert layer.capacity(tokens) == max(1, min(tokens, exact))


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("layer_dtype, input_dtype", [(torch.float32, torch.float64), (torch.float32, torch.bfloat16),
                                                      (torch.float64, torch.float32), (torch.bfloat16, torch.float32)])
def test_input_of_another_dtype_is_a_type_error_and_changes_nothing(layer_dtype, input_dtype):
    """Regression: a float64 input into a float32 layer died inside F.linear with a RuntimeError."""
    layer = RoutedFeedForward(D, H, 3).to(layer_dtype)
    layer(torch.randn(4, D, dtype=layer_dtype))
    before = layer.stats
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(TypeError, match=f"x must have the layer's dtype {layer_dtype}.*got {input_dtype}"):
        layer(torch.randn(4, D, dtype=input_dtype))
    assert layer.stats is before
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("capacity_factor", [None, 1.5])
@pytest.mark.parametrize("router", ROUTERS)
def test_autocast_and_a_float32_router_in_a_bfloat16_layer(router, capacity_factor):
    if router == "reinmax" and capacity_factor:
        pytest.skip("reinmax takes no capacity")
    torch.manual_seed(0)
    layer = RoutedFeedForward(D, H, 3, router=router, capacity_factor=capacity_factor).eval()
    x = torch.randn(20, D)
    layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    half = copy.deepcopy(layer).to(torch.bfloat16)
    half.router.float()  # a router kept in float32 (the usual practice) with bfloat16 experts
    with torch.no_grad():
        half.router.weight.copy_(layer.router.weight)
    ref = layer(x.bfloat16().float())  # the same input values: the float32 router routes them identically
    yh = half(x.bfloat16())
    assert yh.dtype == torch.bfloat16 and torch.equal(half.stats.index, layer.stats.index)
    torch.testing.assert_close(yh.float(), ref, rtol=5e-2, atol=5e-2)


# ------------------------------------------------------------------ deepcopy / pickle after a training forward


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
@pytest.mark.parametrize("router", ROUTERS)
def test_deepcopy_and_pickle_after_a_training_forward(router, capacity_factor):
    """Regression: deepcopy failed on the stats' balance loss (a non-leaf tensor holding the graph)."""
    if router == "reinmax" and capacity_factor:
        pytest.skip("reinmax takes no capacity")
    layer = RoutedFeedForward(D, H, 3, router=router, capacity_factor=capacity_factor, activation="gelu_tanh")
    model = torch.nn.Sequential(layer, torch.nn.Linear(D, D))
    x = torch.randn(5, D)
    model(x).sum().backward()
    stats = layer.stats
    assert stats.balance_loss.requires_grad
    clones = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    assert layer.stats is stats  # the original keeps its stats
    model.eval()
    for clone in clones:
        assert clone[0].stats is None  # the copy has not run
        torch.testing.assert_close(clone.eval()(x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------ temperatures


@pytest.mark.parametrize("router", TAU_ROUTERS)
def test_a_tau_below_the_floor_is_refused_and_the_floor_works(router):
    """Regression: reinmax with tau = 1e-40 in float32 gave NaN (log pi / tau overflowed to -inf everywhere)."""
    for tau in (1e-31, 1e-40, 5e-324):
        with pytest.raises(ValueError, match=rf"tau must be a finite real number >= 1e-30 with router='{router}'"):
            RoutedFeedForward(D, H, 2, router=router, tau=tau)
        with pytest.raises(ValueError, match="tau must be a finite real number >= 1e-30"):
            route_tokens(torch.randn(3, 2), router, tau)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        layer = RoutedFeedForward(D, H, 64, router=router, tau=ROUTER_MIN_TAU).to(dtype)
        x = torch.randn(8, D, dtype=dtype, requires_grad=True)
        layer(x, generator=torch.Generator().manual_seed(0)).sum().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(layer.router.weight.grad).all()


def test_routers_without_tau_accept_any_positive_tau():
    for router in ("switch", "sparsemixer"):
        RoutedFeedForward(D, H, 2, router=router, tau=5e-324)


# ------------------------------------------------------------------ argument checks of the helpers


@pytest.mark.parametrize("fn", [moe_balance_loss, moe_load, clear_moe_stats, lambda m: list(reinmax.moe_layers(m))])
@pytest.mark.parametrize("bad", [None, "model", [RoutedFeedForward(D, H, 2)], torch.randn(3)])
def test_model_helpers_refuse_a_non_module(fn, bad):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fn(bad)


def test_moe_load_over_layers_with_different_expert_counts():
    """Regression: torch.stack failed with a RuntimeError about sizes."""
    model = torch.nn.Sequential(RoutedFeedForward(D, H, 2), RoutedFeedForward(D, H, 3))
    model(torch.randn(5, D))
    with pytest.raises(ValueError, match=r"model's MoE layers must all have the same num_experts.*\[2, 3\]"):
        moe_load(model)
    assert moe_balance_loss(model) is not None  # the balance loss is a sum: any expert counts
    clear_moe_stats(model)
    assert moe_load(model) is None and moe_balance_loss(model) is None


def test_skipped_layer_contributes_nothing_after_clear():
    """LayerDrop in plain torch: a layer that did not run this step has no stats after clear_moe_stats."""
    a, b = RoutedFeedForward(D, H, 2), RoutedFeedForward(D, H, 2)
    model = torch.nn.ModuleList([a, b])
    x = torch.randn(5, D)
    (b(a(x)).sum() + moe_balance_loss(model)).backward()
    for _ in range(2):  # b skipped: without the clear its old loss would be summed (and backward would fail)
        clear_moe_stats(model)
        y = a(x)
        total = moe_balance_loss(model)
        assert b.stats is None and torch.equal(total, a.stats.balance_loss)
        (y.sum() + total).backward()
        assert moe_load(model).shape == (1, 2)


# ------------------------------------------------------------------ properties over shapes, dtypes, capacity, routers


def expected_gate(router, logits, index, eps):
    """(N,) float64: the forward gate value each router gives its chosen expert (sparsemixer: at scale 1)."""
    if router == "switch":
        return torch.softmax(logits, 1).gather(1, index[:, None])[:, 0]
    if router == "sparsemixer":
        return sparsemixer_probs(logits, eps).gather(1, index[:, None])[:, 0]
    return torch.ones(len(index), dtype=torch.float64)


@given(lead=st.lists(st.integers(0, 5), min_size=1, max_size=3), experts=st.integers(1, 5),
       router=st.sampled_from(ROUTERS), training=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       factor=st.one_of(st.none(), st.floats(0.05, 3.0), st.just(1e300)), seed=st.integers(0, 2 ** 16))
def test_layer_against_per_token_computation(lead, experts, router, training, dtype, factor, seed):
    if router == "reinmax":
        factor = None
    torch.manual_seed(seed)
    layer = RoutedFeedForward(D, H, experts, router=router, capacity_factor=factor, jitter_eps=0.1, tau=1.3)
    layer = layer.to(dtype).train(training)
    x = torch.randn(*lead, D).to(dtype)
    y = layer(x, generator=torch.Generator().manual_seed(seed))
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y.float()).all()
    n = x.numel() // D
    tokens = x.reshape(n, D)
    stats = layer.stats
    index = stats.index
    assert index.shape == (n,) and index.dtype == torch.long and ((index >= 0) & (index < experts)).all()
    logits = F.linear(tokens.double(), layer.router.weight.double())
    if not training or router == "switch":
        if n:
            # the argmax (bfloat16 logits may tie or round differently: compare the logits, not the index)
            chosen = logits.gather(1, index[:, None])[:, 0]
            torch.testing.assert_close(chosen, logits.max(1).values, rtol=0, atol=0 if dtype != torch.bfloat16 else 0.1)
    # capacity: the first C tokens of each expert (in token order) are kept
    cap = layer.capacity(n)
    rank = torch.tensor([int((index[:i] == index[i]).sum()) for i in range(n)], dtype=torch.long)
    kept = rank < cap if factor is not None else torch.ones(n, dtype=torch.bool)
    assert float(stats.dropped) == pytest.approx(1 - float(kept.sum()) / n if n else 0.0, abs=1e-6)
    counts = torch.bincount(index, minlength=experts).double()
    torch.testing.assert_close(stats.load.double(), counts / max(n, 1))
    # the output, token by token
    f = expert_outputs(layer, tokens, torch.float64)
    f_d = f[torch.arange(n), index] if n else f.new_zeros(0, D)
    gate = expected_gate(router, logits, index, 0.1)
    got = y.reshape(n, D).double()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype != torch.bfloat16 else dict(rtol=0.1, atol=0.1)
    assert torch.equal(got[~kept], torch.zeros_like(got[~kept]))
    full = gate[:, None] * f_d
    if router == "sparsemixer" and training:  # c = 1, or 1/2 off the argmax (mid-point)
        half = (got - 0.5 * full).abs().amax(1) < (got - full).abs().amax(1)
        assert not (half & (index == logits.argmax(1))).any() or dtype == torch.bfloat16
        full = torch.where(half[:, None], 0.5 * full, full)
    torch.testing.assert_close(got[kept], full[kept], **tol)
    # the balance loss: E sum f_e P_e with the router's probabilities (SparseMixer: the masked softmax)
    p = sparsemixer_probs(logits, 0.1) if router == "sparsemixer" else torch.softmax(logits, 1)
    expected_balance = experts * ((counts / max(n, 1)) * p.sum(0) / max(n, 1)).sum()
    torch.testing.assert_close(stats.balance_loss.double(), expected_balance, **tol)


# ------------------------------------------------------------------ eval value = training value at the argmax


@pytest.mark.parametrize("router", ROUTERS)
def test_eval_output_equals_the_training_output_at_the_argmax(router):
    """Every router's eval forward is its training forward when training picks the argmax (SparseMixer: c = 1 and
    the masked softmax there; the old eval gate was the unmasked softmax, a different scale than training)."""
    torch.manual_seed(0)
    layer = RoutedFeedForward(D, H, 4, router=router, jitter_eps=0.1, tau=1.3)
    with torch.no_grad():
        layer.router.weight.mul_(6.0)  # logit gaps where SparseMixer's mask removes experts
    x = torch.randn(64, D)
    layer.eval()
    y_eval = layer(x)
    top = layer.stats.index.clone()
    logits = layer.router(x).double()
    masked = (sparsemixer_probs(logits, 0.1) == 0).any(1)
    if router == "sparsemixer":
        assert masked.sum() > 10  # the case the old eval gate got wrong
    layer.train()
    matched = torch.zeros(64, dtype=torch.bool)
    for seed in range(30):
        y = layer(x, generator=torch.Generator().manual_seed(seed))
        hit = layer.stats.index == top
        torch.testing.assert_close(y[hit], y_eval[hit], rtol=1e-6, atol=1e-6)
        matched |= hit
    assert matched.all()


# ------------------------------------------------------------------ SparseMixer against the authors' router


class _DoubledGrad(torch.autograd.Function):
    """Forward ``m * (1/2 + first_order / 2)``; backward ``2 * grad`` whatever the scale (the reference's core)."""

    @staticmethod
    def forward(ctx, m, first_order):
        return m * (0.5 + 0.5 * first_order.to(m.dtype))

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad, None


def reference_sparsemixer(logits, omega, sample, first_order, training, eps):
    """The authors' SparseMixer router re-implemented from its description (REFERENCE.md section 6).

    logits (N, E); omega (d,); sample (N,) and first_order (N,) bool: the noise (used in training only).
    Returns (sample (N,), multiplier (N, d), balance loss).
    """
    with torch.no_grad():
        top = logits.max(-1, keepdim=True).values
        far = (top - logits) / torch.maximum(logits.abs(), top) > 2 * eps  # masked before the train/eval branch
    p = torch.softmax(logits.masked_fill(far, float("-inf")), -1)
    if training:
        chosen = sample
        multiplier = _DoubledGrad.apply(p[torch.arange(len(sample)), sample], first_order | (sample == top_index(logits)))
    else:
        chosen = top_index(logits)
        multiplier = p[torch.arange(len(chosen)), chosen]
    multiplier = multiplier[:, None] * omega
    E = logits.shape[1]
    frac = F.one_hot(chosen, E).to(p.dtype).sum(0) / len(chosen)
    return chosen, multiplier, E * (p.mean(0) * frac).sum()


def top_index(logits):
    return logits.detach().max(-1).indices


def reference_layer(layer, x, omega, sample, first_order, training, eps):
    """y_n = multiplier_n * f_{D_n}(x_n) with every expert run token by token; and the balance loss."""
    logits = F.linear(x, layer.router.weight)
    chosen, mult, bal = reference_sparsemixer(logits, omega, sample, first_order, training, eps)
    rows = []
    for n in range(x.shape[0]):
        e = int(chosen[n])
        h = torch.relu(F.linear(x[n], layer.fc1_weight[e], layer.fc1_bias[e]))
        rows.append(mult[n] * F.linear(h, layer.fc2_weight[e], layer.fc2_bias[e]))
    return torch.stack(rows), bal, chosen


def same_noise(layer, x, seed, eps):
    """The noise route_tokens draws from a generator seeded with ``seed`` (its documented stream): D ~ pi' by
    inverse CDF (one uniform per token), then one uniform per token, first-order where >= 1/2."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logits = F.linear(x, layer.router.weight)
        sample = reinmax.sample_categorical(sparsemixer_probs(logits, eps), -1, generator=g)[:, 0]
        coin = torch.rand(x.shape[0], generator=g, dtype=logits.dtype)
    return sample, coin >= 0.5


SPARSEMIXER_MAX_DIFF = {}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("eps", [0.1, 0.5])
@pytest.mark.parametrize("seed", range(3))
def test_sparsemixer_layer_matches_the_reference(seed, eps, training, dtype):
    E, n = 8, 48
    torch.manual_seed(100 + seed)
    layer = RoutedFeedForward(D, H, E, router="sparsemixer", jitter_eps=eps).to(dtype).train(training)
    with torch.no_grad():
        layer.router.weight.mul_(4.0)  # spread logits: the mask is active on many tokens
    x = torch.randn(n, D, dtype=dtype)
    w = torch.randn(n, D, dtype=dtype)
    sample, first_order = same_noise(layer, x, seed, eps)

    y = layer(x, generator=torch.Generator().manual_seed(seed))
    ((y * w).sum() + 0.3 * layer.stats.balance_loss).backward()
    grad = layer.router.weight.grad.clone()
    layer.zero_grad()

    omega = torch.ones(D, dtype=dtype, requires_grad=True)  # the reference's initialization
    ref, bal, chosen = reference_layer(layer, x, omega, sample, first_order, training, eps)
    ((ref * w).sum() + 0.3 * bal).backward()
    ref_grad = layer.router.weight.grad.clone()
    layer.zero_grad()

    assert torch.equal(layer.stats.index, chosen)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, ref, **tol)
    torch.testing.assert_close(layer.stats.balance_loss, bal, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)
    key = (str(dtype), training)
    diffs = [float((y - ref).detach().abs().max()), float((grad - ref_grad).abs().max()),
             float((layer.stats.balance_loss - bal).detach().abs())]
    SPARSEMIXER_MAX_DIFF[key] = [max(a, b) for a, b in zip(SPARSEMIXER_MAX_DIFF.get(key, [0, 0, 0]), diffs)]
    print(f"sparsemixer vs reference {key}: max |dy| {diffs[0]:.3g}, |d grad| {diffs[1]:.3g}, "
          f"|d balance| {diffs[2]:.3g}")


def test_omega_is_absorbed_by_the_experts_second_linear():
    """The reference's gate scale omega (d,) times every expert's output = each expert's fc2 rows scaled by omega."""
    torch.manual_seed(7)
    layer = RoutedFeedForward(D, H, 4, router="sparsemixer").double()
    x = torch.randn(30, D, dtype=torch.float64)
    omega = torch.rand(D, dtype=torch.float64) + 0.5
    sample, first_order = same_noise(layer, x, 3, 0.1)
    with torch.no_grad():
        ref, _, _ = reference_layer(layer, x, omega, sample, first_order, True, 0.1)
        layer.fc2_weight.mul_(omega[:, None]), layer.fc2_bias.mul_(omega)
    torch.testing.assert_close(layer(x, generator=torch.Generator().manual_seed(3)), ref, rtol=1e-12, atol=1e-12)


def test_sparsemixer_with_capacity_compiles_fullgraph_in_both_modes():
    """The mask now precedes the train/eval branch: the capacity mode still traces as one graph."""
    torch.manual_seed(0)
    layer = RoutedFeedForward(D, H, 4, router="sparsemixer", capacity_factor=1e308)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(12, D)
    y = compiled(x)
    assert torch.isfinite(y).all() and layer.stats.balance_loss.requires_grad
    layer.eval()
    torch.testing.assert_close(compiled(x), layer(x))
