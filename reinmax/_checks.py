"""Argument and data checks shared by every estimator and layer of [`reinmax`][reinmax].

Argument checks (types, dims, tau) read no tensor data and always run. The data check
(`check_probabilities`: NaN or +inf logits, a slice of all ``-inf``) reads values, so it
follows [`toolbox_core.validation.set_data_checks`][toolbox_core.validation.set_data_checks]: on in eager mode, skipped under
``torch.compile`` and ``torch.func`` transforms, off when switched off.
"""

from typing import Optional

import torch
from torch import Tensor

from toolbox_core import validation

NON_FINITE_MESSAGE = ("logits must be finite, except -inf for categories that can never be drawn; got NaN or "
                      "+inf, or a slice along dim whose logits are all -inf")


def check_tau(tau) -> float:
    """``tau`` as a Python float: a finite real number > 0 (int, float, NumPy number, 1-element tensor)."""
    return validation.as_real("tau", tau, low=0.0, low_open=True)


def check_logits(logits, dim, name: str = "logits") -> int:
    """The non-negative ``dim`` of ``logits``; TypeError/ValueError naming ``name`` for non-floating or empty input."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got dtype {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (the categories), got a 0-d tensor")
    dim = validation.as_int("dim", dim, minimum=-logits.dim(), maximum=logits.dim() - 1) % logits.dim()
    if logits.shape[dim] == 0:
        raise ValueError(f"{name} must have at least one category along dim={dim}, "
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


def check_probabilities(row_sums: Tensor) -> None:
    """Data check: ValueError when softmax gave NaN (``row_sums``: a per-slice sum of it)."""
    validation.check_data(lambda: torch.isnan(row_sums).any(), NON_FINITE_MESSAGE)


def check_hard(hard) -> None:
    """reinmax 0.1.0's third argument ``hard``: accepted (True or False) and, as in 0.1.0, without effect."""
    validation.as_bool("hard", hard)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the estimators compute in: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def one_hot(idx: Tensor, like: Tensor, dim: int) -> Tensor:
    """Zeros shaped and typed like ``like`` with a 1 at ``idx`` along ``dim`` (out of place: vmap-friendly)."""
    return torch.zeros_like(like, memory_format=torch.contiguous_format).scatter(dim, idx, 1.0)
