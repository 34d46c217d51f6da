"""The routing functions of `reinmax.routing` on their own: `route_tokens` (every router's choice, gate and
gradient), `balance_loss` and `expert_counts`, against computations written out here -- the routers' formulas
(REFERENCE sections 5 and 6, the table of `reinmax.routing`), draws counted against the routers' distributions
with a chi-square bound at a fixed seed, the expected gradient by enumerating the experts, and the balance loss
and counts by plain Python loops. The mixture-of-experts layer built on them: test_moe.py, test_moe_adversarial.py.
"""

import collections

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from reinmax import ROUTER_MIN_TAU, ROUTERS, SPARSE_ROUTERS, TAU_ROUTERS, balance_loss, route_tokens
from reinmax.routing import check_router, check_router_tau, expert_counts
from torch_helpers import chi_square, reinmax_gradient, softmax_jacobian, sparsemixer_probs

ROUTER_LIST = r"\['sparsemixer', 'switch', 'straight_through', 'gumbel_softmax', 'reinmax'\]"


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def chosen(routing):
    """The multiplier of each token's chosen expert: the gate, or ReinMax's one-hot weights at the index."""
    if routing.gate is not None:
        return routing.gate
    return routing.weights.gather(1, routing.index[:, None])[:, 0]


# ------------------------------------------------------------------ the choice and the forward value


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_eval_is_the_argmax_with_the_training_gate_there(router, dtype):
    logits = (torch.randn(40, 5, dtype=torch.float64) * 3).to(dtype)
    r = route_tokens(logits, router, 1.3, training=False)
    work = logits.double()
    assert r.index.dtype == torch.int64 and torch.equal(r.index, work.argmax(1))
    probs = sparsemixer_probs(work, 0.1) if router == "sparsemixer" else torch.softmax(work, 1)
    at_top = probs.gather(1, r.index[:, None])[:, 0]
    expected = at_top if router in ("switch", "sparsemixer") else torch.ones(40, dtype=torch.float64)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(chosen(r).double(), expected, **tol)
    assert r.probs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(r.probs.double(), probs, rtol=1e-5, atol=1e-6)
    if router == "reinmax":
        assert r.gate is None and torch.equal(r.weights, F.one_hot(r.index, 5).to(dtype))
    else:
        assert r.weights is None and r.gate.shape == (40,) and r.gate.dtype == dtype


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("training", [True, False])
def test_shapes_dtypes_and_no_tokens(router, training):
    for n in (0, 1, 7):
        r = route_tokens(torch.randn(n, 3, dtype=torch.float64), router, training=training, generator=seeded(n))
        assert r.index.shape == (n,) and r.probs.shape == (n, 3) and r.probs.dtype == torch.float64
        assert (r.gate is None) == (router == "reinmax") and (r.weights is None) == (router != "reinmax")
        assert ((r.index >= 0) & (r.index < 3)).all()


@pytest.mark.parametrize("router, eps, kept", [
    ("straight_through", 0.1, None), ("gumbel_softmax", 0.1, None), ("reinmax", 0.1, None),
    # SparseMixer keeps the experts with max - l <= 2 eps max(|l|, max): with max = 1.2, l >= 0.72 (eps 0.2),
    # l >= 0 (eps 0.5), every one (eps 10)
    ("sparsemixer", 0.2, [0, 0, 1, 0, 1]), ("sparsemixer", 0.5, [1, 0, 1, 1, 1]), ("sparsemixer", 10.0, [1] * 5),
])
def test_training_draws_follow_the_routers_distribution(router, eps, kept):
    """One token's logits repeated: the counts of the chosen experts against softmax(theta) (Gumbel-max draws
    from it too) or SparseMixer's masked softmax; chi-square with at most 4 degrees of freedom, P(X > 25) < 6e-5."""
    theta = torch.tensor([0.4, -0.3, 1.2, 0.1, 0.8], dtype=torch.float64)
    n = 20_000
    r = route_tokens(theta.expand(n, 5), router, 1.3, jitter_eps=eps, generator=seeded(0))
    probs = sparsemixer_probs(theta, eps) if router == "sparsemixer" else torch.softmax(theta, 0)
    if kept is not None:
        assert (probs > 0).tolist() == [bool(k) for k in kept]
    counts = torch.bincount(r.index, minlength=5)
    assert counts[probs == 0].sum() == 0
    assert chi_square(counts[probs > 0], probs[probs > 0]) < 25.0


