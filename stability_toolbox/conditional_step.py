"""An optimizer step applied or not by a flag on the device: `conditional_step`.

When ``skip`` is true the parameters and the whole optimizer state (moments, step counters) end as they
were before the call, as if the batch had never come; when it is false the step is the optimizer's own,
bit for bit. A flag on the CPU is read there (``'host'``: reading it is no device synchronization, and a
skipped step costs nothing). Otherwise the decision is never read on the host on the two device paths:

* ``found_inf``: optimizers that take torch's gradient-scaler protocol on the device - torch's
  ``Adam``/``AdamW``/``SGD``/``Adagrad`` with ``fused=True`` (the fused kernel applies nothing and the step
  counters are decremented back), and the sign optimizers of `sign_optim` (every path: they honour
  ``optimizer.found_inf`` before touching anything). A ``found_inf`` a ``GradScaler`` set already is combined
  with the flag (the larger wins).
* ``restore``: any other optimizer. The parameters and every tensor of their state are copied before the
  step and selected back with ``torch.where(skip, before, after)`` after it (NaN-safe: a poisoned update is
  discarded, not multiplied by 0). Its cost is one copy of the parameters and the state per step. State
  tensors on another device than the flag (torch's CPU step counters of a CUDA run with ``capturable=False``)
  and a parameter's first step (its state is created by the step) need the flag on the host: one read then.

Examples:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(3))
    >>> opt = torch.optim.AdamW([p], lr=0.1)
    >>> p.grad = torch.ones(3)
    >>> conditional_step(opt, torch.tensor(False), on_host=False)   # the device path, shown on the CPU
    'restore'
    >>> before = p.detach().clone(); state = opt.state[p]["exp_avg"].clone()
    >>> p.grad = torch.full((3,), float("nan"))
    >>> conditional_step(opt, torch.tensor(True), on_host=False)
    'restore'
    >>> torch.equal(p, before), torch.equal(opt.state[p]["exp_avg"], state), float(opt.state[p]["step"])
    (True, True, 1.0)
"""

from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["conditional_step", "skip_path", "FOUND_INF_OPTIMIZERS"]

#: torch optimizers whose ``fused=True`` implementation honours ``optimizer.found_inf`` on the device
FOUND_INF_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


_SIGN_OPTIMIZER = []  # the class, imported once (an import statement per step costs more than the check)


def _is_sign_optimizer(optimizer) -> bool:
    if not _SIGN_OPTIMIZER:
        from sign_optim.sign_optimizer import SignOptimizer  # a floor down: sign_optim does not import this package

        _SIGN_OPTIMIZER.append(SignOptimizer)
    return isinstance(optimizer, _SIGN_OPTIMIZER[0])


def skip_path(optimizer: torch.optim.Optimizer) -> str:
    """``'found_inf'`` or ``'restore'``: how `conditional_step` skips a step of ``optimizer`` (module docstring)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if _is_sign_optimizer(optimizer):
        return "found_inf"
    if type(optimizer) in FOUND_INF_OPTIMIZERS and all(g.get("fused") for g in optimizer.param_groups):
        return "found_inf"
    return "restore"


def _stepped_tensors(optimizer) -> List[Tensor]:
    """The parameters with a gradient and every tensor of their state, in a fixed order."""
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            out.append(p)
            state = optimizer.state.get(p)
            if state:
                out += [v for _, v in sorted(state.items(), key=lambda kv: str(kv[0])) if isinstance(v, Tensor)]
    return out


def conditional_step(optimizer: torch.optim.Optimizer, skip: Tensor, step: Optional[Callable] = None,
                     on_host: Optional[bool] = None) -> str:
    """Run ``optimizer.step()`` (or ``step()``, e.g. the original of a wrapped step) unless the 1-element bool
    tensor ``skip`` is true; returns the path taken: ``'host'``, or `skip_path`'s. ``on_host``: read the flag
    on the host (default: when it is on the CPU); False takes the device path wherever the flag is."""
    if not isinstance(skip, Tensor) or skip.numel() != 1 or skip.dtype != torch.bool:
        raise TypeError(f"skip must be a 1-element bool tensor, got {type(skip).__name__} "
                        f"{getattr(skip, 'dtype', '')}")
    if on_host is not None and not isinstance(on_host, bool):
        raise TypeError(f"on_host must be None or a bool, got {type(on_host).__name__}")
    path = skip_path(optimizer)
    run = step if step is not None else optimizer.step
    if on_host if on_host is not None else skip.device.type == "cpu":
        if not bool(skip):
            run()
        return "host"
    if path == "found_inf":
        flag = skip.reshape(()).to(torch.float32)  # 0-d: torch's fused step subtracts it from 0-d counters
        had = "found_inf" in optimizer.__dict__
        previous = optimizer.__dict__.get("found_inf")
        if previous is not None:  # a GradScaler's flag: skip when either says so
            flag = torch.maximum(previous.to(flag.device, torch.float32), flag).reshape(previous.shape)
        optimizer.found_inf = flag
        try:
            run()
        finally:
            if had:
                optimizer.found_inf = previous
            else:
                del optimizer.found_inf
        return path
    # restore: copy before, select after
    fresh = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None and not optimizer.state.get(p)]
    before = _stepped_tensors(optimizer)
    saved = [t.detach().clone() for t in before]
    run()
    flags: Dict[torch.device, Tensor] = {}
    for t, s in zip(before, saved):
        f = flags.get(t.device)
        if f is None:
            f = flags[t.device] = skip.reshape(()).to(t.device)
        with torch.no_grad():
            t.copy_(torch.where(f, s, t))
    if fresh and bool(skip):  # a first step created the state: forget it (one host read, on first steps only)
        for p in fresh:
            optimizer.state.pop(p, None)
    return path
