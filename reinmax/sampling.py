"""Drawing one category per slice from given probabilities, fast (one uniform number per slice)."""

from typing import Optional

import torch
from torch import Tensor

from toolbox_core import validation

from ._checks import check_generator, check_logits, check_probabilities, work_dtype


def sample_categorical(probs: Tensor, dim: int = -1, generator: Optional[torch.Generator] = None) -> Tensor:
    r"""One index per slice of ``probs`` along ``dim``, drawn with probability ``probs``.

    Inverse-CDF sampling: a cumulative sum along ``dim`` (in float32, float64 for float64 input) and
    one uniform number per slice, found by binary search. This draws a single random number per
    slice instead of one per category (``torch.multinomial`` and the Gumbel trick draw one
    exponential number per category, which dominates their cost). ``probs`` need not be
    normalized: each slice is drawn in proportion to its entries. A category whose probability is
    0 is never drawn; one smaller than the rounding of the running sum (about 1e-7 of it in
    float32) is not drawn either.

    Args:
        probs: finite, non-negative weights along ``dim``, at least one positive per slice.
        dim: the category dimension.
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        int64 tensor shaped like ``probs`` but with size 1 at ``dim`` (ready for ``scatter``/``gather``).

    Raises:
        TypeError: ``probs`` is not a floating-point tensor.
        ValueError: a negative, NaN or infinite entry, or a slice that sums to 0 (data checks:
            see [`toolbox_core.validation.set_data_checks`][toolbox_core.validation.set_data_checks]).

    Examples:
        >>> idx = sample_categorical(torch.tensor([[0.0, 1.0, 0.0]]))
        >>> idx
        tensor([[1]])
    """
    if not isinstance(probs, Tensor) or not probs.is_floating_point():
        raise TypeError(f"probs must be a floating-point torch.Tensor, got "
                        f"{probs.dtype if isinstance(probs, Tensor) else type(probs).__name__}")
    dim = check_logits(probs, dim, "probs")
    check_generator(generator, probs)
    validation.check_data(
        lambda: ~(torch.isfinite(probs).all() & (probs >= 0).all() & (probs.sum(dim) > 0).all()),
        "probs must be finite and >= 0 with at least one positive entry per slice along dim")
    return draw(probs, dim, generator)


def draw(probs: Tensor, dim: int, generator: Optional[torch.Generator]) -> Tensor:
    """[`sample_categorical`][reinmax.sample_categorical] without argument checks (``dim`` already non-negative).

    Raises ValueError (data check) when a slice's sum is NaN: softmax of NaN, +inf or all ``-inf``.
    """
    last = dim == probs.dim() - 1
    p = probs if last else probs.movedim(dim, -1)
    cdf_dtype = work_dtype(probs.dtype)
    cdf = torch.cumsum(p, dim=-1, dtype=cdf_dtype)
    if not cdf.is_contiguous():
        cdf = cdf.contiguous()
    total = cdf[..., -1:]
    check_probabilities(total)
    u = torch.rand(total.shape, generator=generator, dtype=cdf_dtype, device=probs.device)
    # u * total may round up to total; keep it strictly below so the search never runs past the end
    # and never lands on a trailing zero-probability category.
    u = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    idx = torch.searchsorted(cdf, u, right=True)
    # only a NaN slice (data checks off) can land past the end: keep the index valid (NaN in, NaN out;
    # on CUDA an out-of-range scatter would be a device-side assert)
    idx = idx.clamp(max=p.shape[-1] - 1)
    return idx if last else idx.movedim(-1, dim)