@pytest.mark.parametrize("router", ROUTERS)
def test_generator_reproduces_the_routing(router):
    logits = torch.randn(64, 6)
    a, b, c = (route_tokens(logits, router, generator=seeded(s)) for s in (3, 3, 4))
    assert torch.equal(a.index, b.index) and torch.equal(chosen(a), chosen(b))
    if router != "switch":  # switch takes the argmax in training too
        assert not torch.equal(a.index, c.index)
    else:
        assert torch.equal(a.index, c.index)


def test_sparsemixer_scale_is_one_at_the_argmax_and_half_for_about_half_of_the_rest():
    """c = 1 where D is the argmax; elsewhere c = 1/2 (mid-point) with probability 1/2, c = 1 otherwise."""
    theta = torch.tensor([[1.0, 0.9, 0.8, 0.7]]).expand(20_000, 4)
    r = route_tokens(theta, "sparsemixer", jitter_eps=0.5, generator=seeded(2))
    pi = sparsemixer_probs(theta[:1].double(), 0.5)[0]
    scale = r.gate.double() / pi[r.index]
    top = r.index == 0
    torch.testing.assert_close(scale[top], torch.ones(int(top.sum()), dtype=torch.float64))
    rest = scale[~top]
    half = torch.isclose(rest, torch.full_like(rest, 0.5))
    assert (half | torch.isclose(rest, torch.ones_like(rest))).all()
    m = len(rest)
    assert abs(float(half.sum()) - m / 2) < 5 * (m / 4) ** 0.5  # binomial(m, 1/2): 5 standard deviations


# ------------------------------------------------------------------ the gradient each router gives the logits


@pytest.mark.parametrize("router", ["switch", "straight_through", "sparsemixer"])
@pytest.mark.parametrize("tau", [0.7, 1.0, 2.5])
def test_sparse_router_gradient_is_its_formula(router, tau):
    """d(w . gate)/d theta_n against the table of `reinmax.routing`, every token at once (J(p) e_D = p_D (e_D - p)):
    switch pi_D (e_D - pi); straight-through p_D (e_D - p) / tau with p = softmax(theta / tau); SparseMixer
    2 pi'_D (e_D - pi'). (Gumbel-softmax's formula needs its noise: test_moe.py draws it again.)"""
    theta = (torch.randn(30, 4, dtype=torch.float64) * 2).requires_grad_()
    w = torch.randn(30, dtype=torch.float64)
    r = route_tokens(theta, router, tau, jitter_eps=0.3, generator=seeded(5))
    (r.gate * w).sum().backward()
    e_d = F.one_hot(r.index, 4).double()
    work = theta.detach()
    if router == "switch":
        p, factor = torch.softmax(work, 1), 1.0
    elif router == "straight_through":
        p, factor = torch.softmax(work / tau, 1), 1.0 / tau
    else:
        p, factor = sparsemixer_probs(work, 0.3), 2.0
        assert (p == 0).any()  # the mask is active
    p_d = p.gather(1, r.index[:, None])
    expected = w[:, None] * factor * p_d * (e_d - p)
    torch.testing.assert_close(theta.grad, expected)


