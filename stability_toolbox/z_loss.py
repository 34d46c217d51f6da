"""z-loss: ``weight * log(Z)^2`` keeps the softmax normaliser of the output logits near 1.

``Z = sum_j exp(logit_j)`` is the softmax's normaliser over the vocabulary at one position. Cross-entropy
is invariant to adding a constant to every logit, so ``log Z`` is free to drift; at high learning rates
it drifts far from 0 (*output-logit divergence*, Wortsman et al. 2023), and the loss diverges. The
auxiliary loss of PaLM (Chowdhery et al. 2022) pulls it back:

    z_loss = weight * mean over non-ignored positions of logsumexp(logits)^2       (weight 1e-4)

* `z_loss`: the term alone;
* [`cross_entropy_with_z_loss`][stability_toolbox.cross_entropy_with_z_loss]: ``F.cross_entropy(logits, target) + z_loss`` over the same
  positions (``ignore_index`` positions count in neither), with ``F.cross_entropy``'s ``weight``,
  ``ignore_index``, ``reduction`` and ``label_smoothing``; ``z_loss=0`` returns ``F.cross_entropy``'s value
  (no term is computed);
* [`log_z`][stability_toolbox.log_z]: the per-position ``log Z`` (what [`StabilityMonitor.observe_logits`][stability_toolbox.StabilityMonitor.observe_logits] records).

Padding: a batch with no counted position (every target ``ignore_index``, or no position at all) gives a
loss of exactly 0 with a zero gradient under ``reduction='mean'`` (``F.cross_entropy`` gives NaN there, which
would poison a training run through its optimizer state); ``'sum'`` gives 0 as torch does.

Precision: float16 and bfloat16 logits are scored in float32 (as ``torch.autocast`` runs cross-entropy) and the
loss is returned in float32; float32 and float64 logits in their own dtype.

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
    >>> cross_entropy_with_z_loss(logits, torch.full((4,), -100))   # all padding: 0, not NaN
    tensor(0.)
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
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor (..., vocabulary), got dtype {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., vocabulary) with a vocabulary of at least 1, got shape "
                         f"{tuple(logits.shape)}")
    return logits


def _check_rows(logits: Tensor) -> None:
    """Data check (eager only): no position has every logit ``-inf``. Such a row has no softmax: counted, its
    loss is inf; ignored or masked, its loss is 0 but its gradient NaN (``0 * exp(-inf - -inf)``, in
    ``F.cross_entropy`` too), which would reach every parameter. One ``amax`` pass, no copy of the logits."""
    validation.check_data(lambda: torch.isneginf(logits.amax(-1)).any(),
                          "logits must have a logit above -inf at every position (a row of -inf has no softmax: "
                          "its gradient is NaN even where ignored); mark padding with ignore_index / mask, not "
                          "with -inf logits")


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision logits, their own dtype otherwise (what the losses are computed in)."""
    return torch.promote_types(dtype, torch.float32)


def log_z(logits: Tensor) -> Tensor:
    """``logsumexp`` of ``logits`` ``(..., vocabulary)`` over the vocabulary: shape ``logits.shape[:-1]``,
    computed in float32 or wider.

    Examples:
        >>> log_z(torch.zeros(2, 4))
        tensor([1.3863, 1.3863])
    """
    logits = _check_logits(logits)
    return logits.to(_wide(logits.dtype)).logsumexp(-1)


def _reduce(per: Tensor, keep: Optional[Tensor], reduction: str) -> Tensor:
    """Sum or mean of ``per`` over the kept positions (``per`` is 0 elsewhere); the mean of none is 0."""
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    count = max(per.numel(), 1) if keep is None else keep.sum().clamp_min(1)  # no position counted: 0, not 0/0
    return per.sum() / count


def z_loss(logits: Tensor, weight: float = DEFAULT_Z_LOSS, *, mask: Optional[Tensor] = None,
           reduction: str = "mean") -> Tensor:
    """``weight * log(Z)^2`` over the positions of ``logits`` ``(..., vocabulary)``, in float32 or wider.

    Args:
        logits: the output logits, floating.
        weight: the coefficient, a finite real >= 0 (default 1e-4).
        mask: optional bool tensor of shape ``logits.shape[:-1]``: only True positions count.
        reduction: ``'mean'`` (over counted positions; 0 when none is counted), ``'sum'`` or ``'none'``
            (per position, shape ``logits.shape[:-1]``, masked ones 0).

    Raises:
        TypeError / ValueError: naming the argument (``mask`` of another dtype, shape or device); and (a data
            check, eager mode only) a position whose logits are all ``-inf``, masked or not: its gradient
            would be NaN.

    Examples:
        >>> z_loss(torch.zeros(3, 2), weight=1.0)   # log(2)^2
        tensor(0.4805)
        >>> z_loss(torch.zeros(3, 2), mask=torch.zeros(3, dtype=torch.bool))   # nothing counted
        tensor(0.)
    """
    logits = _check_logits(logits)
    weight = validation.as_real("weight", weight, low=0.0)
    reduction = validation.as_choice("reduction", reduction, ("mean", "sum", "none"))
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != logits.shape[:-1]:
            raise ValueError(f"mask must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got "
                             f"{tuple(mask.shape)}")
        validation.check_device("mask", mask, logits.device, "logits")
    _check_rows(logits)
    return _z_loss_term(logits, weight, mask, reduction)


