"""Argument checks shared by admin_torch, reinmax, sign_optim and the ListOps data code: one helper
per kind of check, in pure Python (this module imports neither torch nor NumPy).

Every helper takes the argument's public name, so an error reads ``"tau must be a finite real
number > 0, got 0.0"``. Numbers are accepted in every form a user passes one: Python ``int``
and ``float``, NumPy scalars (``np.int64(2)``, ``np.float32(0.5)``) and one-element tensors
(a 0-d tensor where a number is expected; a tensor exists only once torch is imported, so torch is
looked up in `sys.modules`, never imported here). ``bool`` is never a number here (``True``
layers is a bug, not a count).

These are the *argument checks* of [`toolbox_core.validation`][toolbox_core.validation] (which re-exports them
beside the data checks): they read no tensor data, always run and cost nothing on a GPU.

Examples:
    >>> from stability_toolbox import checks
    >>> checks.as_real("tau", 1.5, low=0.0, low_open=True)
    1.5
    >>> checks.as_int("k", __import__("numpy").int64(3), minimum=1)
    3
"""

import math
import numbers
import sys
from typing import Any, Optional, Sequence

__all__ = ["as_int", "as_real", "as_bool", "as_choice"]


def _torch():
    """The torch module if something imported it (only then can a tensor exist), else None."""
    torch = sys.modules.get("torch")
    return torch if getattr(torch, "Tensor", None) is not None else None


def _is_tensor(value: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)


def _scalar(value: Any) -> Any:
    """A one-element tensor or NumPy scalar as a Python number; anything else unchanged."""
    if _is_tensor(value):
        # a meta tensor holds no value to read (its .item() is a RuntimeError): refused as a non-number
        if value.numel() != 1 or value.dtype == _torch().bool or value.is_complex() or value.is_meta:
            return value
        return value.item()
    item = getattr(value, "item", None)  # NumPy scalars and 0-d arrays, without importing NumPy
    if item is not None and type(value).__module__ == "numpy" and getattr(value, "shape", None) in ((), (1,)):
        return item()
    return value


def _describe(value: Any) -> str:
    if _is_tensor(value):
        where = " on meta (no data)" if value.is_meta else ""
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}{where}"
    return f"{value!r} ({type(value).__name__})"


def as_int(name: str, value: Any, *, minimum: Optional[int] = None, maximum: Optional[int] = None,
           integral_float: bool = False) -> int:
    """``value`` as a Python int within ``[minimum, maximum]``.

    Accepts ints, NumPy integers and one-element integer tensors; with ``integral_float`` also
    floats with an integral value (``12.0``). TypeError for other types, ValueError out of range.
    """
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum}")
    if maximum is not None:
        bounds.append(f"<= {maximum}")
    what = f"an integer{' ' + ' and '.join(bounds) if bounds else ''}"
    v = _scalar(value)
    if integral_float and isinstance(v, numbers.Real) and not isinstance(v, (bool, numbers.Integral)):
        f = float(v)
        if not (math.isfinite(f) and f.is_integer()):
            raise ValueError(f"{name} must be {what}, got {value!r}")
        v = int(f)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be {what}, got {_describe(value)}")
    v = int(v)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ValueError(f"{name} must be {what}, got {v}")
    return v


def _interval(low, high, low_open, high_open) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f" {'<' if high_open else '<='} {high:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def as_real(name: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None,
            low_open: bool = False, high_open: bool = False, finite: bool = True) -> float:
    """``value`` as a Python float within the interval given (open or closed ends).

    Accepts ints (any size that fits a float), floats, NumPy numbers and one-element real tensors.
    TypeError for other types; ValueError for NaN, for infinities when ``finite``, out of range, and
    for integers too large for a float.
    """
    what = f"a {'finite ' if finite else ''}real number{_interval(low, high, low_open, high_open)}"
    v = _scalar(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {_describe(value)}")
    try:
        f = float(v)
    except OverflowError:
        raise ValueError(f"{name} must be {what}, got an integer too large for a float") from None
    if math.isnan(f) or (finite and math.isinf(f)):
        raise ValueError(f"{name} must be {what}, got {f}")
    if low is not None and (f < low or (low_open and f == low)):
        raise ValueError(f"{name} must be {what}, got {f!r}")
    if high is not None and (f > high or (high_open and f == high)):
        raise ValueError(f"{name} must be {what}, got {f!r}")
    return f


def as_bool(name: str, value: Any) -> bool:
    """``value`` as a bool: ``True``/``False``, NumPy bools, or the integers 0 and 1."""
    v = _scalar(value)
    if _is_tensor(v) and v.numel() == 1 and v.dtype == _torch().bool and not v.is_meta:  # _scalar keeps bool tensors (not numbers)
        return bool(v.item())
    if isinstance(v, bool):
        return v
    if isinstance(v, numbers.Integral) and v in (0, 1):
        return bool(v)
    raise TypeError(f"{name} must be True or False, got {_describe(value)}")


def as_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of the strings ``choices``; TypeError / ValueError naming them."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {list(choices)}, got {_describe(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
