"""What a model's modules hold besides their parameters and submodules, saved and put back.

A pass of the model that must leave no trace (the monitor's probe pass: `stability_toolbox.probe`) saves it first
and puts it back after: each module's attributes and buffers (the objects bound to them: a module that assigns new
tensors when called, as an LM's carried hidden state does, gets its earlier ones back; attributes and buffers the
pass added are removed), and the contents of every tensor, list, tuple and dict they hold (a dict cache or a list
filled in place, a buffer changed in place, a write through ``.data`` or from C++ such as DDP's buffer broadcast).
Tensors are copied back whether or not they changed: reading them to compare would wait for the device.

Examples:
    >>> import torch
    >>> class Carry(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.hidden = torch.zeros(2)
    ...     def forward(self, x):
    ...         self.hidden = self.hidden + x
    ...         return self.hidden
    >>> m = Carry()
    >>> state = save_state(m)
    >>> _ = m(torch.ones(2)); m.hidden.tolist()
    [1.0, 1.0]
    >>> restore_state(state); m.hidden.tolist()
    [0.0, 0.0]
"""

from typing import Any, List, Tuple

import torch
from torch import Tensor, nn

__all__ = ["save_state", "restore_state", "state_shapes"]

#: one module's state before a probe pass: (module, its attributes, its buffers, copies of the tensors and
#: containers they hold, as `_copy` takes them)
StateEntry = Tuple[nn.Module, dict, dict, list]

_STRUCTURE = ("_parameters", "_modules", "_buffers")


def save_state(model: nn.Module) -> List[StateEntry]:
    """What ``model``'s modules hold besides their parameters and submodules, to be put back after a probe pass
    (`restore_state`): the object bound to each attribute and buffer, and a copy of every tensor they hold (in lists,
    tuples and dicts too: a dict cache or a list filled in place, a buffer changed in place)."""
    out: List[StateEntry] = []
    with torch.no_grad():
        for module in model.modules():
            attrs = {k: v for k, v in vars(module).items() if k not in _STRUCTURE}
            buffers = dict(module._buffers)
            held = [_copy(v) for v in buffers.values()]
            held += [_copy(v) for v in attrs.values() if isinstance(v, Tensor) or _shape(v) is not None]
            held.append(("set", module._non_persistent_buffers_set, set(module._non_persistent_buffers_set)))
            out.append((module, attrs, buffers, held))
    return out


def _copy(value: Any) -> tuple:
    """``value`` as it is now: a tensor with a copy of its values, a list / tuple / dict with what it holds
    (recursively), anything else as it is."""
    if isinstance(value, nn.Parameter):  # a parameter held as an attribute too (tied, sharded views): no pass
        return ("other", value, None)     # writes one, and a copy would cost its size
    if isinstance(value, Tensor):
        return ("tensor", value, value.detach().clone())
    if isinstance(value, (list, tuple)):
        return ("seq", value, [_copy(x) for x in value])
    if isinstance(value, dict):
        return ("dict", value, {k: _copy(x) for k, x in value.items()})
    return ("other", value, None)


def _put_back(saved: tuple) -> None:
    """The contents `_copy` saw put back into the same objects."""
    kind, value, inner = saved[0], saved[1], saved[-1]
    if kind == "tensor":
        # copied back whether or not it changed: a write through ``.data`` or from C++ (DDP's broadcast of the
        # buffers) leaves the version counter alone, and reading the values to compare would wait for the device;
        # through ``.data``, so the copy counts as no in-place change for autograd (the values are the saved ones)
        with torch.inference_mode() if value.is_inference() else torch.no_grad():
            value.data.copy_(inner)
    elif kind == "seq":
        if isinstance(value, list):
            value[:] = [s[1] for s in inner]
        for s in inner:
            _put_back(s)
    elif kind == "dict":
        value.clear()
        value.update({k: s[1] for k, s in inner.items()})
        for s in inner.values():
            _put_back(s)
    elif kind == "set":
        value.clear()
        value.update(inner)


def restore_state(state: List[StateEntry]) -> None:
    """Put back what ``state`` saw: each module's attributes and buffers (the objects themselves: a module that
    assigns new tensors when called, as a carried state does, gets its earlier ones back; those the pass added
    are removed), and the contents of the tensors, lists and dicts they held."""
    for module, attrs, buffers, held in state:
        now = vars(module)
        for key in [k for k in now if k not in _STRUCTURE and k not in attrs]:
            del now[key]
        now.update(attrs)
        module._buffers.clear()
        module._buffers.update(buffers)
        for saved in held:
            _put_back(saved)


def _shape(value: Any) -> Any:
    """The shape of a tensor, or of each tensor a list / tuple / dict holds (recursively); None for anything
    that holds no tensor."""
    if isinstance(value, Tensor):
        return tuple(value.shape)
    if value and isinstance(value, (list, tuple, dict)):  # (most attributes: flags, numbers, empty hook dicts)
        shapes = tuple((k, _shape(x)) for k, x in (value.items() if isinstance(value, dict) else enumerate(value)))
        if any(s is not None for _, s in shapes):
            return shapes
    return None


def state_shapes(model: nn.Module) -> List[Tuple[int, str, Any]]:
    """The shapes of the tensors ``model``'s modules hold in buffers and attributes."""
    return [(id(m), k, _shape(v)) for m in model.modules()
            for k, v in (*m._buffers.items(), *((k, v) for k, v in vars(m).items() if k not in _STRUCTURE))
            if _shape(v) is not None]