@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_reinmax_router_gradient_is_the_reinmax_formula(tau):
    """The reinmax router's one-hot weights carry ReinMax's gradient: with G the loss gradient at the weights,
    2 J(pi1) G - J(pi0) G / 2 (REFERENCE section 2, no h term: the probabilities are not used)."""
    theta = torch.randn(25, 5, dtype=torch.float64, requires_grad=True)
    G = torch.randn(25, 5, dtype=torch.float64)
    r = route_tokens(theta, "reinmax", tau, generator=seeded(6))
    (r.weights * G).sum().backward()
    assert torch.equal(r.weights.detach(), F.one_hot(r.index, 5).double())
    torch.testing.assert_close(theta.grad, reinmax_gradient(theta.detach(), r.weights.detach(), G,
                                                            torch.zeros_like(G), tau))


def test_reinmax_router_is_unbiased_for_a_linear_loss_by_enumeration():
    """At tau = 1 the expected gradient over the chosen expert (each outcome found by a seed that draws it, weighted
    by its probability) is the exact gradient of E_D[G_D] = pi . G, i.e. J(pi) G."""
    theta = torch.tensor([[0.3, -0.8, 1.1, 0.2]], dtype=torch.float64)
    G = torch.tensor([[1.5, -0.4, 0.7, 2.0]], dtype=torch.float64)
    pi = torch.softmax(theta, 1)[0]
    grads = {}
    for seed in range(500):
        x = theta.clone().requires_grad_()
        r = route_tokens(x, "reinmax", 1.0, generator=seeded(seed))
        (r.weights * G).sum().backward()
        grads.setdefault(int(r.index), x.grad[0])
        if len(grads) == 4:
            break
    assert sorted(grads) == [0, 1, 2, 3]
    expected = sum(pi[d] * g for d, g in grads.items())
    torch.testing.assert_close(expected, softmax_jacobian(pi) @ G[0])


# ------------------------------------------------------------------ temperatures


@given(log_tau=st.floats(-30, 4), router=st.sampled_from(ROUTERS), data=st.data())
def test_any_valid_tau_gives_finite_gates_and_gradients(log_tau, router, data):
    """Regression: straight_through / gumbel_softmax with tau = 1e-46 (float32) gave NaN gates (0 / 0), and
    reinmax with tau = 1e-40 NaN gradients; logits of scale 0 are all tied (the largest gradient, 1 / (4 tau))."""
    tau = max(10.0 ** log_tau, ROUTER_MIN_TAU)
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    experts = data.draw(st.integers(1, 9))
    theta = (torch.randn(17, experts, generator=gen) * data.draw(st.sampled_from([0.0, 1.0, 30.0]))).to(dtype)
    theta.requires_grad_()
    r = route_tokens(theta, router, tau, generator=gen)
    gate = r.gate if r.gate is not None else r.weights
    (gate * torch.randn(gate.shape, generator=gen).to(dtype)).sum().backward()
    assert torch.isfinite(gate.float()).all() and torch.isfinite(theta.grad.float()).all()
    if router in ("straight_through", "gumbel_softmax", "reinmax"):
        assert torch.equal(gate.float().sum(-1) if gate.dim() == 2 else gate.float(), torch.ones(17))



