"""`sign_optim.functional`: the rule's coefficients and `sign_update` on its own, against AddSign and PowerSign as
Bello et al. (2017) write them (`sign_rule_step`, REFERENCE section 3) -- every path (single-tensor, multi-tensor
in cache-sized chunks, the traced form with tensor coefficients), several parameters with their own coefficients,
float32 / float64 and half-precision parameters with a float32 average, weight decay and maximize.
(The optimizers built on it: test_optimizers*.py; the fused kernels: test_fused.py, test_triton_kernel.py.)"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sign_optim import functional
from sign_optim.functional import addsign_coefficients, max_factor, powersign_coefficients, sign_update
from torch_helpers import assert_within_ulp, sign_rule_step

RULES = {"addsign": addsign_coefficients, "powersign": powersign_coefficients}
ALPHA = {"addsign": 1.0, "powersign": math.e}  # the paper's defaults
SHAPES = [(7, 3), (), (0,), (130,), (5, 1, 2)]  # a scalar parameter and an empty one among them


def factor(coefficients, s):
    """The multiplier of g that ``(c0, a, b)`` give where ``sign(g) sign(m) = s``: ``c0 + a s + b s^2``."""
    c0, a, b = coefficients
    return c0 + a * s + b * s * s


# ------------------------------------------------------------------ the coefficients


@given(alpha=st.floats(-3.0, 3.0), decay=st.floats(-2.0, 2.0))
def test_addsign_coefficients_give_alpha_plus_d_s(alpha, decay):
    coefficients = addsign_coefficients(alpha, decay)
    assert all(type(c) is float for c in coefficients)
    for s in (-1, 0, 1):
        assert factor(coefficients, s) == pytest.approx(alpha + decay * s, rel=1e-12, abs=1e-12)


@given(alpha=st.floats(0.01, 50.0), decay=st.floats(-2.0, 2.0))
def test_powersign_coefficients_give_alpha_to_the_d_s(alpha, decay):
    coefficients = powersign_coefficients(alpha, decay)
    assert coefficients[0] == 1.0
    for s in (-1, 0, 1):
        assert factor(coefficients, s) == pytest.approx(alpha ** (decay * s), rel=1e-12)


@pytest.mark.parametrize("alpha, decay", [(math.e, 0.0), (1.0, 0.7), (5.0, 0.0)])
def test_powersign_factor_one_is_exact(alpha, decay):
    """No decay (d = 0) or alpha = 1: the factor is exactly 1 for every s, with no rounding of exp/log."""
    assert powersign_coefficients(alpha, decay) == (1.0, 0.0, 0.0)


def test_powersign_coefficients_beyond_float_range_overflow():
    with pytest.raises(OverflowError):
        powersign_coefficients(math.e, 1000.0)


@pytest.mark.parametrize("rule", RULES)
@given(alpha=st.floats(0.01, 10.0), decay=st.floats(-1.0, 1.0))
def test_max_factor_bounds_every_factor(rule, alpha, decay):
    coefficients = RULES[rule](alpha, decay)
    largest = max(abs(factor(coefficients, s)) for s in (-1, 0, 1))
    assert max_factor(coefficients) >= largest * (1 - 1e-12)
    assert max_factor(coefficients) == pytest.approx(largest, rel=1e-12)  # and tight (alpha > 0)
    if rule == "powersign":  # alpha ** |d| for alpha >= 1; (1 / alpha) ** |d| below 1
        assert largest == pytest.approx(max(alpha, 1 / alpha) ** abs(decay), rel=1e-12)


# ------------------------------------------------------------------ sign_update against the paper's formula


def make_tensors(dtype, seed, shapes=SHAPES):
    """Parameters, gradients and moving averages (float32 for half-precision parameters), some exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    avg_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    avgs = [(torch.randn(s, generator=gen, dtype=torch.float64) * 0.3).to(avg_dtype) for s in shapes]
    if grads[0].numel():
        grads[0].view(-1)[:2] = 0.0
    return params, grads, avgs


