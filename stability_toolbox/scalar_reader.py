"""Per-update device scalars brought to the host without a host-device sync.

[`ScalarReader`][stability_toolbox.scalar_reader.ScalarReader] keeps, for each update, a few one-element
tensors (``put``); ``end(step)`` stacks them on their device and starts one asynchronous copy of that
row into pinned host memory, marked by a CUDA event (values in host memory, on a CPU, are read at ``end``
through NumPy: no copy to make); ``ready()`` returns the rows whose copy has finished
(``event.query()``: it never waits), oldest first. The host therefore learns update ``t``'s scalars at the
first ``ready()`` after the device has reached update ``t``'s copy: on a CPU tensor at once (no device to
wait for), on a GPU usually one or two updates later (how far the host runs ahead of the device). A warning
computed from those values is *known* at that later update, which is where its lead is counted from.
``ready(block=True)`` waits (for the end of a run).

Examples:
    >>> import torch
    >>> r = ScalarReader()
    >>> r.put("loss", torch.tensor(2.0)); r.end(0)
    >>> r.put("loss", torch.tensor(1.5)); r.put("grad_norm", torch.tensor(3.0)); r.end(1)
    >>> r.ready()
    [(0, {'loss': 2.0}), (1, {'grad_norm': 3.0, 'loss': 1.5})]
    >>> r.ready()          # each row is returned once
    []
"""

import math
import numbers
from collections import deque
from typing import Any, Deque, Dict, List, Tuple

import torch
from torch import Tensor

from toolbox_core import checks

__all__ = ["ScalarReader", "as_scalar", "host_memory"]



def host_memory(device: torch.device) -> bool:
    """Whether a tensor on ``device`` lives in host memory (a CPU's), so that reading its value (``item``) is no
    host-device sync: the per-update paths read such values on the host rather than dispatching ops on them.

        >>> host_memory(torch.device("cpu")), host_memory(torch.device("meta"))
        (True, False)
    """
    return device.type == "cpu"


def as_scalar(value: Any, copy: bool = True) -> Tensor:
    """``value`` (a one-element real tensor, kept on its device with no transfer, or a real number) as a float32
    0-d tensor, detached. TypeError for anything else.

    ``copy=True`` (the default): the result never shares memory with ``value``, so a caller that changes its
    tensor in place afterwards (a loss buffer reused at every update) does not change what was recorded.
    ``copy=False``: a 0-d float32 tensor the caller will not touch again (the monitor's own values) is returned
    as it is, with no op dispatched.

        >>> as_scalar(torch.tensor([2.5], dtype=torch.float64)), as_scalar(3)
        (tensor(2.5000), tensor(3.))
        >>> t = torch.tensor(1.0); v = as_scalar(t); _ = t.fill_(5.0); v
        tensor(1.)
    """
    if isinstance(value, Tensor):
        if value.dtype == torch.float32 and value.dim() == 0 and not value.requires_grad and not copy:
            return value  # already what is asked and handed over (the monitor's own values): no op per update
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool or value.is_meta:
            raise TypeError(f"value must be a one-element real tensor with data or a real number, got a tensor of "
                            f"shape {tuple(value.shape)} and dtype {value.dtype} on {value.device}")
        out = value.detach().float().reshape(())
        # a float32 tensor in: .float() and reshape are views of the caller's memory; a copy keeps today's value
        return out.clone() if copy and value.dtype == torch.float32 else out
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return torch.tensor(float(value))
        except OverflowError:  # an integer beyond a float's range: non-finite, as a value beyond float32's is
            return torch.tensor(math.inf)
    raise TypeError(f"value must be a one-element real tensor or a real number, got {type(value).__name__}")

_F32_MAX = float(torch.finfo(torch.float32).max)


class ScalarReader:
    """Rows of named per-update scalars, copied to the host asynchronously (module docstring).

    Only ``end`` issues device work (one ``stack``, one non-blocking copy, one event record); ``put`` and
    ``ready`` never read a device value on the host.
    """

    def __init__(self):
        self._current: Dict[str, Tensor] = {}
        # (step, names, host row (a pinned tensor, or the values read already on a CPU), CUDA event or None):
        # copies started, not yet returned by ready()
        self._pending: Deque[Tuple[int, Tuple[str, ...], Any, Any]] = deque()
        self._free: Dict[int, List[Tensor]] = {}  # pinned rows returned by ready(), reused by size

    def put(self, name: str, value: Any, *, copy: bool = True) -> None:
        """Set ``name`` of the current update to ``value`` (a one-element real tensor, kept on its device, or
        a real number): its value now (`as_scalar`'s ``copy``; ``copy=False`` for a tensor nobody changes
        afterwards). TypeError for another name or value, with nothing changed."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        # a Python float within float32's range is kept as it is (float64, immutable): the monitor's values of CPU
        # gradients, reduced on the host (no tensor made for them, none read back at `end`); one beyond it reads inf,
        # as every other number and tensor does (as_scalar's float32)
        self._current[name] = (value if type(value) is float and -_F32_MAX <= value <= _F32_MAX
                               else as_scalar(value, copy=copy is not False))

    def clear(self) -> None:
        """Forget the current update's values (a failed step)."""
        self._current = {}

    def end(self, step: int) -> None:
        """Close the current update as update ``step`` (an integer >= 0) and start its copy to the host
        (nothing for an update without a value)."""
        if type(step) is not int or step < 0:  # the full check (and its message) off the per-update path
            step = checks.as_int("step", step, minimum=0)
        if not self._current:
            return
        names = tuple(sorted(self._current))
        current, self._current = self._current, {}
        if all(type(v) is float or v.device.type == "cpu" for v in current.values()):
            # host memory already: the values are read now, through NumPy (no device, nothing to wait for, no
            # stack to build); a value changed in place after this update does not change what it recorded
            self._pending.append((step, names, [v if type(v) is float else v.numpy().item()
                                                for v in map(current.__getitem__, names)], None))
            return
        dev = next(v.device for v in current.values() if type(v) is not float)
        current = {k: torch.tensor(v, dtype=torch.float32) if type(v) is float else v for k, v in current.items()}
        if dev.type == "cuda":
            row = torch.stack([current[k].to(dev) for k in names])
            free = self._free.get(len(names))
            host = free.pop() if free else torch.empty(len(names), pin_memory=True)
            host.copy_(row, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:  # values on a device other than CUDA's: one stack there, brought over as it is
            host, event = torch.stack([current[k].to(dev) for k in names]).cpu().numpy().tolist(), None
        self._pending.append((step, names, host, event))

    @property
    def pending(self) -> int:
        """How many closed updates have not been returned by `ready` yet."""
        return len(self._pending)

    def ready(self, block: bool = False) -> List[Tuple[int, Dict[str, float]]]:
        """``[(step, {name: value})]`` of the closed updates whose copy has finished, oldest first (each
        returned once). ``block=True`` waits for every copy (a sync: for the end of a run)."""
        if block is not True and block is not False:
            block = checks.as_bool("block", block)
        out = []
        while self._pending:
            step, names, host, event = self._pending[0]
            if event is not None:
                if block:
                    event.synchronize()
                elif not event.query():  # the device has not reached this copy yet: read it at a later update
                    break
            self._pending.popleft()
            if event is not None:
                # the host copy is complete: reading it through NumPy is plain host memory, no device involved
                out.append((step, dict(zip(names, host.numpy().tolist()))))
                self._free.setdefault(len(names), []).append(host)
            else:  # read at end() already
                out.append((step, dict(zip(names, host))))
        return out
