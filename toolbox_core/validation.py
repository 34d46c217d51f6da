"""Argument checks shared by admin_torch, reinmax and sign_optim: one helper per kind of check.

Every helper takes the argument's public name, so an error reads ``"tau must be a finite real
number > 0, got 0.0"``. Numbers are accepted in every form a user passes one: Python ``int``
and ``float``, NumPy scalars (``np.int64(2)``, ``np.float32(0.5)``) and one-element tensors
(a 0-d tensor where a number is expected). ``bool`` is never a number here (``True`` layers is a
bug, not a count).

Two kinds of check (the convention of ``torch.distributions``):

* **argument checks** (types, ranges, shapes, dims: [`as_int`][toolbox_core.checks.as_int], [`as_real`][toolbox_core.checks.as_real],
  [`as_bool`][toolbox_core.checks.as_bool], [`as_choice`][toolbox_core.checks.as_choice]) read no tensor data: they always run, cost nothing on a GPU
  and are invisible to ``torch.compile``. They live in the torch-free [`toolbox_core.checks`][toolbox_core.checks]
  (what the ListOps data code, the `listops_data` package, uses) and are re-exported here;
* **data checks** ([`check_data`][toolbox_core.validation.check_data]: NaN or +inf logits, an all ``-inf`` slice, negative
  probabilities) read a tensor's values. On CUDA each one is a host-device synchronization and
  under ``torch.compile`` a graph break, so they run only in eager mode, and
  [`set_data_checks`][toolbox_core.validation.set_data_checks] switches them off globally for production GPU loops. Switched off, a
  bad value is not reported and propagates (a NaN input gives NaN outputs).

Examples:
    >>> from toolbox_core import validation as v
    >>> v.as_real("tau", 1.5, low=0.0, low_open=True)
    1.5
    >>> v.as_int("k", __import__("numpy").int64(3), minimum=1)
    3
"""

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

from .checks import as_bool, as_choice, as_int, as_real

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "as_int",
    "as_real",
    "as_bool",
    "as_choice",
    "check_data",
    "check_device",
    "as_device",
    "check_tensor",
    "data_checks_enabled",
    "set_data_checks",
    "data_checks",
]

_DATA_CHECKS = True


def set_data_checks(enabled: bool) -> None:
    """Switch the data checks (NaN/inf/all ``-inf`` inputs) of every library on or off, globally.

    On by default. Off, the estimators, layers and residuals make no host-device synchronization
    at all (what production GPU loops want), and a bad value is no longer reported: NaN in, NaN out.
    Inside ``torch.compile`` the data checks are always skipped.

    Examples:
        >>> import stability_toolbox
        >>> stability_toolbox.set_data_checks(False)   # production: no syncs
        >>> stability_toolbox.set_data_checks(True)
    """
    global _DATA_CHECKS
    _DATA_CHECKS = as_bool("enabled", enabled)


def data_checks_enabled() -> bool:
    """Whether data checks run now: switched on, and not being traced by ``torch.compile``."""
    if not _DATA_CHECKS:
        return False
    import torch  # only here: the ground package imports no torch (a tensor's caller has it loaded already)

    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is None


@contextlib.contextmanager
def data_checks(enabled: bool) -> Iterator[None]:
    """Context manager form of [`set_data_checks`][toolbox_core.validation.set_data_checks] (the previous setting is restored)."""
    global _DATA_CHECKS
    previous = _DATA_CHECKS
    set_data_checks(enabled)
    try:
        yield
    finally:
        _DATA_CHECKS = previous


