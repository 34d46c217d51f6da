"""Which tensors of a sign step share memory: the optimizer's check before any path writes.

A step writes each parameter, its moving average and its step counter in place and reads its gradient. If a
written tensor shares memory with any other tensor of the step (a parameter listed twice, a moving average that
is its parameter, a gradient that is a view of a parameter), the answer depends on the order in which the
implementation happens to read and write (the fused kernel, the foreach ops and the single-tensor loop differ),
so the step is refused instead, as the fused operator refuses it natively (`sign_optim.fused`). Gradients may
share memory with each other: they are only read.

The check runs natively (``torch.ops.sign_optim._first_overlap``, the fused operator's own check: one sort of
the byte intervals) where the extension is built, else in Python (`_first_overlap_python`), with one result.

Example:
    >>> import torch
    >>> p = torch.zeros(4)
    >>> first_overlap([p], [p[1:3]], [torch.zeros(4)], [])
    (('grads', 0), ('params', 0))
    >>> first_overlap([p], [torch.ones(4)], [torch.zeros(4)], []) is None
    True
"""

from typing import List, Optional, Sequence, Tuple

import torch

from . import fused
from .fused import PLAIN_TENSORS, local_shard

__all__ = ["first_overlap"]

_PLAIN = set(PLAIN_TENSORS)

#: the lists of a step, in the operator's order; all but ``grads`` are written
NAMES = ("params", "grads", "exp_avgs", "state_steps")

Found = Optional[Tuple[Tuple[str, int], Tuple[str, int]]]


def first_overlap(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                  state_steps: Sequence[torch.Tensor]) -> Found:
    """``((list, index), (list, index))`` of the first pair of tensors that share memory where at least one is
    written (every list but ``grads``), or None. A DTensor counts by its local shard; tensors without memory of
    their own here (empty, meta, another subclass) take no part. Contiguous tensors occupy one byte interval;
    strided views of one storage whose intervals meet are compared element by element, so interleaved views
    (two columns of one matrix) are not an overlap."""
    lists = [list(ts) if set(map(type, ts)) <= _PLAIN else [local_shard(t) for t in ts]
             for ts in (params, grads, exp_avgs, state_steps)]
    if fused._load():
        found = torch.ops.sign_optim._first_overlap(*lists)
        return ((NAMES[found[0]], found[1]), (NAMES[found[2]], found[3])) if found else None
    return _first_overlap_python(lists)


def _first_overlap_python(lists: List[List[torch.Tensor]]) -> Found:
    """`first_overlap` without the native library."""
    spans = []  # (device, lo, hi, name, tensor, written)
    for name, tensors in zip(NAMES, lists):
        written = name != "grads"
        for k, t in enumerate(tensors):
            if type(t) not in PLAIN_TENSORS or t.is_meta or t.numel() == 0:
                continue
            lo = t.data_ptr()
            if lo == 0:
                continue
            extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
            spans.append((str(t.device), lo, lo + extent * t.element_size(), (name, k), t, written))
    spans.sort(key=lambda s: (s[0], s[1]))
    cluster: List[tuple] = []
    reach = None
    for span in spans:
        if cluster and (span[0] != cluster[0][0] or span[1] >= reach):
            found = _overlap_in(cluster)
            if found:
                return found
            cluster = []
        if not cluster:
            reach = span[2]
        cluster.append(span)
        reach = max(reach, span[2])
    return _overlap_in(cluster) if len(cluster) > 1 else None


def _overlap_in(cluster: List[tuple]) -> Optional[tuple]:
    """The first overlapping pair in a cluster of intervals that meet (usually one tensor)."""
    for i in range(1, len(cluster)):
        for j in range(i):
            a, b = cluster[i], cluster[j]
            if (a[5] or b[5]) and a[1] < b[2] and b[1] < a[2] and _share_elements(a[4], b[4]):
                return a[3], b[3]
    return None


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors whose byte intervals meet have an element in common (exact for views of one storage
    with one element size; conservatively True otherwise)."""
    if a.is_contiguous() and b.is_contiguous():
        return True
    if a.element_size() != b.element_size() or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return True
    return bool(torch.isin(_offsets(a), _offsets(b)).any())


def _offsets(t: torch.Tensor) -> torch.Tensor:
    """The storage offsets (in elements) of every element of ``t``."""
    extent = t.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return torch.arange(extent).as_strided(t.shape, t.stride(), t.storage_offset()).reshape(-1)
