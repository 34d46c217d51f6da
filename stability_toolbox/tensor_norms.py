"""Fused L2 norms of lists of tensors, safe for every dtype and layout the monitor meets.

One ``torch._foreach_norm`` call per list (one kernel launch on a GPU; on a CPU one dispatch instead of one
per tensor and op): float16 / bfloat16 tensors are measured in float32 (a norm past 65504 would be inf, a
false non-finite signal), float32 in float32, float64 in float64; a sparse tensor (the gradient of
``nn.Embedding(sparse=True)``), which the fused norm refuses, by its stored values, duplicates summed first.

Examples:
    >>> import torch
    >>> [round(float(n), 4) for n in norm_list([torch.tensor([3.0, 4.0]), torch.ones(4, dtype=torch.bfloat16)])]
    [5.0, 2.0]
    >>> sums = square_sums(["a", "a", "b"], norm_list([torch.ones(1), torch.ones(4), torch.ones(9)]))
    >>> {row: float(v) for row, v in sums.items()}
    {'a': 5.0, 'b': 9.0}
"""

from typing import Dict, List, Sequence

import torch
from torch import Tensor

__all__ = ["norm_list", "distance_list", "squared_norms", "square_sums"]

_LOW = (torch.float16, torch.bfloat16)


def norm_list(tensors: Sequence[Tensor]) -> List[Tensor]:
    """``[||t||_2]`` of each tensor (0-dim tensors on its device; float32 for 16-bit tensors, else the
    tensor's dtype), from fused norms."""
    try:
        return _fused_norms(tensors)
    except (NotImplementedError, RuntimeError):
        if all(t.layout == torch.strided for t in tensors):
            raise
        # tried after the fused call fails, so the common (dense) case pays no per-tensor layout test
        return _fused_norms([t if t.layout == torch.strided else t.coalesce().values() if t.is_sparse
                             else t.values() for t in tensors])


def _fused_norms(tensors: Sequence[Tensor]) -> List[Tensor]:
    low = [t.dtype in _LOW for t in tensors]
    if all(low):
        return list(torch._foreach_norm(list(tensors), dtype=torch.float32))
    if not any(low):
        return list(torch._foreach_norm(list(tensors)))
    # mixed precisions: two fused calls, the norms back in the tensors' order
    lo = iter(torch._foreach_norm([t for t, f in zip(tensors, low) if f], dtype=torch.float32))
    hi = iter(torch._foreach_norm([t for t, f in zip(tensors, low) if not f]))
    return [next(lo) if f else next(hi) for f in low]


def distance_list(now: Sequence[Tensor], before: Sequence[Tensor]) -> List[Tensor]:
    """``[||a - b||_2]`` of each pair (an update's size per parameter), as `norm_list` measures: float32 for
    16-bit pairs (their difference is taken in their dtype, as the update was), else the pair's dtype. One op a
    pair, without keeping the difference (the fused ``_foreach_sub`` + norm measured slower on a CPU: it
    materialises every difference)."""
    if len(now) != len(before):
        raise ValueError(f"now and before must have the same length, got {len(now)} and {len(before)}")
    return [torch.linalg.vector_norm(a - b, dtype=torch.float32) if a.dtype in _LOW else torch.dist(a, b)
            for a, b in zip(now, before)]


def squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    """``stack([||t||_2^2])`` in float32 (`norm_list`'s norms; a float64 one rounded)."""
    return torch.stack([n.float() for n in norm_list(tensors)]).pow(2)


def square_sums(rows: Sequence[str], norms: Sequence[Tensor]) -> Dict[str, Tensor]:
    """``{row: sum of the squared norms of its entries}`` (0-dim tensors on the first norm's device), ``rows[i]``
    naming the row of ``norms[i]``; in float32, or in float64 where a norm is float64 (a float64 model's squares
    keep its range: a norm below ~1e-19 or above ~1e19 squared in float32 reads 0 or inf). A few ops for each
    run of equal rows, not one per norm: right after a backward each small op costs 10-40 µs on a CPU (cold
    caches), and a parameter-group listing holds each row's entries next to each other."""
    if len(rows) != len(norms):
        raise ValueError(f"rows and norms must have the same length, got {len(rows)} and {len(norms)}")
    if not norms:
        return {}
    device = norms[0].device
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    sq = torch.stack([n.to(device=device, dtype=dtype) for n in norms]).pow(2)
    runs: List[List] = []  # [row, entries] of each run of equal rows
    for row in rows:
        if runs and runs[-1][0] == row:
            runs[-1][1] += 1
        else:
            runs.append([row, 1])
    out: Dict[str, Tensor] = {}
    for (row, _), chunk in zip(runs, sq.split([n for _, n in runs])):
        out[row] = chunk.sum() if row not in out else out[row] + chunk.sum()
    return out
