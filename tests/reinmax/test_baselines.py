"""The baselines against their formulas written out here (the by-name registry: test_registry.py)."""

import math

import pytest
import torch

from reinmax import ESTIMATORS, estimate, gapped_straight_through, gumbel_rao, gumbel_softmax, straight_through
from torch_helpers import chi_square, softmax_jvp


def grads(fn, theta, g, h, **kw):
    x = theta.clone().requires_grad_()
    y_hard, y_soft = fn(x, kw.pop("tau", 1.0), generator=torch.Generator().manual_seed(0), **kw)
    ((y_hard * g).sum() + (y_soft * h).sum()).backward()
    return y_hard.detach(), y_soft.detach(), x.grad


@pytest.fixture
def problem():
    theta = torch.randn(6, 7, dtype=torch.float64) * 2
    return theta, torch.randn(6, 7, dtype=torch.float64), torch.randn(6, 7, dtype=torch.float64)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_straight_through(problem, tau):
    theta, g, h = problem
    D, y_soft, grad = grads(straight_through, theta, g, h, tau=tau)
    pi0 = torch.softmax(theta, -1)
    torch.testing.assert_close(y_soft, pi0)
    expected = softmax_jvp(torch.softmax(theta / tau, -1), g) / tau + softmax_jvp(pi0, h)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_gumbel_softmax_formula(problem, tau):
    theta, g, h = problem
    D, y_soft, grad = grads(gumbel_softmax, theta, g, h, tau=tau)
    # the same noise, drawn independently from the same seed: U in [tiny, 1 - eps/2], G = -log(-log U)
    u = torch.rand(theta.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    info = torch.finfo(torch.float64)
    G = -torch.log(-torch.log(u.clamp(info.tiny, 1 - info.eps / 2)))
    y = theta + G
    assert torch.equal(D.argmax(-1), y.argmax(-1))
    expected = softmax_jvp(torch.softmax(y / tau, -1), g) / tau + softmax_jvp(torch.softmax(theta, -1), h)
    torch.testing.assert_close(grad, expected)


def test_gumbel_softmax_noise_never_infinite(monkeypatch):
    """Uniform draws of exactly 0 and 1 (which break torch's version) still give finite results."""
    real_rand = torch.rand

    def extreme(*args, **kwargs):
        u = real_rand(*args, **kwargs)
        u.view(-1)[0::2] = 0.0
        u.view(-1)[1::2] = 1.0
        return u

    monkeypatch.setattr(torch, "rand", extreme)
    x = torch.randn(8, 5, requires_grad=True)
    y_hard, _ = gumbel_softmax(x, 0.5)
    (y_hard * torch.randn(8, 5)).sum().backward()
    assert torch.isfinite(y_hard).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("gap", [0.0, 1.0, 2.5])
def test_gapped_straight_through(problem, gap):
    theta, g, h = problem
    tau = 1.3
    D, y_soft, grad = grads(gapped_straight_through, theta, g, h, tau=tau, gap=gap)
    m = theta.max(-1, keepdim=True).values
    moved = theta.clone()
    for r in range(theta.shape[0]):
        k = int(D[r].argmax())
        for j in range(theta.shape[1]):
            moved[r, j] = m[r, 0] if j == k else min(theta[r, j].item(), m[r, 0].item() - gap)
    expected = softmax_jvp(torch.softmax(moved / tau, -1), g) / tau + softmax_jvp(torch.softmax(theta, -1), h)
    torch.testing.assert_close(grad, expected)


def test_gapped_bad_gap():
    with pytest.raises(ValueError, match="gap"):
        gapped_straight_through(torch.randn(2, 3), 1.0, gap=-1.0)


def test_gumbel_rao_matches_conditional_expectation():
    """GR-MCK's gradient is E[grad softmax((theta + G) / tau) | argmax(theta + G) = D]: compare a large-k
    run with rejection sampling of unconditional Gumbel noise (Monte Carlo on both sides)."""
    theta = torch.tensor([0.5, -0.3, 0.1], dtype=torch.float64)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    tau = 0.7
    x = theta.clone().requires_grad_()
    y_hard, _ = gumbel_rao(x, tau, k=40_000, generator=torch.Generator().manual_seed(0))
    (y_hard * g).sum().backward()
    k = int(y_hard.argmax())
    gen = torch.Generator().manual_seed(1)
    G = -torch.log(-torch.log(torch.rand(200_000, 3, generator=gen, dtype=torch.float64)))
    y = theta + G
    keep = y.argmax(-1) == k
    expected = (softmax_jvp(torch.softmax(y[keep] / tau, -1), g.expand(int(keep.sum()), 3)) / tau).mean(0)
    torch.testing.assert_close(x.grad, expected, rtol=0.0, atol=0.01)


def test_gumbel_rao_k1_is_a_gumbel_softmax_with_conditional_noise():
    theta = torch.randn(4, 5, dtype=torch.float64)
    y_hard, _ = gumbel_rao(theta, 1.0, k=1)
    assert torch.equal(y_hard.sum(-1), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="k"):
        gumbel_rao(theta, 1.0, k=0)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_samples_softmax(name):
    logits = torch.tensor([0.3, -1.0, 2.0, 0.0])
    n = 40_000
    y_hard, y_soft = estimate(name, logits.expand(n, 4), 1.0, generator=torch.Generator().manual_seed(0),
                              **({"k": 2} if name == "gumbel_rao" else {}))
    assert set(y_hard.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(y_soft[0], torch.softmax(logits, 0))
    counts = y_hard.sum(0).double()
    p = torch.softmax(logits.double(), 0)
    assert chi_square(counts, p) < 20.0  # 3 degrees of freedom


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_every_estimator_shapes_dtypes_dims(name, dtype):
    x = torch.randn(3, 6, 4, dtype=dtype).transpose(0, 1).requires_grad_()  # (6, 3, 4) non-contiguous
    y_hard, y_soft = estimate(name, x, 1.2, dim=1, generator=torch.Generator().manual_seed(0))
    assert y_hard.shape == x.shape and y_hard.dtype == dtype and y_soft.dtype == dtype
    assert torch.equal(y_hard.detach().sum(1).float(), torch.ones(6, 4))
    (y_hard * torch.randn(x.shape).to(dtype)).sum().backward()
    assert torch.isfinite(x.grad).all()
    # the gradient of a one-hot sample's sum is zero for every estimator (J(p) 1 = 0)
    x.grad = None
    y_hard, _ = estimate(name, x, 1.2, dim=1)
    y_hard.sum().backward()
    assert x.grad.abs().max() < (1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_bad_input(name):
    with pytest.raises(ValueError, match="tau"):
        estimate(name, torch.randn(2, 3), 0.0)
    with pytest.raises(TypeError, match="logits"):
        estimate(name, torch.ones(2, 3, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="logits"):
        estimate(name, torch.ones(2, 0), 1.0)
    bad = torch.randn(2, 3)
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="logits"):
        estimate(name, bad, 1.0)