def _z_loss_term(logits: Tensor, weight: float, mask: Optional[Tensor], reduction: str) -> Tensor:
    """`z_loss` of checked arguments (also under a name the keyword argument ``z_loss`` below does not shadow)."""
    per = log_z(logits).pow(2)
    if mask is not None:
        per = per.masked_fill(~mask, 0.0)
    return weight * _reduce(per, mask, reduction)


def _check_target(target, logits: Tensor) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be an integer tensor of class indices, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices (class probabilities are not "
                        f"supported), got dtype {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])} (the class "
                         f"dimension of logits is the last), got {tuple(target.shape)}")
    validation.check_device("target", target, logits.device, "logits")
    # compared with ignore_index and the class range as int64: a narrow dtype would wrap them (a uint8 target
    # reads ignore_index=-100 as 156, an int8 one 300 as 44)
    return target.long()


def _check_class_weight(weight, classes: int, device: torch.device) -> Optional[Tensor]:
    if weight is None:
        return None
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be None or a floating tensor of shape ({classes},), got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.shape != (classes,):
        raise ValueError(f"weight must have shape ({classes},) (one per class), got {tuple(weight.shape)}")
    validation.check_device("weight", weight, device, "logits")
    validation.check_data(lambda: ~(torch.isfinite(weight) & (weight >= 0)).all(),
                          "weight must hold finite class weights >= 0")
    return weight


def cross_entropy_with_z_loss(logits: Tensor, target: Tensor, *, z_loss: float = DEFAULT_Z_LOSS,
                              weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                              label_smoothing: float = 0.0) -> Tensor:
    """``F.cross_entropy(logits, target, ...) + z_loss * log(Z)^2`` over the non-ignored positions.

    Args:
        logits: ``(..., C)``, floating: the class dimension is the **last** one (``F.cross_entropy`` takes
            ``(N, C, d1, ...)``; for ``(N, C)`` the two agree).
        target: class indices of shape ``logits.shape[:-1]``, each in ``[0, C)`` or ``ignore_index``, any
            integer dtype (compared as int64), on the device of ``logits`` (as ``weight``).
        z_loss: the z-loss weight, a finite real >= 0; 0 computes no term.
        weight: ``F.cross_entropy``'s class weights, None or a ``(C,)`` floating tensor of finite values >= 0
            (they weight the cross-entropy only: the z-loss is an unweighted mean over positions).
        ignore_index: a target value that is not scored (padding), an integer.
        reduction: ``'mean'``: cross-entropy averaged as ``F.cross_entropy`` does (over the weights of the
            counted targets) plus ``z_loss * mean(log(Z)^2)`` over the counted positions; ``'sum'``: both summed;
            ``'none'``: per position, shape ``target.shape``, 0 at ignored positions.
        label_smoothing: a real in ``[0, 1]``, as ``F.cross_entropy``.

    Returns:
        The loss in the logits' dtype, float32 for float16/bfloat16 logits. ``z_loss=0`` gives
        ``F.cross_entropy``'s value exactly (of the float32 logits for half precision). When no position is
        counted (every target is ``ignore_index``, or ``logits`` has no position) ``'mean'`` gives 0 with a
        zero gradient, where ``F.cross_entropy`` gives NaN: a batch of padding leaves training finite.

    Raises:
        TypeError / ValueError: naming the argument: ``logits``/``target``/``weight`` of a wrong type or shape,
            ``z_loss < 0``, ``label_smoothing`` outside ``[0, 1]`` or NaN, a bad ``reduction``; and (data checks,
            eager mode only, see `toolbox_core.validation.set_data_checks`) a target outside ``[0, C)`` that is
            not ``ignore_index``, a negative or non-finite class weight, a position whose logits are all
            ``-inf`` (even an ignored one: its gradient would be NaN, in ``F.cross_entropy`` too).

    Examples:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
        >>> cross_entropy_with_z_loss(logits, torch.tensor([0, -100]), z_loss=1.0)   # CE + logsumexp^2
        tensor(4.6508)
    """
    logits = _check_logits(logits)
    target = _check_target(target, logits)
    coef = validation.as_real("z_loss", z_loss, low=0.0)
    classes = logits.shape[-1]
    weight = _check_class_weight(weight, classes, logits.device)
    ignore_index = validation.as_int("ignore_index", ignore_index, minimum=-2 ** 63, maximum=2 ** 63 - 1)  # int64
    reduction = validation.as_choice("reduction", reduction, ("mean", "sum", "none"))
    label_smoothing = validation.as_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    keep = target != ignore_index
    validation.check_data(lambda: (keep & ((target < 0) | (target >= classes))).any(),
                          f"target must hold class indices in [0, {classes}) or ignore_index={ignore_index}")
    _check_rows(logits)

    dtype = _wide(logits.dtype)
    flat = logits.reshape(-1, classes).to(dtype)
    flat_target, flat_keep = target.reshape(-1), keep.reshape(-1)
    if weight is not None:
        weight = weight.to(dtype)
    ce = F.cross_entropy(flat, flat_target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
    if reduction == "mean":
        # F.cross_entropy divides by the weight of the counted targets: 0/0 = NaN when there is none. The NaN
        # stays out of the result and out of the gradient (every position of such a batch is ignored).
        if weight is None:
            counted = flat_keep.any()
        else:
            counted = (weight[torch.where(flat_keep, flat_target, 0)] * flat_keep).sum() > 0
        ce = torch.where(counted, ce, torch.zeros((), dtype=ce.dtype, device=ce.device))
    if coef != 0.0:
        ce = ce + _z_loss_term(flat, coef, flat_keep, reduction)
    return ce.reshape(target.shape) if reduction == "none" else ce