def paper(rule, params, grads, avgs, alphas, decays, **options):
    """`sign_rule_step` on each parameter (float64 NumPy), one alpha and one decay per parameter."""
    out = [sign_rule_step(rule, p.double().numpy(), m.double().numpy(), g.double().numpy(), alpha=alpha, decay=d,
                          **options) for p, g, m, alpha, d in zip(params, grads, avgs, alphas, decays)]
    return [torch.from_numpy(np.asarray(w)) for w, _ in out], [torch.from_numpy(np.asarray(m)) for _, m in out]


OPTIONS = [dict(lr=0.1, beta=0.9, weight_decay=0.0, maximize=False),
           dict(lr=0.03, beta=0.5, weight_decay=0.1, maximize=False),
           dict(lr=1.0, beta=0.0, weight_decay=0.0, maximize=True),
           dict(lr=0.01, beta=0.99, weight_decay=0.05, maximize=True)]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "weight_decay", "maximize_beta0", "both"])
@pytest.mark.parametrize("per_parameter", [False, True], ids=["shared", "per_parameter"])
def test_sign_update_is_the_papers_step(rule, foreach, dtype, options, per_parameter):
    """Three steps over five parameters; per_parameter: each its own decay (and for AddSign its own alpha, so the
    multi-tensor path takes its per-tensor scale lists)."""
    params, _, avgs = make_tensors(dtype, seed=1)
    n = len(params)
    alphas = [ALPHA[rule] * (1 + 0.5 * i if per_parameter and rule == "addsign" else 1) for i in range(n)]
    for step in range(3):
        _, grads, _ = make_tensors(dtype, seed=10 + step)
        decays = [1.0 - 0.2 * i if per_parameter else 0.75 for i in range(n)]
        want_p, want_m = paper(rule, params, grads, avgs, alphas, decays, **options)
        coefficients = [RULES[rule](alpha, d) for alpha, d in zip(alphas, decays)]
        sign_update(params, grads, avgs, coefficients, foreach=foreach, **options)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
        for p, m, wp, wm in zip(params, avgs, want_p, want_m):
            assert p.dtype == dtype and m.dtype == dtype
            torch.testing.assert_close(p.double(), wp, **tol)
            torch.testing.assert_close(m.double(), wm, **tol)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("chunk_numel", [0, 64, 100, 1000, 1 << 16])
