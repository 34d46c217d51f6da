"""Argument checks shared by every estimator (errors name the argument and the accepted values)."""

import math
import numbers
from typing import Optional

import torch
from torch import Tensor


def check_tau(tau) -> float:
    """``tau`` as a Python float, or ValueError/TypeError when it is not a finite real number > 0."""
    if isinstance(tau, Tensor):
        if tau.numel() != 1 or tau.is_complex() or tau.dtype == torch.bool:
            raise TypeError(f"tau must be a finite real number > 0 (a float or a 1-element real tensor), "
                            f"got a tensor of shape {tuple(tau.shape)} and dtype {tau.dtype}")
        tau = tau.item()
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a finite real number > 0, got {type(tau).__name__} {tau!r}")
    tau = float(tau)
    if not math.isfinite(tau) or tau <= 0.0:
        raise ValueError(f"tau must be a finite real number > 0, got {tau!r}")
    return tau


def check_logits(logits, dim: int) -> int:
    """The non-negative ``dim`` of ``logits``; TypeError/ValueError for non-floating or empty input."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a floating-point torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got dtype {logits.dtype}")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {type(dim).__name__} {dim!r}")
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (the categories), got a 0-d tensor")
    if not -logits.dim() <= dim < logits.dim():
        raise ValueError(f"dim must be in [{-logits.dim()}, {logits.dim() - 1}] for logits of shape "
                         f"{tuple(logits.shape)}, got {dim}")
    dim = int(dim) % logits.dim()
    if logits.shape[dim] == 0:
        raise ValueError(f"logits must have at least one category along dim={dim}, "
                         f"got shape {tuple(logits.shape)}")
    return dim


def check_generator(generator: Optional[torch.Generator], logits: Tensor) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != logits.device.type:
        raise ValueError(f"generator must live on the logits' device type ({logits.device.type}), "
                         f"got a generator on {generator.device}")


NON_FINITE_MESSAGE = ("logits must be finite, except -inf for categories that can never be drawn; got NaN or "
                      "+inf, or a slice along dim whose logits are all -inf")


def raise_if_nan(row_sums: Tensor) -> None:
    """ValueError when softmax produced NaN somewhere (``row_sums``: a per-slice reduction of it)."""
    if bool(torch.isnan(row_sums).any()):
        raise ValueError(NON_FINITE_MESSAGE)