def test_straight_through_gradient_at_tiny_tau_is_the_saturated_formula():
    """p = softmax(theta / tau) is one-hot at the argmax for tau -> 0: the gradient p_D (e_D - p) / tau is 0."""
    theta = torch.tensor([[0.3, -1.0, 2.0], [1e9, 1e9, 0.0]], requires_grad=True)
    for tau in (1e-20, 1e-30):
        theta.grad = None
        r = route_tokens(theta, "straight_through", tau, generator=torch.Generator().manual_seed(0))
        r.gate.sum().backward()
        assert torch.equal(r.gate, torch.ones(2))
        assert torch.equal(theta.grad[0], torch.zeros(3))  # saturated
        d = int(r.index[1])  # two tied experts: p = (1/2, 1/2, 0), gradient (e_D - p) / (2 tau), finite
        expected = (F.one_hot(torch.tensor(d), 3).double() - torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
        torch.testing.assert_close(theta.grad[1].double(), expected * 0.5 / tau)


@pytest.mark.parametrize("router", ROUTERS)
def test_check_router_tau(router):
    assert check_router_tau(router, 2) == 2.0 and isinstance(check_router_tau(router, np.float32(0.5)), float)
    if router in TAU_ROUTERS:
        assert check_router_tau(router, ROUTER_MIN_TAU) == ROUTER_MIN_TAU
        with pytest.raises(ValueError, match=rf"tau must be a finite real number >= 1e-30 with router='{router}'"):
            check_router_tau(router, 1e-31)
    else:
        assert check_router_tau(router, 5e-324) == 5e-324  # tau is not used
    for bad, error in ((0.0, ValueError), (float("inf"), ValueError), ("1", TypeError), (True, TypeError)):
        with pytest.raises(error, match="^tau must be a finite real number > 0"):
            check_router_tau(router, bad)


# ------------------------------------------------------------------ SparseMixer's mask


def test_sparsemixer_masks_far_experts():
    logits = torch.tensor([[4.0, 3.9, -5.0, 0.0]])
    for seed in range(50):
        r = route_tokens(logits, "sparsemixer", jitter_eps=0.1, generator=torch.Generator().manual_seed(seed))
        assert int(r.index) in (0, 1)  # 4 - 0 > 0.8: masked; 4 - 3.9 <= 0.8: kept



def test_sparsemixer_eval_gate_is_the_masked_softmax():
    logits = torch.tensor([[4.0, 3.9, -5.0, 0.0]])
    r = route_tokens(logits, "sparsemixer", training=False, jitter_eps=0.1)
    expected = torch.softmax(torch.tensor([4.0, 3.9]), 0)[0]  # experts 2 and 3 are masked
    assert int(r.index) == 0 and float(r.gate) == pytest.approx(float(expected), abs=1e-7)
    assert float(r.gate) != pytest.approx(float(torch.softmax(logits, 1)[0, 0]), abs=1e-3)
    torch.testing.assert_close(r.probs, torch.tensor([[expected, 1 - expected, 0.0, 0.0]]))



@given(st.lists(st.floats(-50, 50), min_size=1, max_size=6), st.floats(0.0, 2.0))
def test_sparsemixer_probs_are_the_masked_softmax(values, eps):
    """`Routing.probs` of SparseMixer against the quotient form of the authors' mask (the argmax is never masked)."""
    logits = torch.tensor([values], dtype=torch.float64)
    r = route_tokens(logits, "sparsemixer", jitter_eps=eps, training=False)
    torch.testing.assert_close(r.probs, sparsemixer_probs(logits, eps))
    assert r.probs[0, int(logits.argmax())] > 0


# ------------------------------------------------------------------ balance loss and expert counts


def test_balance_loss_values_and_gradient():
    E = 4
    assert float(balance_loss(torch.full((8, E), 1 / E), torch.arange(8) % E)) == pytest.approx(1.0)
    assert float(balance_loss(F.one_hot(torch.zeros(8, dtype=torch.long), E).float(),
                              torch.zeros(8, dtype=torch.long))) == pytest.approx(E)
    logits = torch.randn(16, E, dtype=torch.float64, requires_grad=True)
    index = torch.randint(E, (16,))
    balance_loss(torch.softmax(logits, 1), index).backward()
    f = torch.bincount(index, minlength=E).double() / 16
    # d/dlogits_n of E sum_i f_i mean_n p_ni = E/N J(p_n) f
    expected = torch.stack([E / 16 * softmax_jacobian(p) @ f for p in torch.softmax(logits.detach(), 1)])
    torch.testing.assert_close(logits.grad, expected)



def test_balance_loss_accepts_every_integer_dtype_and_matches_the_definition():
    probs = torch.softmax(torch.randn(12, 4, dtype=torch.float64), 1)
    index = torch.tensor([0, 1, 1, 3, 3, 3, 0, 2, 1, 1, 0, 3])
    f = torch.tensor([3, 4, 1, 4], dtype=torch.float64) / 12
    expected = 4 * (f * probs.mean(0)).sum()
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(balance_loss(probs, index.to(dtype)), expected)
    torch.testing.assert_close(expert_counts(index.int(), 4), f.float() * 12)
    with pytest.raises(ValueError, match="experts must be an integer >= 1"):
        expert_counts(index, 0)
    with pytest.raises(ValueError, match=r"index must hold expert numbers in \[0, 2\]"):
        expert_counts(index, 3)



@pytest.mark.parametrize("probs, index, error, match", [
    ("p", torch.zeros(2, dtype=torch.long), TypeError, "probs must be a floating-point torch.Tensor"),
    (torch.ones(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), TypeError, "probs must be a floating"),
    (torch.ones(2), torch.zeros(2, dtype=torch.long), ValueError, r"probs must have shape \(tokens, experts\)"),
    (torch.ones(2, 0), torch.zeros(2, dtype=torch.long), ValueError, "at least one expert"),
    (torch.ones(2, 3), [0, 1], TypeError, "index must be an integer torch.Tensor"),
    (torch.ones(2, 3), torch.zeros(2), TypeError, "index must be an integer torch.Tensor"),
    (torch.ones(2, 3), torch.zeros(2, dtype=torch.bool), TypeError, "index must be an integer"),
    (torch.ones(2, 3), torch.zeros(3, dtype=torch.long), ValueError, r"index must have shape \(tokens=2,\)"),
    (torch.ones(2, 3), torch.zeros(2, 1, dtype=torch.long), ValueError, r"index must have shape"),
    (torch.ones(2, 3), torch.tensor([0, 3]), ValueError, r"index must hold expert numbers in \[0, 2\]"),
    (torch.ones(2, 3), torch.tensor([-1, 0]), ValueError, r"index must hold expert numbers in \[0, 2\]"),
])
def test_balance_loss_refuses_bad_arguments(probs, index, error, match):
    with pytest.raises(error, match=match):
        balance_loss(probs, index)


def loop_balance_loss(probs, index):
    """E sum_e f_e P_e with plain Python loops (f_e: fraction of tokens sent to e; P_e: mean probability of e)."""
    n, experts = len(probs), len(probs[0]) if len(probs) else 0
    total = 0.0
    for e in range(experts):
        f_e = sum(1 for i in index if i == e) / n
        p_e = sum(row[e] for row in probs) / n
        total += f_e * p_e
    return experts * total


@given(st.integers(1, 30), st.integers(1, 6), st.integers(0, 2 ** 16))
def test_balance_loss_is_the_definition(tokens, experts, seed):
    gen = seeded(seed)
    probs = torch.softmax(torch.randn(tokens, experts, generator=gen, dtype=torch.float64), 1)
    index = torch.randint(experts, (tokens,), generator=gen)
    got = balance_loss(probs, index)
    assert got.dtype == torch.float64 and got.shape == ()
    assert float(got) == pytest.approx(loop_balance_loss(probs.tolist(), index.tolist()), rel=1e-12, abs=1e-15)
    assert float(balance_loss(probs.float(), index)) == pytest.approx(float(got), rel=1e-5)


def test_balance_loss_of_no_tokens_is_zero_and_its_bounds():
    assert float(balance_loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))) == 0.0
    # a uniform router is balanced whatever the routing: E * sum_e f_e / E = 1
    for index in (torch.tensor([0, 0, 0, 0]), torch.tensor([0, 1, 2, 0])):
        assert float(balance_loss(torch.full((4, 3), 1 / 3), index)) == pytest.approx(1.0)


