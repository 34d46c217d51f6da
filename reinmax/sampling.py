"""Drawing one category per slice from given probabilities, fast (one uniform number per slice)."""

from typing import Optional

import torch
from torch import Tensor

from ._checks import raise_if_nan


def sample_categorical(probs: Tensor, dim: int = -1, generator: Optional[torch.Generator] = None) -> Tensor:
    r"""One index per slice of ``probs`` along ``dim``, drawn with probability ``probs``.

    Inverse-CDF sampling: a cumulative sum along ``dim`` (in float32, float64 for float64 input) and
    one uniform number per slice, found by binary search. This draws a single random number per
    slice instead of one per category (``torch.multinomial`` and the Gumbel trick draw one
    exponential number per category, which dominates their cost). A category whose probability is
    0 is never drawn; one smaller than the rounding of the running sum (about 1e-7 of it in
    float32) is not drawn either.

    Args:
        probs: non-negative probabilities that sum to 1 along ``dim``, any shape.
        dim: the category dimension.
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        int64 tensor shaped like ``probs`` but with size 1 at ``dim`` (ready for ``scatter``/``gather``).

    Raises:
        ValueError: when ``probs`` holds NaN (softmax of NaN or +inf logits, or of all -inf).

    Example::

        >>> idx = sample_categorical(torch.tensor([[0.0, 1.0, 0.0]]))
        >>> idx
        tensor([[1]])
    """
    dim = dim % probs.dim()
    last = dim == probs.dim() - 1
    p = probs if last else probs.movedim(dim, -1)
    cdf_dtype = torch.float64 if probs.dtype == torch.float64 else torch.float32
    cdf = torch.cumsum(p, dim=-1, dtype=cdf_dtype)
    if not cdf.is_contiguous():
        cdf = cdf.contiguous()
    total = cdf[..., -1:]
    raise_if_nan(total)
    u = torch.rand(total.shape, generator=generator, dtype=cdf_dtype, device=probs.device)
    # u * total may round up to total; keep it strictly below so the search never runs past the end
    # and never lands on a trailing zero-probability category.
    u = torch.minimum(u.mul_(total), torch.nextafter(total, torch.zeros_like(total)))
    idx = torch.searchsorted(cdf, u, right=True)
    return idx if last else idx.movedim(-1, dim)
