"""Memory measurements: the bytes autograd saves for backward."""

from typing import Callable

import torch

__all__ = ["saved_bytes"]


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs.

        >>> x = torch.randn(4, 8, requires_grad=True)
        >>> saved_bytes(lambda: (x * x).sum())   # x is saved twice, once per operand
        256
    """
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total