@given(st.lists(st.integers(0, 6), max_size=40), st.integers(7, 9),
       st.sampled_from([torch.float32, torch.float64, torch.int64, torch.int32, torch.float16]))
def test_expert_counts_is_a_count(index, experts, dtype):
    counts = expert_counts(torch.tensor(index, dtype=torch.long), experts, dtype)
    want = collections.Counter(index)
    assert counts.dtype == dtype and counts.shape == (experts,)
    assert counts.tolist() == [want[e] for e in range(experts)]


@pytest.mark.parametrize("index, experts, dtype, error, match", [
    (torch.tensor([0, 1]), 2, torch.bool, TypeError, "dtype must be a real torch.dtype"),
    (torch.tensor([0, 1]), 2, torch.complex64, TypeError, "dtype must be a real torch.dtype"),
    (torch.tensor([0, 1]), 2, "float32", TypeError, "dtype must be a real torch.dtype"),
    (torch.tensor([0, 1]), True, torch.float32, TypeError, "experts must be an integer >= 1"),
    (torch.tensor([0, 1]), 2.0, torch.float32, TypeError, "experts must be an integer >= 1"),
    (torch.tensor([0, 1]), 0, torch.float32, ValueError, "experts must be an integer >= 1"),
    (torch.tensor([0.0, 1.0]), 2, torch.float32, TypeError, "index must be an integer torch.Tensor"),
    (torch.tensor([[0, 1]]), 2, torch.float32, ValueError, r"index must have shape \(tokens,\)"),
    (torch.tensor([0, 2]), 2, torch.float32, ValueError, r"index must hold expert numbers in \[0, 1\]"),
])
def test_expert_counts_refuses_bad_arguments(index, experts, dtype, error, match):
    with pytest.raises(error, match=match):
        expert_counts(index, experts, dtype)


