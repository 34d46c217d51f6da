"""Internal sign decays of AddSign / PowerSign (Bello et al., 2017; TensorFlow's ``sign_decay``).

An internal decay ``d(step)`` scales the sign term of the update: ``d = 1`` is the plain rule and
``d = 0`` reduces AddSign to SGD with learning rate ``lr * alpha`` and PowerSign to plain SGD.
With ``T`` the decay horizon (``T_max``), ``s = min(step, T)`` and ``n`` the number of periods:

* [`LinearInternalDecay`][sign_optim.LinearInternalDecay]:        ``(T - s) / T``
* [`CosineInternalDecay`][sign_optim.CosineInternalDecay]:        ``f = 2 n s / T``, ``0.5 (1 + cos(pi f))``, 0 once ``f >= 2 zero_after``
* [`RestartCosineInternalDecay`][sign_optim.RestartCosineInternalDecay]: ``f = ((n s) mod T) / T``, ``0.5 (1 + cos(pi f))``, 0 once
  ``n s / T >= zero_after`` (TensorFlow's test on the unwrapped fraction: the decay does reach 0)

The decays are plain picklable objects (no closures), and [`InternalDecay.state_dict`][sign_optim.InternalDecay.state_dict] gives a
dict of numbers and strings that [`internal_decay_from_state_dict`][sign_optim.internal_decay_from_state_dict] turns back into the decay,
so an optimizer's ``state_dict`` holding one loads with ``torch.load(..., weights_only=True)``.
Any other callable ``step -> float`` is accepted by the optimizers too, but cannot be serialized.

Examples:
    >>> decay = CosineInternalDecay(100)
    >>> decay(0), decay(50), decay(100)
    (1.0, 0.5, 0.0)
"""

import math
from typing import Any, Dict, Optional, Type

from toolbox_core import validation

__all__ = [
    "InternalDecay",
    "LinearInternalDecay",
    "CosineInternalDecay",
    "RestartCosineInternalDecay",
    "DECAY_KINDS",
    "make_internal_decay",
    "internal_decay_from_state_dict",
]


def _number(name: str, value: Any, **bounds) -> float:
    """``value`` checked by [`validation.as_real`][toolbox_core.checks.as_real]; a Python int or float is kept as given (for the repr)."""
    checked = validation.as_real(name, value, **bounds)
    return value if type(value) in (int, float) else checked


class _NumberOps:
    """The few operations a decay's formula needs, on Python numbers (`math`)."""

    cos = staticmethod(math.cos)
    fmod = staticmethod(math.fmod)

    @staticmethod
    def at_least_zero(x: float) -> float:
        return max(0.0, x)

    @staticmethod
    def zero_where(condition: bool, x: float) -> float:
        return 0.0 if condition else x


class _TensorOps:
    """The same operations on tensors (torch's ops: traceable by ``torch.compile``, no host read)."""

    def __init__(self, torch) -> None:
        self.torch = torch
        self.cos, self.fmod = torch.cos, torch.fmod

    def at_least_zero(self, x):
        return self.torch.clamp(x, min=0.0)

    def zero_where(self, condition, x):
        return self.torch.where(condition, self.torch.zeros_like(x), x)


