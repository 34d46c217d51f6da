"""ReinMax against independent computations: the closed form, the stop-gradient form, finite
differences, sampling frequencies, and the public reinmax 0.1.0 package."""

import math

import pytest
import torch

from peers import require_peer
from reinmax import ReinMaxFunction, reinmax
from torch_helpers import chi_square, reinmax_gradient, saved_bytes, softmax_jvp


def run(theta, tau, dim=-1, seed=0, g=None, h=None):
    x = theta.detach().clone().requires_grad_()
    y_hard, y_soft = reinmax(x, tau, dim=dim, generator=torch.Generator().manual_seed(seed))
    loss = 0
    if g is not None:
        loss = loss + (y_hard * g).sum()
    if h is not None:
        loss = loss + (y_soft * h).sum()
    loss.backward()
    return y_hard.detach(), y_soft.detach(), x.grad


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.3, 3.0])
@pytest.mark.parametrize("shape", [(7,), (4, 5), (2, 3, 6)])
def test_gradient_equals_closed_form(shape, tau):
    theta = torch.randn(shape, dtype=torch.float64) * 2
    g, h = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    D, y_soft, grad = run(theta, tau, g=g, h=h)
    assert torch.equal(D.sum(-1), torch.ones(shape[:-1], dtype=torch.float64))
    assert set(D.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(y_soft, torch.softmax(theta, -1))
    torch.testing.assert_close(grad, reinmax_gradient(theta, D, g, h, tau), rtol=1e-10, atol=1e-12)


def test_gradient_float32_matches_float64_formula():
    theta = torch.randn(64, 33) * 3
    g, h = torch.randn(64, 33), torch.randn(64, 33)
    D, _, grad = run(theta, 1.5, g=g, h=h)
    torch.testing.assert_close(grad.double(), reinmax_gradient(theta, D, g, h, 1.5), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_gradient_equals_stop_gradient_form(tau):
    """REFERENCE: pi1 = softmax(sg(log pi1 - theta) + theta), pi2 = 2 pi1 - 0.5 pi0, out = pi2 - sg(pi2) + D."""
    theta = torch.randn(5, 9, dtype=torch.float64)
    g, h = torch.randn(5, 9, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    D, _, grad = run(theta, tau, g=g, h=h)
    x = theta.clone().requires_grad_()
    pi0 = torch.softmax(x, -1)
    target = ((torch.softmax(x / tau, -1) + D) / 2).detach()
    pi1 = torch.softmax((target.log() - x).detach() + x, -1)
    pi2 = 2 * pi1 - 0.5 * pi0
    out = pi2 - pi2.detach() + D
    ((out * g).sum() + (pi0 * h).sum()).backward()
    torch.testing.assert_close(grad, x.grad, rtol=1e-10, atol=1e-12)


def test_gradient_equals_finite_differences_of_surrogate():
    """For the drawn sample, the gradient is that of S(t) = 2 softmax(t + c).g - 0.5 softmax(t).g + softmax(t).h
    with c = log pi1(theta) - theta held fixed; checked by central differences in float64."""
    tau = 1.3
    theta = torch.randn(11, dtype=torch.float64)
    g, h = torch.randn(11, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    D, _, grad = run(theta, tau, g=g, h=h)
    c = ((torch.softmax(theta / tau, -1) + D) / 2).log() - theta

    def S(t):
        return (2 * torch.softmax(t + c, -1) @ g - 0.5 * torch.softmax(t, -1) @ g + torch.softmax(t, -1) @ h).item()

    eps = 1e-6
    fd = torch.tensor([(S(theta + eps * e) - S(theta - eps * e)) / (2 * eps) for e in torch.eye(11, dtype=torch.float64)], dtype=torch.float64)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


def test_only_one_output_used():
    theta = torch.randn(6, 4, dtype=torch.float64)
    g, h = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    zero = torch.zeros_like(g)
    D, _, grad = run(theta, 1.2, g=g)
    torch.testing.assert_close(grad, reinmax_gradient(theta, D, g, zero, 1.2))
    D, _, grad = run(theta, 1.2, h=h)
    torch.testing.assert_close(grad, softmax_jvp(torch.softmax(theta, -1), h))


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_dim_and_non_contiguous_input(dim):
    base = torch.randn(6, 5, 4, dtype=torch.float64)
    theta = base.transpose(0, 2)  # (4, 5, 6), non-contiguous
    assert not theta.is_contiguous()
    g, h = torch.randn(theta.shape, dtype=torch.float64), torch.randn(theta.shape, dtype=torch.float64)
    D, y_soft, grad = run(theta, 1.4, dim=dim, g=g, h=h)
    move = lambda t: t.movedim(dim, -1)  # noqa: E731
    assert torch.equal(move(D).sum(-1), torch.ones(move(D).shape[:-1], dtype=torch.float64))
    torch.testing.assert_close(y_soft, torch.softmax(theta, dim))
    expected = reinmax_gradient(move(theta), move(D), move(g), move(h), 1.4)
    torch.testing.assert_close(move(grad), expected, rtol=1e-10, atol=1e-12)


def test_generator_reproducible():
    theta = torch.randn(50, 10)
    a = reinmax(theta, 1.0, generator=torch.Generator().manual_seed(3))[0]
    b = reinmax(theta, 1.0, generator=torch.Generator().manual_seed(3))[0]
    c = reinmax(theta, 1.0, generator=torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("dim", [-1, 0])
def test_sampling_frequencies_match_softmax(dim):
    logits = torch.tensor([0.3, -1.0, 2.0, 0.0, -0.5, 1.0])
    n = 100_000
    batch = logits.expand(n, 6) if dim == -1 else logits.unsqueeze(1).expand(6, n)
    y_hard, _ = reinmax(batch, 1.0, dim=dim, generator=torch.Generator().manual_seed(0))
    counts = y_hard.sum(0 if dim == -1 else 1).double()
    # chi-square with 5 degrees of freedom: P(X > 25) ~ 1.4e-4
    assert chi_square(counts, torch.softmax(logits.double(), 0)) < 25.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    theta = torch.randn(300, 7)
    g, h = torch.randn(300, 7), torch.randn(300, 7)
    x = theta.to(dtype).requires_grad_()
    y_hard, y_soft = reinmax(x, 1.3, generator=torch.Generator().manual_seed(0))
    assert y_hard.dtype == dtype and y_soft.dtype == dtype
    ((y_hard * g.to(dtype)).sum() + (y_soft * h.to(dtype)).sum()).backward()
    assert x.grad.dtype == dtype
    expected = reinmax_gradient(x.detach(), y_hard.detach(), g.to(dtype), h.to(dtype), 1.3)
    torch.testing.assert_close(x.grad.double(), expected, rtol=2e-2, atol=2e-2)
    counts = reinmax(torch.zeros(40_000, 4, dtype=dtype), 1.0)[0].sum(0).double()
    assert chi_square(counts, torch.full((4,), 0.25, dtype=torch.float64)) < 20.0


def test_minus_inf_logits_are_never_drawn_and_get_zero_gradient():
    theta = torch.tensor([[0.0, -math.inf, 1.0, -math.inf]]).expand(2000, 4).contiguous()
    g = torch.randn(2000, 4)
    D, y_soft, grad = run(theta, 1.5, g=g, h=g)
    assert D[:, [1, 3]].sum() == 0 and D[:, [0, 2]].sum() == 2000
    assert torch.isfinite(grad).all() and grad[:, [1, 3]].abs().sum() == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_plus_inf_logits_raise(bad):
    theta = torch.randn(3, 4)
    theta[1, 2] = bad
    with pytest.raises(ValueError, match="logits"):
        reinmax(theta, 1.0)


def test_all_minus_inf_slice_raises():
    theta = torch.randn(3, 4)
    theta[0] = -math.inf
    with pytest.raises(ValueError, match="logits"):
        reinmax(theta, 1.0)


@pytest.mark.parametrize("tau, err", [(0.0, ValueError), (-1.0, ValueError), (math.nan, ValueError),
                                      (math.inf, ValueError), ("1.0", TypeError), (None, TypeError),
                                      (True, TypeError), (torch.ones(2), TypeError)])
def test_bad_tau(tau, err):
    with pytest.raises(err, match="tau"):
        reinmax(torch.randn(2, 3), tau)


def test_bad_logits_and_dim():
    with pytest.raises(TypeError, match="logits"):
        reinmax(torch.ones(2, 3, dtype=torch.long), 1.0)
    with pytest.raises(TypeError, match="logits"):
        reinmax([[0.0, 1.0]], 1.0)
    with pytest.raises(ValueError, match="logits"):
        reinmax(torch.ones(3, 0), 1.0)
    with pytest.raises(ValueError, match="dim"):
        reinmax(torch.ones(3, 2), 1.0, dim=2)
    with pytest.raises(ValueError, match="logits"):
        reinmax(torch.tensor(1.0), 1.0)
    with pytest.raises(TypeError, match="generator"):
        reinmax(torch.ones(3, 2), 1.0, generator=0)


def test_tau_as_tensor_and_int():
    theta = torch.randn(4, 3, dtype=torch.float64)
    g = torch.randn(4, 3, dtype=torch.float64)
    D, _, a = run(theta, 2, g=g)
    x = theta.clone().requires_grad_()
    y, _ = reinmax(x, torch.tensor(2.0), generator=torch.Generator().manual_seed(0))
    (y * g).sum().backward()
    torch.testing.assert_close(a, x.grad)


def test_empty_batch():
    x = torch.randn(0, 5, requires_grad=True)
    y_hard, y_soft = reinmax(x, 1.0)
    (y_hard.sum() + y_soft.sum()).backward()
    assert y_hard.shape == (0, 5) and x.grad.shape == (0, 5)


def test_saves_less_than_public_0_1_0():
    x = torch.randn(256, 64, requires_grad=True)
    ours = saved_bytes(lambda: reinmax(x, 1.3))
    assert ours == 256 * 64 * 4 + 256 * 8  # softmax + one int64 index per row
    old = require_peer("reinmax")
    if old is not None:
        assert saved_bytes(lambda: old.reinmax(x, 1.3)) >= 3 * 256 * 64 * 4


@pytest.mark.parametrize("tau", [1.0, 1.3])
def test_same_gradient_as_public_0_1_0(monkeypatch, tau):
    old = require_peer("reinmax")
    theta = torch.randn(3, 8, 10, dtype=torch.float64)
    g, h = torch.randn(theta.shape, dtype=torch.float64), torch.randn(theta.shape, dtype=torch.float64)
    D, _, ours = run(theta, tau, g=g, h=h)
    # make 0.1.0 draw the same sample: it calls torch.multinomial(y_soft, 1, replacement=True) on 2-d rows
    idx = D.reshape(-1, 10).argmax(-1, keepdim=True)
    monkeypatch.setattr(torch, "multinomial", lambda p, num_samples, replacement: idx)
    x = theta.clone().requires_grad_()
    y_hard, y_soft = old.reinmax(x, tau)
    assert torch.equal(y_hard.detach(), D)
    ((y_hard * g).sum() + (y_soft * h).sum()).backward()
    torch.testing.assert_close(ours, x.grad, rtol=1e-10, atol=1e-12)


def test_function_is_public_and_apply_works():
    x = torch.randn(2, 3, requires_grad=True)
    y_hard, y_soft, log_probs, index = ReinMaxFunction.apply(x, 1.0, 1, None)
    assert torch.equal(y_hard.argmax(1, keepdim=True), index)
    torch.testing.assert_close(log_probs.exp(), y_soft)
    y_hard.sum().backward()
    assert x.grad.shape == x.shape


def test_underflowing_probabilities_stay_finite_and_close():
    """Documented: a category whose float32 probability underflows to 0 gets no tempered-softmax term;
    the difference from the exact formula is below float32 resolution."""
    theta = torch.tensor([[0.0, -200.0, 1.0, -90.0]] * 50)
    g, h = torch.randn(50, 4), torch.randn(50, 4)
    D, _, grad = run(theta, 2.0, g=g, h=h)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), reinmax_gradient(theta, D, g, h, 2.0), rtol=1e-5, atol=1e-6)


def expected_gradient(estimator, theta, f, tau):
    """E_D[grad] of ``estimator`` for loss f(D), D ~ softmax(theta), by exact enumeration of the outcomes
    (each outcome produced by searching a generator seed that draws it)."""
    n = theta.shape[-1]
    pi = torch.softmax(theta, -1)
    total = torch.zeros_like(theta)
    for i in range(n):
        for seed in range(10_000):
            x = theta.clone().requires_grad_()
            D, _ = estimator(x, tau, generator=torch.Generator().manual_seed(seed))
            if D.argmax().item() == i:
                break
        f(D).backward()
        total += pi[i] * x.grad
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_for_quadratic_losses_at_tau_1(seed):
    """The paper's second-order accuracy (Sec. 4): at tau = 1 ReinMax's expected gradient equals the gradient
    of E[f(D)] for every quadratic f; straight-through (first order) does not."""
    from reinmax import straight_through

    g = torch.Generator().manual_seed(seed)
    n = 5
    theta = torch.randn(n, generator=g, dtype=torch.float64)
    A, b = torch.randn(n, n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)

    def f(D):
        return D @ A @ D + b @ D

    th = theta.clone().requires_grad_()
    eye = torch.eye(n, dtype=torch.float64)
    (exact,) = torch.autograd.grad(sum(torch.softmax(th, -1)[i] * f(eye[i]) for i in range(n)), th)
    torch.testing.assert_close(expected_gradient(reinmax, theta, f, 1.0), exact, rtol=1e-10, atol=1e-12)
    st_error = (expected_gradient(straight_through, theta, f, 1.0) - exact).norm() / exact.norm()
    assert st_error > 0.05
