"""The CUDA kernel of the fused step, run without a GPU through Triton's interpreter (TRITON_INTERPRET=1).

The interpreter executes the Triton program on CPU tensors with NumPy: it checks the kernel's indexing (the
block -> tensor tables of the multi-tensor launch), masking, dtype handling and arithmetic, not its GPU speed.
Each case compares one launch over several tensors with the C++ operator and with the foreach path from the
same state: every dtype the kernel takes, odd sizes, empty tensors, tensors of several blocks, per-parameter
decays, weight decay, maximize and a tensor lr's value.
"""

import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (make install installs triton==3.9.0)")
os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is defined and launched: CPU tensors, NumPy

from sign_optim import fused, functional  # noqa: E402
from sign_optim.triton_kernel import BLOCK, SUPPORTED_DTYPES, fused_sign_triton  # noqa: E402
from torch_helpers import assert_within_ulp  # noqa: E402

needs_operator = pytest.mark.skipif(not fused.available("cpu"), reason="the native operators are not built")
SHAPES = [(3, 7), (0,), (1,), (BLOCK + 1,), (2 * BLOCK,), (257,)]  # odd, empty, a block and one, two blocks


def make_state(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    grads = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    avgs = [torch.randn(s, generator=gen) * 0.1 for s in SHAPES]  # averages of both signs (and 0 after lerp)
    avgs[0].view(-1)[:3] = 0.0
    return params, grads, avgs


def clone(tensors):
    return [t.clone() for t in tensors]


CASES = {
    "addsign": dict(coefs=[functional.addsign_coefficients(1.0, 1.0)], lr=1e-2, wd=0.0, maximize=False),
    "powersign": dict(coefs=[functional.powersign_coefficients(2.718281828, 1.0)], lr=1e-2, wd=0.0, maximize=False),
    "weight decay, maximize": dict(coefs=[functional.powersign_coefficients(3.0, 0.5)], lr=0.1, wd=0.05,
                                   maximize=True),
    "per-parameter decays": dict(coefs=[functional.addsign_coefficients(2.0, d)
                                        for d in (1.0, 0.0, 0.5, 0.25, 0.125, 0.75)], lr=1e-2, wd=0.01,
                                 maximize=False),
    "tensor lr": dict(coefs=[functional.addsign_coefficients(1.0, 0.3)], lr=torch.tensor(3e-3), wd=0.0,
                      maximize=False),
}


def within_2_ulp(a, b, dtype):
    # 2 ulps of the operands' scale (randn: about 1): the average's lerp cancels, so tiny results carry its rounding
    assert_within_ulp(a, b, dtype, ulps=2, floor=1.0)


@needs_operator
@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_kernel_equals_the_cpp_operator_and_foreach(dtype, case):
    c = CASES[case]
    lr = float(c["lr"])  # a tensor lr is read once per step by the optimizer
    table = fused.kernel_coefficients(c["coefs"], lr=lr, weight_decay=c["wd"])
    params, grads, avgs = make_state(dtype)
    p_tri, m_tri = clone(params), clone(avgs)
    fused_sign_triton(p_tri, grads, m_tri, table, beta=0.9, maximize=c["maximize"])
    p_cpp, m_cpp, steps = clone(params), clone(avgs), [torch.zeros(()) for _ in params]
    fused.fused_sign_(p_cpp, grads, m_cpp, steps, table, beta=0.9, maximize=c["maximize"])
    coefs = c["coefs"] * len(params) if len(c["coefs"]) == 1 else c["coefs"]
    p_ref, m_ref = clone(params), clone(avgs)
    functional.sign_update(p_ref, clone(grads), m_ref, coefs, lr=lr, beta=0.9, weight_decay=c["wd"],
                           maximize=c["maximize"], foreach=dtype is torch.float32)
    for k in range(len(params)):
        assert p_tri[k].dtype is dtype and m_tri[k].dtype is torch.float32
        within_2_ulp(p_tri[k], p_cpp[k], dtype)
        within_2_ulp(p_tri[k], p_ref[k], dtype)
        within_2_ulp(m_tri[k], m_cpp[k], torch.float32)
        within_2_ulp(m_tri[k], m_ref[k], torch.float32)
    assert not torch.equal(p_tri[3], params[3])  # it did update (a tensor of more than one block)


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_triton_kernel_matches_the_formula_written_out(dtype):
    """PowerSign from the paper, elementwise in float64: p - lr alpha**(d sign(g) sign(m)) g, after the average."""
    params, grads, avgs = make_state(dtype, seed=3)
    alpha, d, lr, beta = 2.5, 0.6, 0.05, 0.8
    table = fused.kernel_coefficients([functional.powersign_coefficients(alpha, d)], lr=lr, weight_decay=0.0)
    out, m_out = clone(params), clone(avgs)
    fused_sign_triton(out, grads, m_out, table, beta=beta, maximize=False)
    for p, g, m, q, mq in zip(params, grads, avgs, out, m_out):
        g64 = g.double()
        m_new = beta * m.double() + (1 - beta) * g64
        want = p.double() - lr * alpha ** (d * torch.sign(g64) * torch.sign(m_new)) * g64
        torch.testing.assert_close(mq.double(), m_new, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(q.double(), want, rtol=4 * torch.finfo(dtype).eps, atol=4 * torch.finfo(dtype).eps)


def test_triton_kernel_refuses_float64():
    p = [torch.zeros(4, dtype=torch.float64)]
    with pytest.raises(TypeError, match="float64"):
        fused_sign_triton(p, [torch.zeros(4, dtype=torch.float64)], [torch.zeros(4, dtype=torch.float64)],
                          fused.kernel_coefficients([(1.0, 1.0, 0.0)], lr=0.1, weight_decay=0.0), beta=0.9,
                          maximize=False)


@needs_operator
def test_the_cuda_kernels_checks_are_the_operators():
    """The CUDA registration calls the native checks first (here asked for CPU tensors): one check for all."""
    args = ([torch.zeros(8)], [torch.zeros(4)], [torch.zeros(8)], [torch.zeros(())],
            fused.kernel_coefficients([(1.0, 1.0, 0.0)], lr=0.1, weight_decay=0.0))
    with pytest.raises(ValueError, match="8 elements"):
        torch.ops.sign_optim.check_fused_inputs(*args, 0.9, "cpu")
    with pytest.raises(ValueError, match="cuda"):
        torch.ops.sign_optim.check_fused_inputs(args[0], [torch.zeros(8)], *args[2:], 0.9, "cuda")


def test_triton_kernel_skips_on_found_inf_and_zero_is_the_plain_launch():
    """torch's gradient-scaler flag read in the kernel: set (gradients with inf), nothing is written; 0, the
    launch without the flag."""
    params, grads, avgs = make_state(torch.float32, seed=7)
    grads[3][5] = float("inf")
    table = fused.kernel_coefficients([(1.0, 1.0, 0.0)], lr=0.1, weight_decay=0.0)
    out, m_out = clone(params), clone(avgs)
    fused_sign_triton(out, grads, m_out, table, beta=0.9, maximize=False, found_inf=torch.ones(()))
    assert all(torch.equal(a, b) for a, b in zip(out + m_out, params + avgs))
    grads[3][5] = 1.0
    ref, m_ref = clone(params), clone(avgs)
    fused_sign_triton(out, grads, m_out, table, beta=0.9, maximize=False, found_inf=torch.zeros(1))
    fused_sign_triton(ref, grads, m_ref, table, beta=0.9, maximize=False)
    assert all(torch.equal(a, b) for a, b in zip(out + m_out, ref + m_ref))
    assert not torch.equal(out[3], params[3])
