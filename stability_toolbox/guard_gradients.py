"""What a guarded step reads of the gradients: the optimizer's gradients (DTensors: their local shards), a stamp
that tells whether they changed since, and the check of a gradient norm the training loop hands over.

Examples:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(3))
    >>> gradients = OptimizerGradients(torch.optim.SGD([p], lr=0.1))
    >>> p.grad = torch.full((3,), 2.0)
    >>> raw, local, sharded, several_devices = gradients.read()
    >>> seen = stamp(raw)
    >>> unchanged(raw, seen)
    True
    >>> _ = p.grad.mul_(0.5)                     # a clipping: the gradients changed
    >>> unchanged(gradients.read()[0], seen)
    False
    >>> check_grad_norm(3.0)
    tensor(3., dtype=torch.float64)
"""

import math
import numbers
import weakref
from typing import Any, List, Tuple, Union

import torch
from torch import Tensor

__all__ = ["OptimizerGradients", "Stamp", "check_grad_norm", "stamp", "unchanged"]

#: (the gradients' ids, the sum of their version counters, (weak reference, version) of three of them)
Stamp = Tuple[Tuple[int, ...], int, List[Tuple[Any, int]]]


def _check_norm_sign(value: float) -> None:
    """A handed gradient norm is >= 0 or non-finite (NaN, +-inf: the ``nonfinite`` signal, never refused: a
    non-finite gradient is what the guard is there to catch); a finite negative value is a named ValueError."""
    if value < 0 and math.isfinite(value):
        raise ValueError(f"grad_norm must be a real number >= 0 (or NaN/inf: non-finite), got {value!r}")


def check_grad_norm(grad_norm: Union[Tensor, float]) -> Tensor:
    """``grad_norm`` as a 0-d float64 tensor on its device, or a named TypeError/ValueError."""
    if isinstance(grad_norm, Tensor):
        if not grad_norm.is_floating_point():
            raise TypeError(f"grad_norm must be a floating tensor or a real number >= 0, got dtype "
                            f"{grad_norm.dtype}")
        if grad_norm.numel() != 1:
            raise ValueError(f"grad_norm must be one number (a 0-d or one-element tensor), got shape "
                             f"{tuple(grad_norm.shape)}")
        if grad_norm.device.type == "meta":
            raise ValueError("grad_norm must hold a value: a meta tensor has none")
        # a copy (float64 is .double()'s no-op): the value as handed, whatever happens to the caller's tensor
        # before the step (a trainer reusing its buffer, an in-place clip of the returned norm)
        value = grad_norm.detach().reshape(()).to(torch.float64, copy=True)
        # the sign is checked where reading is free (the CPU); on a GPU that read would be a sync: a norm is
        # >= 0 by construction there (clip_grad_norm_'s)
        if value.device.type == "cpu":
            _check_norm_sign(value.item())
        return value
    if isinstance(grad_norm, bool) or not isinstance(grad_norm, numbers.Real):  # NumPy floats are Real
        raise TypeError(f"grad_norm must be a floating tensor or a real number >= 0, got "
                        f"{type(grad_norm).__name__}")
    try:
        value = float(grad_norm)
    except OverflowError:  # an integer beyond a float's range: non-finite, as a value beyond float32's
        value = math.inf
    _check_norm_sign(value)
    return torch.tensor(value, dtype=torch.float64)


def _sampled(n: int) -> Tuple[int, ...]:
    return (0, n // 2, n - 1) if n > 3 else tuple(range(n))


def stamp(raw: List[Tensor]) -> Stamp:
    """What identifies the gradients ``raw`` as they are now: their ids (a gradient replaced by another tensor),
    the sum of their version counters (changed in place: ~6 us per 100 gradients) and weak references (the old
    gradients are not kept alive: set_to_none frees them, and a new tensor at a reused address is not mistaken for
    the old one) to three of them, the first, a middle and the last, with their versions: a backward, a
    zero_grad or a clipping changes them (weak references to every gradient, made every step, cost ~10% of the
    guard's 1% budget on a small model)."""
    return (tuple(map(id, raw)), sum(g._version for g in raw),
            [(weakref.ref(raw[i]), raw[i]._version) for i in _sampled(len(raw))])


def unchanged(raw: List[Tensor], seen: Stamp) -> bool:
    """Whether ``raw`` are the gradients `stamp` saw, unmodified since: the same tensors (the sampled ones checked
    through their weak references) at the same versions, and no version moved elsewhere (a backward without
    zero_grad that reached only other parameters: conditional computation, unused layers)."""
    ids, versions, sampled = seen
    if not sampled or tuple(map(id, raw)) != ids:
        return False
    for (ref, version), i in zip(sampled, _sampled(len(raw))):
        g = raw[i]
        if ref() is not g or g._version != version:
            return False
    return sum(g._version for g in raw) == versions


class OptimizerGradients:
    """The gradients of ``optimizer``'s parameters, read afresh at every step."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._key: Any = None
        self._kinds: Any = None

    def params(self) -> Tuple[List[Tensor], bool, bool]:
        """The optimizer's parameters in order, whether any is a DTensor and whether they span several devices
        (these two cached until the parameters change). The list is read afresh every step: a parameter replaced
        inside a group's list (same list, same length) must be seen, or its gradient would escape the norm."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        key = tuple(map(id, params))  # ~1 us per 100 parameters, in C
        if key != self._key:
            self._kinds = (any(type(p).__name__ == "DTensor" for p in params), len({p.device for p in params}) > 1)
            self._key = key
        return (params, *self._kinds)

    def read(self) -> Tuple[List[Tensor], List[Tensor], bool, bool]:
        """The gradients as the parameters hold them, the same as local tensors (DTensors: their shards), whether
        any is sharded and whether they span several devices."""
        params, dtensors, devices = self.params()
        raw = [p.grad for p in params]
        raw = [g for g in raw if g is not None]
        if dtensors:
            local = [g.to_local() if type(g).__name__ == "DTensor" else g for g in raw]
            return raw, local, any(type(g).__name__ == "DTensor" for g in raw), devices
        return raw, raw, False, devices
