"""The CUDA kernel of the fused sign step, in Triton: one launch for many parameters, one pass over memory.

As torch's fused Adam does, a launch covers a list of tensors: program ``i`` updates block ``i`` of the
concatenated tensors, finding its tensor, offset and coefficients in small tables built at the call from the
tensors it was handed (and checked natively by ``sign_optim::check_fused_inputs``), so no address outlives the
call. The arithmetic is the C++ kernel's (`sign_optim.fused`), in float32 registers for float32, float16 and
bfloat16 parameters (the moving average of half precision parameters is float32). float64 parameters take the
foreach path on CUDA.

The kernel also runs on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` before Triton is first
imported), which is how the test suite checks it without a GPU (tests/sign_optim/test_triton_kernel.py).
"""

from typing import List, Optional

import torch
import triton
import triton.language as tl

__all__ = ["fused_sign_triton", "SUPPORTED_DTYPES", "BLOCK"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: elements per program
BLOCK = 1024
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _sign_step(p_addrs, g_addrs, m_addrs, numels, coefs, block_tensor, block_start, w, neg, found_inf,
               P_DTYPE: tl.constexpr, PER_PARAM: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)  # the tensor this program updates
    start = tl.load(block_start + pid)
    n = tl.load(numels + t)
    p_ptr = tl.load(p_addrs + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(g_addrs + t).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(m_addrs + t).to(tl.pointer_type(tl.float32))
    row = coefs + (t * 4 if PER_PARAM else 0)
    keep = tl.load(row).to(tl.float32)
    k0 = tl.load(row + 1).to(tl.float32)
    ka = tl.load(row + 2).to(tl.float32)
    kb = tl.load(row + 3).to(tl.float32)
    offs = start + tl.arange(0, BLOCK_SIZE).to(tl.int64)
    if HAS_FOUND_INF:  # torch's gradient-scaler flag, read on the device: non-zero writes nothing (no element)
        n = n * (tl.load(found_inf) == 0.0).to(tl.int64)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * neg
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m + w * (g - m)
    p = tl.where(keep != 1.0, p * keep, p)
    s = tl.where(m > 0, 1.0, tl.where(m < 0, -1.0, 0.0))
    p = p + k0 * g
    p = p + ka * (s * tl.abs(g))
    p = tl.where(kb != 0.0, p + kb * (tl.abs(s) * g), p)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


def fused_sign_triton(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                      coefficients: torch.Tensor, *, beta: float, maximize: bool,
                      found_inf: Optional[torch.Tensor] = None) -> None:
    """The update of ``params`` and ``exp_avgs`` (the caller checked them: contiguous, one device, sizes, dtypes;
    the step counters are the caller's), one launch per parameter dtype. ``coefficients``: ``(n, 4)`` or
    ``(1, 4)`` float64, as for ``torch.ops.sign_optim.fused_sign_``. ``found_inf`` (a 1-element tensor on the
    parameters' device, torch's gradient-scaler flag): where non-zero nothing is written, decided in the kernel."""
    n = len(params)
    if n == 0:
        return
    device = params[0].device
    per_param = coefficients.shape[0] == n and n != 1
    flag = None if found_inf is None else found_inf.reshape(1).to(device=device, dtype=torch.float32)
    by_dtype = {}
    for i, p in enumerate(params):
        if p.numel():
            by_dtype.setdefault(p.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"sign_optim Triton kernel: dtype {dtype} refused, it takes {list(SUPPORTED_DTYPES)}")
        numel = torch.tensor([params[i].numel() for i in idx], dtype=torch.int64)
        blocks = (numel + BLOCK - 1) // BLOCK
        block_tensor = torch.repeat_interleave(torch.arange(len(idx)), blocks)
        first = torch.cumsum(blocks, 0) - blocks
        block_start = (torch.arange(int(blocks.sum())) - first[block_tensor]) * BLOCK
        tables = torch.stack([torch.tensor([t[i].data_ptr() for i in idx], dtype=torch.int64)
                              for t in (params, grads, exp_avgs)])
        coefs = coefficients[idx] if per_param else coefficients
        tables, numel, coefs, block_tensor, block_start = (
            x.to(device, non_blocking=True) for x in (tables, numel, coefs.float(), block_tensor, block_start))
        _sign_step[(block_tensor.numel(),)](
            tables[0], tables[1], tables[2], numel, coefs, block_tensor, block_start, 1.0 - beta,
            -1.0 if maximize else 1.0, coefs if flag is None else flag, P_DTYPE=_TL_DTYPES[dtype], PER_PARAM=per_param,
            BLOCK_SIZE=BLOCK, HAS_FOUND_INF=flag is not None)
