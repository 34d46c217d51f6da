"""Adversarial and property tests of reinmax's public API: any shape, dim, dtype, tau, NaN/inf placement.

The contract of every estimator: a one-hot ``y_hard``, ``y_soft = softmax(logits)`` and a finite
gradient (for reinmax: equal to the paper's formula, computed here independently in float64 with
explicit Jacobian matrices), or a ValueError/TypeError naming the argument -- never another
exception, a NaN, or a hang.
"""


import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reinmax
from peers import require_peer
from reinmax import CategoricalLayer, DiscreteBottleneck, LatentTreeLSTM
from torch_helpers import reinmax_gradient

TAUS = st.floats(1e-4, 1e4).filter(lambda t: t > 0)
SHAPES = st.lists(st.integers(1, 5), min_size=1, max_size=3)


@given(shape=SHAPES, tau=TAUS, data=st.data(), scale=st.sampled_from([0.1, 3.0, 30.0]))
def test_reinmax_gradient_is_finite_and_the_formula_for_any_tau(shape, tau, data, scale):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    theta = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    g, h = torch.randn(shape, generator=gen, dtype=dtype), torch.randn(shape, generator=gen, dtype=dtype)
    y_hard, y_soft = reinmax.reinmax(theta, tau, dim=dim, generator=gen)
    ((y_hard * g).sum() + (y_soft * h).sum()).backward()
    assert torch.isfinite(theta.grad).all()
    assert torch.equal(y_hard.sum(dim), torch.ones_like(y_hard.sum(dim))) and set(y_hard.unique().tolist()) <= {0, 1}
    expected = reinmax_gradient(theta.detach(), y_hard, g, h, tau, dim)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theta.grad.double(), expected, **tol)


def test_small_tau_in_float32_is_no_longer_nan():
    """Regression: reinmax(logits, 0.01) in float32 underflowed pi0 ** 100 in every category (0/0)."""
    theta = torch.randn(256, 10) * 3
    x = theta.clone().requires_grad_()
    g = torch.randn(256, 10)
    y_hard, _ = reinmax.reinmax(x, 0.01, generator=torch.Generator().manual_seed(0))
    (y_hard * g).sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double(), reinmax_gradient(theta, y_hard, g, torch.zeros_like(g), 0.01, -1),
                               rtol=1e-4, atol=1e-5)


def test_large_tau_keeps_underflowed_categories():
    """softmax(theta / tau) of a category whose pi0 underflows is not 0 for a large tau: it keeps its gradient."""
    theta = torch.tensor([[0.0, -200.0, 1.0]])
    x = theta.clone().requires_grad_()
    g = torch.tensor([[0.0, 1.0, 0.0]])
    y_hard, _ = reinmax.reinmax(x, 100.0, generator=torch.Generator().manual_seed(0))
    (y_hard * g).sum().backward()
    expected = reinmax_gradient(theta, y_hard, g, torch.zeros_like(g), 100.0, -1)
    assert expected[0, 1].abs() > 0.01  # the old pi0 ** (1 / tau) gave exactly 0 here
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(reinmax.ESTIMATORS))
@given(shape=SHAPES, tau=TAUS, data=st.data())
def test_every_estimator_contract(name, shape, tau, data):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    theta = (torch.randn(shape, generator=gen) * 3).to(dtype).requires_grad_()
    y_hard, y_soft = reinmax.estimate(name, theta, tau, dim=dim, generator=gen)
    assert y_hard.dtype == dtype and y_soft.dtype == dtype and y_hard.shape == theta.shape
    assert torch.equal(y_hard.sum(dim).float(), torch.ones(y_hard.sum(dim).shape))
    torch.testing.assert_close(y_soft.float(), torch.softmax(theta.detach().float(), dim),
                               rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5, atol=1e-3)
    (y_hard * torch.randn(shape, generator=gen).to(dtype)).sum().backward()
    assert theta.grad.dtype == dtype and torch.isfinite(theta.grad).all()


def _place(shape, data, value):
    theta = torch.randn(shape)
    flat = theta.view(-1)
    flat[data.draw(st.integers(0, flat.numel() - 1))] = value
    return theta


@pytest.mark.parametrize("name", sorted(reinmax.ESTIMATORS))
@given(shape=SHAPES, data=st.data(), bad=st.sampled_from([float("nan"), float("inf")]))
def test_nan_or_plus_inf_anywhere_is_a_value_error(name, shape, data, bad):
    theta = _place(shape, data, bad)
    with pytest.raises(ValueError, match="logits must be finite"):
        reinmax.estimate(name, theta, 1.0)


@pytest.mark.parametrize("name", sorted(reinmax.ESTIMATORS))
def test_all_minus_inf_slice_is_a_value_error_and_single_minus_inf_is_never_drawn(name):
    theta = torch.zeros(3, 4)
    theta[1] = float("-inf")
    with pytest.raises(ValueError, match="all -inf"):
        reinmax.estimate(name, theta, 1.0)
    theta = torch.zeros(500, 3)
    theta[:, 1] = float("-inf")
    y_hard, _ = reinmax.estimate(name, theta.requires_grad_(), 1.0)
    assert y_hard[:, 1].sum() == 0