def test_expert_counts_accepts_numpy_sizes():
    assert expert_counts(torch.tensor([2, 2, 0]), np.int64(3), torch.int64).tolist() == [1, 0, 2]


# ------------------------------------------------------------------ bad arguments of route_tokens


@pytest.mark.parametrize("logits, kwargs, error, match", [
    ([[0.0, 1.0]], {}, TypeError, "logits must be a floating-point torch.Tensor"),
    (torch.ones(2, 3, dtype=torch.long), {}, TypeError, "logits must be a floating-point torch.Tensor"),
    (torch.randn(3), {}, ValueError, r"logits must have shape \(tokens, experts\)"),
    (torch.randn(2, 3, 4), {}, ValueError, r"logits must have shape \(tokens, experts\)"),
    (torch.randn(2, 0), {}, ValueError, "at least one expert"),
    (torch.randn(2, 3), dict(router="top2"), ValueError, f"router must be one of {ROUTER_LIST}, got 'top2'"),
    (torch.randn(2, 3), dict(router=None), TypeError, f"router must be one of {ROUTER_LIST}"),
    (torch.randn(2, 3), dict(tau=0), ValueError, "tau must be a finite real number > 0"),
    (torch.randn(2, 3), dict(tau=float("nan")), ValueError, "tau must be a finite real number > 0"),
    (torch.randn(2, 3), dict(training="yes"), TypeError, "training must be True or False"),
    (torch.randn(2, 3), dict(jitter_eps=-0.1), ValueError, "jitter_eps must be a finite real number >= 0"),
    (torch.randn(2, 3), dict(jitter_eps=float("inf")), ValueError, "jitter_eps"),
    (torch.randn(2, 3), dict(generator=3), TypeError, "generator must be a torch.Generator or None"),
    (torch.tensor([[0.0, float("nan")]]), {}, ValueError, "logits must be finite"),
    (torch.tensor([[0.0, float("inf")]]), {}, ValueError, "logits must be finite"),
    (torch.full((2, 3), float("-inf")), {}, ValueError, "logits must be finite"),
])
@pytest.mark.parametrize("router", ROUTERS)
def test_route_tokens_refuses_bad_arguments(router, logits, kwargs, error, match):
    kwargs = {"router": router, **kwargs}
    with pytest.raises(error, match=match):
        route_tokens(logits, **kwargs)


def test_check_router_names_the_routers():
    assert [check_router(r) for r in ROUTERS] == list(ROUTERS)
    assert set(SPARSE_ROUTERS) | {"reinmax"} == set(ROUTERS) and set(TAU_ROUTERS) <= set(ROUTERS)
    with pytest.raises(ValueError, match=f"^router must be one of {ROUTER_LIST}, got 'Switch'$"):
        check_router("Switch")
