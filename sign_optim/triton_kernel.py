"""The CUDA fused kernel of AddSign and PowerSign, in Triton: one launch per parameter, one pass.

Imported only when CUDA parameters take the fused path (Triton comes with CUDA builds of torch).
The arithmetic is that of ``_fused_kernel.c`` (see :mod:`sign_optim.fused`), in float32 registers
for float32, float16 and bfloat16 parameters (the moving average of half-precision parameters is
float32). float64 parameters use the foreach path.
"""

from typing import List

import torch
import triton
import triton.language as tl

from .fused import supported

__all__ = ["cuda_step", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 2048


@triton.jit
def _sign_step(p_ptr, g_ptr, m_ptr, n, w, keep, neg, c0, ca, cb,
               POWERSIGN: tl.constexpr, DECAY_WD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * neg
    m = tl.load(m_ptr + offs, mask=mask)
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    m = m + w * (g - m)
    if DECAY_WD:
        p = p * keep
    s = tl.where(m > 0, 1.0, tl.where(m < 0, -1.0, 0.0))
    p = p + c0 * g
    p = p + ca * (s * tl.abs(g))
    if POWERSIGN:
        p = p + cb * (tl.abs(s) * g)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


def cuda_step(rule: str, params: List[torch.Tensor], grads: List[torch.Tensor], avgs: List[torch.Tensor],
              coef_a: List[float], coef_b: List[float], *, lr: float, beta: float, alpha: float,
              weight_decay: float, maximize: bool) -> None:
    """One fused step over CUDA parameters (contiguous; float32/float16/bfloat16; float32 ``avgs``)."""
    powersign = rule == "powersign"
    if not len(grads) == len(avgs) == len(coef_a) == len(coef_b) == len(params):
        raise ValueError("sign_optim fused kernel: params, grads, avgs and coefficients must have the same length")
    for i, (p, g, m) in enumerate(zip(params, grads, avgs)):  # the kernel's boundary: memory it may touch
        if not (supported(p, g, m) and p.is_cuda):
            raise ValueError(f"sign_optim fused kernel: parameter {i} refused (the CUDA kernel takes plain contiguous "
                             "CUDA tensors of one size, float32/float16/bfloat16, a float32 or same-dtype average)")
    for p, g, m, a, b in zip(params, grads, avgs, coef_a, coef_b):
        n = p.numel()
        if n == 0:
            continue
        c0 = -lr if powersign else -lr * alpha
        _sign_step[(triton.cdiv(n, BLOCK),)](
            p, g, m, n, 1.0 - beta, 1.0 - lr * weight_decay, -1.0 if maximize else 1.0, c0, -lr * a, -lr * b,
            POWERSIGN=powersign, DECAY_WD=weight_decay != 0.0, BLOCK_SIZE=BLOCK)
