"""z-loss: ``weight * log(Z)^2`` keeps the softmax normaliser of the output logits near 1.

``Z = sum_j exp(logit_j)`` is the softmax's normaliser over the vocabulary at one position. Cross-entropy
is invariant to adding a constant to every logit, so ``log Z`` is free to drift; at high learning rates
it drifts far from 0 (*output-logit divergence*, Wortsman et al. 2023), and the loss diverges. The
auxiliary loss of PaLM (Chowdhery et al. 2022) pulls it back:

    z_loss = weight * mean over positions of logsumexp(logits)^2       (weight 1e-4)

* `z_loss`: the term alone;
* [`cross_entropy_with_z_loss`][stability_toolbox.cross_entropy_with_z_loss]: ``F.cross_entropy(logits, target) + z_loss`` over the same
  positions (``ignore_index`` positions count in neither); ``z_loss=0`` returns exactly
  ``F.cross_entropy``'s value (no term is computed);
* [`log_z`][stability_toolbox.log_z]: the per-position ``log Z`` (what [`StabilityMonitor.observe_logits`][stability_toolbox.StabilityMonitor.observe_logits] records).

fairseq: ``--criterion cross_entropy_zloss --z-loss 1e-4`` and
``--criterion label_smoothed_cross_entropy_zloss --z-loss 1e-4`` (``fairseq_plugins.criterions``).

Examples:
    >>> import torch
    >>> logits, target = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    >>> ce = torch.nn.functional.cross_entropy(logits, target)
    >>> bool(cross_entropy_with_z_loss(logits, target, z_loss=0.0) == ce)
    True
    >>> extra = cross_entropy_with_z_loss(logits, target) - ce
    >>> torch.allclose(extra, 1e-4 * logits.logsumexp(-1).pow(2).mean(), atol=1e-6)
    True
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from toolbox_core import validation

__all__ = ["DEFAULT_Z_LOSS", "z_loss", "log_z", "cross_entropy_with_z_loss"]

#: the coefficient of PaLM and of Wortsman et al. 2023
DEFAULT_Z_LOSS = 1e-4


def _check_logits(logits) -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a tensor, got {type(logits).__name__}")
    if not logits.is_floating_point() or logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be a floating tensor (..., vocabulary), got dtype {logits.dtype}, "
                         f"shape {tuple(logits.shape)}")
    return logits


def log_z(logits: Tensor) -> Tensor:
    """``logsumexp`` of ``logits`` over the last (vocabulary) dimension, computed in float32 or wider.

    Examples:
        >>> log_z(torch.zeros(2, 4))
        tensor([1.3863, 1.3863])
    """
    logits = _check_logits(logits)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return logits.to(dtype).logsumexp(-1)


def z_loss(logits: Tensor, weight: float = DEFAULT_Z_LOSS, *, mask: Optional[Tensor] = None,
           reduction: str = "mean") -> Tensor:
    """``weight * log(Z)^2`` over the positions of ``logits`` ``(..., vocabulary)``.

    Args:
        logits: the output logits.
        weight: the coefficient, a finite real >= 0 (default 1e-4).
        mask: optional bool tensor of ``logits.shape[:-1]``: only True positions count.
        reduction: ``'mean'`` (over counted positions), ``'sum'`` or ``'none'`` (per position, masked ones 0).

    Examples:
        >>> z_loss(torch.zeros(3, 2), weight=1.0)   # log(2)^2
        tensor(0.4805)
    """
    logits = _check_logits(logits)
    weight = validation.as_real("weight", weight, low=0.0)
    reduction = validation.as_choice("reduction", reduction, ("mean", "sum", "none"))
    per = log_z(logits).pow(2)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != logits.shape[:-1]:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(logits.shape[:-1])}, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        per = per.masked_fill(~mask, 0.0)
    if reduction == "none":
        out = per
    elif reduction == "sum":
        out = per.sum()
    else:
        count = per.numel() if mask is None else mask.sum().clamp_min(1)
        out = per.sum() / count
    return (weight * out).to(logits.dtype)


_z_loss_term = z_loss  # the function, under a name the keyword argument below does not shadow


def cross_entropy_with_z_loss(logits: Tensor, target: Tensor, *, z_loss: float = DEFAULT_Z_LOSS,
                              ignore_index: int = -100, reduction: str = "mean",
                              label_smoothing: float = 0.0) -> Tensor:
    """``F.cross_entropy(logits, target, ...) + z_loss * log(Z)^2`` over the non-ignored positions.

    ``logits``: ``(N, C)`` or ``(..., C)`` (flattened); ``target``: the class indices of those positions.
    ``z_loss=0`` returns ``F.cross_entropy``'s value itself. ``reduction='mean'`` divides both terms by
    the number of non-ignored positions (as cross-entropy does), ``'sum'`` adds them up.

    Raises:
        TypeError / ValueError: ``logits``/``target`` of the wrong type or shape, ``z_loss < 0``, a bad
            ``reduction`` (named).

    Examples:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
        >>> cross_entropy_with_z_loss(logits, torch.tensor([0, -100]), z_loss=1.0)   # CE + logsumexp^2
        tensor(4.6508)
    """
    logits = _check_logits(logits)
    if not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be an integer tensor of class indices, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    weight = validation.as_real("z_loss", z_loss, low=0.0)
    reduction = validation.as_choice("reduction", reduction, ("mean", "sum"))
    flat = logits.reshape(-1, logits.shape[-1])
    flat_target = target.reshape(-1)
    if flat_target.shape[0] != flat.shape[0]:
        raise ValueError(f"target: {flat_target.shape[0]} positions, logits have {flat.shape[0]}")
    ce = F.cross_entropy(flat, flat_target.long(), ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
    if weight == 0.0:
        return ce
    keep = flat_target != ignore_index
    term = _z_loss_term(flat, weight, mask=keep, reduction=reduction)
    return ce + term