def test_the_multi_tensor_path_in_any_chunk_size_is_the_papers_step(rule, chunk_numel):
    """Large contiguous tensors are cut into flat pieces, small ones grouped, a non-contiguous one kept whole."""
    shapes = [(300, 7), (37, 29), (5,), (4097,), ()]
    params, grads, avgs = make_tensors(torch.float64, seed=2, shapes=shapes)
    big = torch.randn(80, 40, dtype=torch.float64)
    params.append(big.T)  # (40, 80), non-contiguous
    grads.append(torch.randn(40, 80, dtype=torch.float64))
    avgs.append(torch.randn(80, 40, dtype=torch.float64).T * 0.3)
    decays = [0.9, 0.5, 0.0, 1.0, 0.25, 0.6]
    alphas = [ALPHA[rule]] * len(params)
    options = dict(lr=0.05, beta=0.8, weight_decay=0.01, maximize=True)
    want_p, want_m = paper(rule, params, grads, avgs, alphas, decays, **options)
    sign_update(params, grads, avgs, [RULES[rule](a, d) for a, d in zip(alphas, decays)], foreach=True,
                chunk_numel=chunk_numel, **options)
    for p, m, wp, wm in zip(params, avgs, want_p, want_m):
        torch.testing.assert_close(p, wp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m, wm, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_parameters_with_a_float32_average(rule, dtype):
    """Computed in float32, stored once: within 1 ulp of the paper's step rounded to the parameter's dtype; the
    average stays float32."""
    params, grads, avgs = make_tensors(dtype, seed=3)
    want_p, want_m = paper(rule, params, grads, avgs, [ALPHA[rule]] * 5, [0.5] * 5, lr=0.1, beta=0.9,
                           weight_decay=0.01, maximize=False)
    sign_update(params, grads, avgs, [RULES[rule](ALPHA[rule], 0.5)] * 5, lr=0.1, beta=0.9, weight_decay=0.01,
                maximize=False, foreach=False)
    for p, m, wp, wm in zip(params, avgs, want_p, want_m):
        assert p.dtype == dtype and m.dtype == torch.float32
        assert_within_ulp(p, wp.to(dtype), dtype, ulps=1, floor=1e-2)
        torch.testing.assert_close(m.double(), wm, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule", RULES)
def test_mixed_dtypes_in_one_single_tensor_call(rule):
    dtypes = [torch.float64, torch.float32, torch.bfloat16]
    sets = [make_tensors(dtype, seed=4, shapes=[(6, 5)]) for dtype in dtypes]
    params, grads, avgs = ([s[i][0] for s in sets] for i in range(3))
    want_p, want_m = paper(rule, params, grads, avgs, [ALPHA[rule]] * 3, [1.0, 0.5, 0.0], lr=0.2, beta=0.7,
                           weight_decay=0.0, maximize=True)
    sign_update(params, grads, avgs, [RULES[rule](ALPHA[rule], d) for d in (1.0, 0.5, 0.0)], lr=0.2, beta=0.7,
                weight_decay=0.0, maximize=True, foreach=False)
    torch.testing.assert_close(params[0], want_p[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(params[1].double(), want_p[1], rtol=2e-6, atol=2e-6)
    assert_within_ulp(params[2], want_p[2].to(torch.bfloat16), torch.bfloat16, ulps=1, floor=1e-2)
    assert [m.dtype for m in avgs] == [torch.float64, torch.float32, torch.float32]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("foreach", [False, True])
def test_zero_average_and_zero_gradient(rule, foreach):
    """beta = 1/2 and m = -g: the average is exactly 0 after the step, sign(m) = 0 and the factor is c0 (AddSign
    alpha, PowerSign 1) -- exact, no exp/log; where g = 0 only the weight decay moves the parameter."""
    g = torch.tensor([2.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    p = torch.ones(4, dtype=torch.float64)
    m = -g.clone()
    m[3] = 0.3
    sign_update([p], [g], [m], [RULES[rule](3.0, 1.0)], lr=0.5, beta=0.5, weight_decay=0.2, maximize=False,
                foreach=foreach)
    assert torch.equal(m[:3], torch.zeros(3, dtype=torch.float64))
    c0 = 3.0 if rule == "addsign" else 1.0
    assert torch.equal(p[:3], 0.9 - 0.5 * c0 * g[:3])
    assert p[3] == 0.9


@pytest.mark.parametrize("foreach", [False, True])
def test_nothing_to_update(foreach):
    sign_update([], [], [], [], lr=0.1, beta=0.9, weight_decay=0.0, maximize=False, foreach=foreach)


# ------------------------------------------------------------------ the traced form (torch.compile, capturable)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lr", [0.1, "tensor"])
def test_traced_form_with_tensor_coefficients_is_the_papers_step(rule, dtype, lr):
    """`_traced_sign` takes the decay as a tensor (AddSign ``(alpha, d, None)``, PowerSign
    ``(1, sinh c, cosh c - 1)`` of tensors, as the optimizers build them) and a number or tensor lr. The first
    row's average becomes exactly 0 (beta = 1/2, m = -g with g negated by maximize): there the factor is c0."""
    params, grads, avgs = make_tensors(dtype, seed=5, shapes=[(9, 4)])
    p, g, m = params[0], grads[0], avgs[0]
    m[0] = g[0].to(m.dtype)
    work_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    d = torch.tensor(0.6, dtype=work_dtype)
    if rule == "addsign":
        coefficients = (ALPHA[rule], d, None)
    else:
        c = d * math.log(ALPHA[rule])
        coefficients = (1, torch.sinh(c), torch.cosh(c) - 1)
    want_p, want_m = paper(rule, [p], [g], [m], [ALPHA[rule]], [0.6], lr=0.1, beta=0.5, weight_decay=0.02,
                           maximize=True)
    functional._traced_sign(p, g, m, coefficients, lr=torch.tensor(0.1, dtype=torch.float64) if lr == "tensor" else lr,
                            beta=0.5, weight_decay=0.02, maximize=True)
    assert torch.equal(m[0], torch.zeros_like(m[0]))
    if dtype == torch.bfloat16:
        assert_within_ulp(p, want_p[0].to(dtype), dtype, ulps=1, floor=1e-2)
    else:
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(p.double(), want_p[0], **tol)
    torch.testing.assert_close(m.double(), want_m[0], rtol=1e-6, atol=1e-7)