def as_device(name: str, value: Any) -> "torch.device":
    """``value`` (a torch.device, a device name such as ``"cpu"`` or ``"cuda:0"``, or a CUDA index) as a torch.device;
    TypeError for another type, ValueError for a name or index torch does not parse (its RuntimeError otherwise).
    An argument check: nothing is allocated, and a device that parses but is absent is not an error here.

    Examples:
        >>> as_device("device", "cpu")
        device(type='cpu')
        >>> as_device("device", "gpu")
        Traceback (most recent call last):
        ...
        ValueError: device must be a torch.device, a device name ('cpu', 'cuda:0', ...) or an index, got 'gpu'
    """
    import torch

    what = "a torch.device, a device name ('cpu', 'cuda:0', ...) or an index"
    if isinstance(value, torch.device):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    try:
        return torch.device(value)
    except RuntimeError:
        raise ValueError(f"{name} must be {what}, got {value!r}") from None


def check_device(name: str, tensor: "Tensor", device, what: str) -> None:
    """ValueError naming ``name`` unless ``tensor`` lives on ``device`` (the device of ``what``, e.g.
    ``"logits"``). An argument check: it reads no data. torch itself raises a RuntimeError deep inside an
    operation for a mismatch (or, for some CPU kernels, reads a ``meta`` tensor as if it held data).

    Examples:
        >>> import torch
        >>> check_device("mask", torch.zeros(2, device="meta"), torch.device("cpu"), "logits")
        Traceback (most recent call last):
        ...
        ValueError: mask must be on the device of logits (cpu), got a tensor on meta
    """
    # hasattr "dim", not "shape": a nested tensor's .shape raises a RuntimeError (hasattr only swallows AttributeError)
    if not hasattr(tensor, "device") or not hasattr(tensor, "dim"):  # (no torch import: any tensor-like passes)
        raise TypeError(f"{name} must be a tensor on the device of {what} ({device}), got {type(tensor).__name__}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on the device of {what} ({device}), got a tensor on {tensor.device}")


def check_tensor(name: str, value: Any, *, floating: bool = True, dims: Optional[Sequence[int]] = None,
                 last_dim: Optional[int] = None, shape: str = "") -> "Tensor":
    """``value`` if it is a torch.Tensor (floating unless ``floating=False``) with a number of dimensions in
    ``dims`` and last dimension ``last_dim`` (each when given); else TypeError (not a tensor, not floating) or
    ValueError (dims, last dimension) naming ``name`` and what is accepted (``shape``, e.g. ``"(N, L, E)"``,
    completes the message). An argument check: it reads no data (a meta tensor passes it; compare devices with
    [`check_device`][toolbox_core.validation.check_device]).

    Examples:
        >>> import torch
        >>> check_tensor("x", [1.0, 2.0], shape="(*, 4)")
        Traceback (most recent call last):
        ...
        TypeError: x must be a floating torch.Tensor of shape (*, 4), got list
        >>> check_tensor("x", torch.zeros(2, 3), last_dim=4, shape="(*, 4)")
        Traceback (most recent call last):
        ...
        ValueError: x must have shape (*, 4) (last dimension 4), got shape (2, 3)
    """
    import torch

    kind = "floating torch.Tensor" if floating else "torch.Tensor"
    of = f" of shape {shape}" if shape else ""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a {kind}{of}, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
                        f"got dtype {value.dtype}")
    if dims is not None and value.dim() not in dims:
        accepted = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be a {accepted} tensor{of}, got shape {tuple(value.shape)}")
    if last_dim is not None and (value.dim() == 0 or value.shape[-1] != last_dim):
        raise ValueError(f"{name} must have shape {shape or '(*, %d)' % last_dim} (last dimension {last_dim}), "
                         f"got shape {tuple(value.shape)}")
    return value


def check_data(bad: Callable[[], "Tensor"], message: str) -> None:
    """Raise ValueError(message) when the 0-d bool tensor ``bad()`` is True, if data checks run.

    ``bad`` is a callable so that nothing is computed when the checks are off or compiled. A tensor on the
    ``meta`` device holds no values: there is nothing to check (shape-only code goes on).
    """
    if data_checks_enabled():
        flag = bad()
        if not getattr(flag, "is_meta", False) and bool(flag):
            raise ValueError(message)