class InternalDecay:
    """Base class: a picklable callable ``step (int >= 0) -> float`` with a serializable config.

    Subclasses set ``kind`` (the name used by [`make_internal_decay`][sign_optim.make_internal_decay] and in state dicts) and
    implement ``_formula(step, ops)``, the decay of a step already clipped to ``[0, T_max]``, written once for a number
    (`value`, ``ops`` on Python numbers) and a tensor (`tensor_value`, ``ops`` on tensors).
    """

    kind: str = ""

    def __init__(self, T_max: float) -> None:
        self.T_max = _number("T_max", T_max, low=1.0)

    def value(self, step: float) -> float:
        """The decay at a number ``step`` in ``[0, T_max]`` (ValueError outside it, TypeError for a non-number)."""
        return self._formula(validation.as_real("step", step, low=0.0, high=float(self.T_max)), _NumberOps)

    def tensor_value(self, step: "torch.Tensor") -> "torch.Tensor":
        """The decay at a 0-d tensor ``step``, as a float64 tensor (torch ops: traceable by
        ``torch.compile``, no recompilation as the step changes). Equal to ``self(step)``."""
        import torch
        # metadata only (no read of the value: traceable, no host sync); a bad value is the caller's counter
        if not isinstance(step, torch.Tensor) or step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
            got = (f"a tensor of shape {tuple(step.shape)} and dtype {step.dtype}" if isinstance(step, torch.Tensor)
                   else type(step).__name__)
            raise TypeError(f"step must be a 1-element real tensor (the step counter), got {got}")
        return self._formula(torch.clamp(step.double(), min=0.0, max=float(self.T_max)), _TensorOps(torch))

    def _formula(self, step, ops):
        raise NotImplementedError

    def __call__(self, step: float) -> float:
        step = validation.as_real("step", step, low=0.0)
        return float(self._formula(min(step, self.T_max), _NumberOps))  # (`value` would check step again)

    def config(self) -> Dict[str, Any]:
        return {"T_max": self.T_max}

    def state_dict(self) -> Dict[str, Any]:
        """``{"kind": ..., <constructor arguments>}``: numbers, strings and None only."""
        return {"kind": self.kind, **self.config()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Take the configuration of ``state_dict`` (which must be of the same kind)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict (a decay's state_dict()), got {type(state_dict).__name__}")
        if state_dict.get("kind") != self.kind:
            raise ValueError(f"state_dict is of decay kind {state_dict.get('kind')!r}, not {self.kind!r}")
        fresh = internal_decay_from_state_dict(state_dict)
        self.__dict__.update(fresh.__dict__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.config() == self.config()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.kind, tuple(sorted(self.config().items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class LinearInternalDecay(InternalDecay):
    """``d(step) = (T_max - min(step, T_max)) / T_max``: from 1 at step 0 to 0 at ``T_max``.

    Args:
        T_max: decay horizon in optimizer steps (>= 1).
    """

    kind = "linear"

    def _formula(self, step, ops):
        return ops.at_least_zero((self.T_max - step) / self.T_max)


class _PeriodicDecay(InternalDecay):
    def __init__(self, T_max: float, num_periods: float, zero_after: Optional[float]) -> None:
        super().__init__(T_max)
        self.num_periods = _number("num_periods", num_periods, low=0.0, low_open=True)
        self.zero_after = None if zero_after is None else _number("zero_after", zero_after, low=0.0)

    def config(self) -> Dict[str, Any]:
        return {"T_max": self.T_max, "num_periods": self.num_periods, "zero_after": self.zero_after}


class CosineInternalDecay(_PeriodicDecay):
    """Cosine decay over ``num_periods`` periods: ``0.5 (1 + cos(pi f))`` with ``f = 2 n s / T_max``.

    The default ``num_periods=0.5`` goes once from 1 (step 0) to 0 (step ``T_max``). With
    ``zero_after`` the decay is 0 once ``f >= 2 * zero_after``, i.e. after ``zero_after`` periods.

    Args:
        T_max: decay horizon in optimizer steps (>= 1); the step is clipped to it.
        num_periods: number of cosine periods over ``T_max`` (> 0).
        zero_after: None, or the number of periods after which the decay is 0.
    """

    kind = "cosine"

    def __init__(self, T_max: float, num_periods: float = 0.5, zero_after: Optional[float] = None) -> None:
        super().__init__(T_max, num_periods, zero_after)

    def _formula(self, step, ops):
        fraction = 2.0 * self.num_periods * step / self.T_max
        value = 0.5 * (1.0 + ops.cos(math.pi * fraction))
        if self.zero_after is not None:
            value = ops.zero_where(fraction >= 2.0 * self.zero_after, value)
        return value


class RestartCosineInternalDecay(_PeriodicDecay):
    """Cosine decay with warm restarts: ``0.5 (1 + cos(pi f))``, ``f = ((n s) mod T_max) / T_max``.

    Each of the ``num_periods`` periods goes from 1 down towards 0 and restarts at 1. With
    ``zero_after`` the decay is 0 once ``n s / T_max >= zero_after`` (TensorFlow's semantics: the
    unwrapped number of periods is compared, so the decay stays 0 after ``zero_after`` periods).

    Args:
        T_max: decay horizon in optimizer steps (>= 1); the step is clipped to it.
        num_periods: number of restart periods over ``T_max`` (> 0).
        zero_after: None, or the number of periods after which the decay is 0.
    """

    kind = "restart"

    def __init__(self, T_max: float, num_periods: float = 1, zero_after: Optional[float] = None) -> None:
        super().__init__(T_max, num_periods, zero_after)

    def _formula(self, step, ops):
        periods = self.num_periods * step
        value = 0.5 * (1.0 + ops.cos(math.pi * (ops.fmod(periods, self.T_max) / self.T_max)))
        if self.zero_after is not None:
            value = ops.zero_where(periods / self.T_max >= self.zero_after, value)
        return value


DECAY_KINDS: Dict[str, Type[InternalDecay]] = {
    cls.kind: cls for cls in (LinearInternalDecay, CosineInternalDecay, RestartCosineInternalDecay)
}


def make_internal_decay(
    kind: Optional[str],
    T_max: float,
    num_periods: Optional[float] = None,
    zero_after: Optional[float] = None,
) -> Optional[InternalDecay]:
    """Build a decay by name: ``kind`` in ``{"none", "linear", "cosine", "restart"}`` (None = "none").

    ``num_periods=None`` takes the class default (0.5 for cosine, 1 for restart); the linear decay
    takes neither ``num_periods`` nor ``zero_after``.

    Examples:
        >>> make_internal_decay("restart", 1000, num_periods=4, zero_after=3)
        RestartCosineInternalDecay(T_max=1000, num_periods=4, zero_after=3)
    """
    if kind is None or kind == "none":
        return None
    validation.as_choice("kind", kind, ["none", *DECAY_KINDS])
    if kind == "linear":
        for name, value in (("num_periods", num_periods), ("zero_after", zero_after)):
            if value is not None:
                raise ValueError(f"{name} is not accepted by the linear decay (it goes once from 1 to 0 at T_max), "
                                 f"got {name}={value!r}; use kind 'cosine' or 'restart' for periods")
        return LinearInternalDecay(T_max)
    kwargs: Dict[str, Any] = {"zero_after": zero_after}
    if num_periods is not None:
        kwargs["num_periods"] = num_periods
    return DECAY_KINDS[kind](T_max, **kwargs)


def internal_decay_from_state_dict(state_dict: Dict[str, Any]) -> InternalDecay:
    """Inverse of [`InternalDecay.state_dict`][sign_optim.InternalDecay.state_dict]."""
    if not isinstance(state_dict, dict) or state_dict.get("kind") not in DECAY_KINDS:
        raise ValueError(f"sign_internal_decay: not an internal decay state dict (kind must be one of "
                         f"{list(DECAY_KINDS)}): {state_dict!r}")
    args = {k: v for k, v in state_dict.items() if k != "kind"}
    try:
        return DECAY_KINDS[state_dict["kind"]](**args)
    except TypeError as err:  # another key than the class takes
        raise ValueError(f"sign_internal_decay: {state_dict!r} is not a {state_dict['kind']} decay's state dict: "
                         f"{err}") from None