@pytest.mark.parametrize("name", sorted(reinmax.ESTIMATORS))
@pytest.mark.parametrize("tau, exc", [(0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                      (float("inf"), ValueError), ("1", TypeError), (None, TypeError),
                                      (True, TypeError), (torch.ones(2), TypeError)])
def test_bad_tau_names_tau(name, tau, exc):
    with pytest.raises(exc, match="^tau must be a finite real number > 0"):
        reinmax.estimate(name, torch.randn(2, 3), tau)


@pytest.mark.parametrize("tau", [np.float64(1.3), np.float32(1.3), torch.tensor(1.3), 2, np.int64(2)])
def test_numpy_and_tensor_taus_are_numbers(tau):
    y_hard, _ = reinmax.reinmax(torch.randn(4, 3), tau)
    assert y_hard.sum() == 4


@pytest.mark.parametrize("args, exc, match", [
    ((torch.randn(2, 3), 1.0), {"dim": 2}, "dim must be an integer >= -2 and <= 1, got 2"),
    ((torch.randn(2, 0), 1.0), {}, "at least one category"),
    ((torch.tensor(1.0), 1.0), {}, "0-d"),
    ((torch.ones(2, 3, dtype=torch.long), 1.0), {}, "floating-point"),
])
def test_bad_logits_and_dim(args, exc, match):
    with pytest.raises((ValueError, TypeError), match=match):
        reinmax.reinmax(*args, **exc)


def test_estimator_options_are_checked():
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        reinmax.gumbel_rao(torch.randn(2, 3), k=0)
    assert reinmax.gumbel_rao(torch.randn(2, 3), k=np.int64(2))[0].sum() == 2
    with pytest.raises(ValueError, match="gap must be a finite real number >= 0"):
        reinmax.gapped_straight_through(torch.randn(2, 3), gap=-1)
    with pytest.raises(ValueError, match="k must be"):
        CategoricalLayer("gumbel_rao", k=0)  # at construction, not at the first forward


# ---------------------------------------------------------------- reinmax 0.1.0 drop-in



@pytest.mark.parametrize("call", [
    lambda f, x: f(x, 1.0),
    lambda f, x: f(x, 1.3, True),
    lambda f, x: f(x, 1.3, False),
    lambda f, x: f(x, tau=1.3, hard=True),
    lambda f, x: f(x, 2),
    lambda f, x: f(x, np.float64(1.1)),
    lambda f, x: f(x, torch.tensor(1.5)),
])
def test_every_0_1_0_call_is_accepted_with_its_meaning(call):
    x = torch.randn(6, 5)
    theirs_hard, theirs_soft = call(require_peer("reinmax").reinmax, x)
    ours_hard, ours_soft = call(reinmax.reinmax, x)
    assert ours_hard.shape == theirs_hard.shape and torch.equal(ours_hard.sum(-1), theirs_hard.sum(-1))
    torch.testing.assert_close(ours_soft, theirs_soft)


# ---------------------------------------------------------------- layers

@pytest.mark.parametrize("make", [
    lambda: CategoricalLayer("reinmax", 1.0),
    lambda: CategoricalLayer("gumbel_softmax", 0.5, return_probs=True),
])
@pytest.mark.parametrize("bad", ["nan", "inf", "all -inf"])
def test_layers_in_eval_refuse_bad_logits(make, bad):
    layer = make().eval()
    logits = torch.randn(4, 3)
    if bad == "all -inf":
        logits[2] = float("-inf")
    else:
        logits[1, 2] = float(bad)
    with pytest.raises(ValueError, match="logits must be finite"):
        layer(logits)
    layer.train()
    with pytest.raises(ValueError, match="logits must be finite"):
        layer(logits)


def test_bottleneck_in_eval_refuses_nan_and_accepts_numpy_sizes():
    vq = DiscreteBottleneck(np.int64(8), num_codes=np.int32(4), code_dim=3, num_latents=2).eval()
    assert vq(torch.randn(5, 8)).shape == (5, 2, 3)
    with pytest.raises(ValueError, match="logits must be finite"):
        vq(torch.full((5, 8), float("nan")))
    with pytest.raises(ValueError, match="num_codes must be an integer >= 1"):
        DiscreteBottleneck(8, num_codes=0, code_dim=3)


def test_latent_tree_refuses_bad_lengths_and_nan():
    enc = LatentTreeLSTM(4, 6)
    with pytest.raises(ValueError, match="lengths must lie in"):
        enc(torch.randn(2, 5, 4), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="x must be finite"):
        enc(torch.full((2, 5, 4), float("nan")), torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="tau must be a finite real number > 0"):
        LatentTreeLSTM(4, 6, tau=0)
    with pytest.raises(TypeError, match="estimator_options must be a dict"):
        LatentTreeLSTM(4, 6, estimator_options=[1])
