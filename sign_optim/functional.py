r"""The sign update as functions over one coefficient form, in torch.optim's functional style.

After the moving average ``m <- beta m + (1 - beta) g`` (``g`` negated when maximizing) and the decoupled
weight decay ``p <- (1 - lr wd) p``, both rules (Bello et al., 2017) are

$$
p \leftarrow p - \mathrm{lr}\,(c_0\,g + a\,\mathrm{sign}(m)\,|g| + b\,|\mathrm{sign}(m)|\,g)
$$

with per-parameter coefficients ``(c0, a, b)`` from the rule's hyper-parameters and the internal decay
``d`` (`addsign_coefficients`, `powersign_coefficients`): AddSign ``(alpha, d, 0)``;
PowerSign ``(1, sinh(c), cosh(c) - 1)`` with ``c = d ln(alpha)``, because
``alpha ** (d s) = 1 + sinh(c) s + (cosh(c) - 1) s**2`` for ``s = sign(g) sign(m)`` in {-1, 0, 1}: the same
value as the exponential, without an exponential per element, and exact where ``m == 0``.

The coefficient functions take a number or a tensor decay through one formula. `sign_update` is the one
dispatcher, as torch.optim's ``adam()`` (`route` says which): `_single_tensor_sign` (a loop over parameters; half
precision computed in float32 and stored once), `_multi_tensor_sign` (``torch._foreach_*`` ops, in cache-sized
chunks on the CPU), `_fused_sign` (the one-pass operator of `sign_optim.fused`: C on the CPU, Triton on CUDA, with
``lr`` and the weight decay folded into its table), `_compiled_fused_sign` (that operator as one node of a
``torch.compile`` graph) and `_traced_sign` (the single-tensor form with tensor coefficients: ``capturable``,
``torch.compile``). The optimizer classes keep the state, the checks and ``state_dict``.

Examples:
    >>> import torch
    >>> p, g, m = torch.ones(3), torch.tensor([1.0, -1.0, 2.0]), torch.zeros(3)
    >>> sign_update([p], [g], [m], [addsign_coefficients(1.0, 1.0)], lr=0.1, beta=0.9, weight_decay=0.0,
    ...             maximize=False, foreach=False)
    >>> p   # m = 0.1 g, so sign(g) sign(m) = 1: each element moves by lr (1 + 1) |g| against g's sign
    tensor([0.8000, 1.2000, 0.6000])
"""

import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.optim.optimizer import _default_to_fused_or_foreach

from toolbox_core import validation

from . import fused as _fused

__all__ = ["Coefficients", "CoefficientOverflow", "ROUTES", "addsign_coefficients", "powersign_coefficients",
           "max_factor", "route", "sign_update"]

#: ``(c0, a, b)`` of one parameter's update (module docstring)
Coefficients = Tuple[float, float, float]

_HALF = (torch.float16, torch.bfloat16)


class CoefficientOverflow(OverflowError, ValueError):
    """A rule's coefficient beyond float64's range: an OverflowError (what `max_factor`'s callers catch) that is also
    the ValueError of a bad argument."""


def _decay_number(decay):
    """A tensor decay (the traced routes) as it is (its value is never read); a number checked, as a float."""
    return decay if isinstance(decay, torch.Tensor) else validation.as_real("decay", decay)


def addsign_coefficients(alpha: float, decay):
    """AddSign's ``(c0, a, b)``: ``(alpha + d s) g`` = ``alpha g + d sign(m) |g|``. ``decay`` a number or a tensor
    (the traced routes: ``a`` is then that tensor). TypeError/ValueError naming ``alpha`` or ``decay`` for a value
    that is not a finite real number."""
    return _addsign_coefficients(validation.as_real("alpha", alpha), _decay_number(decay))


def _addsign_coefficients(alpha: float, decay):
    """`addsign_coefficients` without its argument checks: what the optimizer computes each step (its ``alpha`` was
    checked when its group was set, each decay value by the optimizer as it reads it)."""
    return float(alpha), (decay if isinstance(decay, torch.Tensor) else float(decay)), 0.0


def powersign_coefficients(alpha: float, decay):
    """PowerSign's ``(c0, a, b) = (1, sinh(c), cosh(c) - 1)`` with ``c = decay * ln(alpha)``, one formula for a
    number ``decay`` (`math`) and a tensor one (torch's ops, the traced routes).

    `CoefficientOverflow` (an OverflowError and a ValueError) for a number ``|c|`` beyond float64's exponential
    range (the optimizer refuses such a step first); TypeError/ValueError naming ``alpha`` (a finite real > 0) or
    ``decay`` (a finite real, or a tensor) otherwise."""
    return _powersign_coefficients(validation.as_real("alpha", alpha, low=0.0, low_open=True), _decay_number(decay))


def _powersign_coefficients(alpha: float, decay):
    """`powersign_coefficients` without its argument checks (as `_addsign_coefficients`); its overflow is kept."""
    c = decay * math.log(alpha)
    ops = torch if isinstance(c, torch.Tensor) else math
    if ops is math and not math.isfinite(c):  # (sinh(inf) is inf, not an OverflowError)
        raise CoefficientOverflow(f"decay * ln(alpha) = {c} overflows PowerSign's factor alpha ** decay in float64")
    try:
        return 1.0, ops.sinh(c), ops.expm1(c) - ops.sinh(c)  # expm1(c) - sinh(c) = cosh(c) - 1, accurate near 0
    except OverflowError:
        raise CoefficientOverflow(f"decay * ln(alpha) = {c:.6g} overflows PowerSign's factor alpha ** decay in "
                                  "float64: choose alpha closer to 1 or a smaller decay") from None


def max_factor(coefficients: Coefficients) -> float:
    """The largest ``|factor|`` an update multiplies a gradient element by: ``|c0| + |a| + |b|`` (for
    PowerSign ``1 + sinh|c| + cosh(c) - 1 = exp|c|`` with ``c = d ln(alpha)``: ``alpha ** |d|`` for
    ``alpha >= 1``, ``(1 / alpha) ** |d|`` below)."""
    return sum(abs(x) for x in coefficients)


#: the routes of `sign_update` (`route`), torch's ``adam()`` implementations plus the traced forms
ROUTES = ("fused", "compiled_fused", "traced", "foreach", "single_tensor")


def route(params: List[torch.Tensor], *, foreach: Optional[bool] = None, fused: Optional[bool] = None,
          capturable: bool = False) -> str:
    """The implementation `sign_update` runs for ``params`` (one of `ROUTES`), as torch's ``adam()`` picks one.

    ``fused=True``, or both flags None and a fused kernel for every device (`sign_optim.fused`): ``"fused"``.
    Under ``torch.compile`` every tensor stays a tensor: ``"compiled_fused"`` (the operator as one graph node) for
    fused CPU parameters, else ``"traced"``; ``capturable`` also takes ``"traced"`` (no host read) unless every
    parameter is on the CPU and fused (reading the CPU counters there is no device sync). Otherwise ``foreach``
    (None: torch's default for these parameters) picks ``"foreach"`` over ``"single_tensor"``; half-precision
    parameters always take the single-tensor loop (computed in float32, stored once).
    """
    _check_flags(foreach, fused, capturable)
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list of tensors, got {type(params).__name__}")
    try:
        return _route(params, foreach, fused, capturable)
    except AttributeError:  # an element without .device/.dtype: checked only on this failure (no per-tensor cost)
        bad = next((p for p in params if not isinstance(p, torch.Tensor)), None)
        if bad is None:
            raise
        raise TypeError(f"params must be a list of tensors, got an element of type {type(bad).__name__}") from None


def _check_flags(foreach, fused, capturable) -> None:
    """TypeError naming the route flag that is not a bool (``foreach`` and ``fused`` may also be None)."""
    for name, flag in (("foreach", foreach), ("fused", fused)):
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"{name} must be None or a bool, got {type(flag).__name__}")
    if not isinstance(capturable, bool):
        raise TypeError(f"capturable must be a bool, got {type(capturable).__name__}")


def _route(params, foreach, fused, capturable) -> str:
    if fused is not None or foreach is not None:
        use_fused = bool(fused)
    else:
        use_fused = all(_fused.available(d) for d in {p.device for p in params})
    compiling = torch.compiler.is_compiling()
    if compiling or capturable:  # (only these ask where the parameters are: a per-tensor cost on the hot path)
        on_cpu = use_fused and all(p.is_cpu for p in params)
        if compiling:
            return "compiled_fused" if on_cpu else "traced"
        if not on_cpu:
            return "traced"
    if use_fused:
        return "fused"
    if foreach is None:
        full = [p for p in params if p.dtype not in _HALF]
        foreach = bool(full) and _default_to_fused_or_foreach(full, differentiable=False)[1]
    return "foreach" if foreach else "single_tensor"


def sign_update(params: List[torch.Tensor], grads: List[torch.Tensor], avgs: List[torch.Tensor],
                coefficients: Union[Sequence[Coefficients], torch.Tensor],
                state_steps: Optional[List[torch.Tensor]] = None, *, lr, beta: float, weight_decay: float,
                maximize: bool, foreach: Optional[bool] = None, fused: Optional[bool] = None,
                capturable: bool = False, found_inf: Optional[torch.Tensor] = None,
                chunk_numel: int = 1 << 16) -> None:
    """One step of the sign rule over ``params`` (in place), their gradients and moving averages ``avgs``
    (float32 for half-precision parameters), ``coefficients[i]`` for parameter ``i``: the one dispatcher of every
    implementation (`route`), as torch's ``adam()``.

    Args:
        coefficients: one ``(c0, a, b)`` per parameter (`addsign_coefficients`, `powersign_coefficients`):
            numbers, or 0-d tensors on the traced routes; or, for the fused route only, the operator's table
            (`sign_optim.fused.kernel_coefficients`, ``lr`` and ``weight_decay`` folded in).
        state_steps: the step counters, each advanced by 1 (None: the caller's).
        lr, beta, weight_decay, maximize: the rule's hyper-parameters (``lr`` a tensor on the traced routes).
        foreach, fused, capturable: the route's flags (`route`); a parameter the fused kernels do not take (a
            layout, a device) falls back to the other implementations.
        found_inf: torch's gradient-scaler flag (1-element tensor): where non-zero, the step changes nothing
            (parameters, averages, counters), never read in Python. The fused operator takes it (its kernel
            skips); the other routes run and put every written tensor back by ``torch.where`` on the flag's
            device (one copy of the parameters and averages: the price of no host read there).
        chunk_numel: elements per piece of the CPU foreach route (`_cache_sized_chunks`; an int, <= 0: no chunking).
    """
    _check_update_arguments(params, grads, avgs, coefficients, state_steps, lr=lr, beta=beta,
                            weight_decay=weight_decay, maximize=maximize, foreach=foreach, fused=fused,
                            capturable=capturable, found_inf=found_inf, chunk_numel=chunk_numel)
    _sign_update(params, grads, avgs, coefficients, state_steps, lr=lr, beta=beta, weight_decay=weight_decay,
                 maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, found_inf=found_inf,
                 chunk_numel=chunk_numel)


def _sign_update(params, grads, avgs, coefficients, state_steps=None, *, lr, beta, weight_decay, maximize,
                 foreach=None, fused=None, capturable=False, found_inf=None, chunk_numel=1 << 16) -> None:
    """`sign_update` after its argument checks: what the optimizer calls each step (its groups were checked when
    they were set, so a step pays no per-call checks)."""
    if not params:  # the foreach ops refuse empty lists; nothing to update is a no-op on every path
        return
    # a table fits the fused operator only (the caller chose and checked it: no second look at every parameter)
    path = "fused" if isinstance(coefficients, torch.Tensor) else _route(params, foreach, fused, capturable)
    if state_steps is None and path in ("fused", "compiled_fused"):  # the operator advances counters: scratch ones
        state_steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    options = dict(lr=lr, beta=beta, weight_decay=weight_decay, maximize=maximize)
    if found_inf is not None and not (path in ("fused", "compiled_fused")
                                      and found_inf.device.type == params[0].device.type):
        # the routes without a flag in their kernel: the step, then put back where found_inf is set
        _unless_found_inf(found_inf, [*params, *avgs, *(state_steps or [])], lambda: _sign_update(
            params, grads, avgs, coefficients, state_steps, foreach=foreach, fused=fused, capturable=capturable,
            chunk_numel=chunk_numel, **options))
        return
    if path == "compiled_fused":
        _compiled_fused_sign(params, grads, avgs, coefficients, state_steps, found_inf=found_inf, **options)
        return
    if path == "traced":
        if state_steps is not None:
            torch._foreach_add_(state_steps, 1.0)
        for p, g, m, coefs in zip(params, grads, avgs, coefficients):
            _traced_sign(p, g, m, coefs, **options)
        return
    rest = list(range(len(params)))
    if path == "fused":
        rest = _fused_sign(params, grads, avgs, coefficients, state_steps, found_inf=found_inf, **options)
        if not rest:
            return
        if found_inf is not None:  # a layout the operator does not take: the other routes, put back if skipped
            sign_update(*([t[i] for i in rest] for t in (params, grads, avgs, coefficients, state_steps)),
                        foreach=foreach, fused=False, found_inf=found_inf, chunk_numel=chunk_numel, **options)
            return
        path = route([params[i] for i in rest], foreach=foreach, fused=False)
    if len(rest) < len(params):  # the fused route's leftovers
        params, grads, avgs, coefficients = ([t[i] for i in rest] for t in (params, grads, avgs, coefficients))
        state_steps = None if state_steps is None else [state_steps[i] for i in rest]
    if state_steps is not None:
        torch._foreach_add_(state_steps, 1.0)  # one call, not one per parameter
    loop = zip(params, grads, avgs, coefficients)
    if path == "foreach":
        half = [i for i, p in enumerate(params) if p.dtype in _HALF]  # one by one, in float32
        full = [i for i in range(len(params)) if params[i].dtype not in _HALF] if half else None
        if full is None:
            _multi_tensor_sign(params, grads, avgs, coefficients, chunk_numel=chunk_numel, **options)
        elif full:
            _multi_tensor_sign(*([t[i] for i in full] for t in (params, grads, avgs, coefficients)),
                               chunk_numel=chunk_numel, **options)
        loop = ((params[i], grads[i], avgs[i], coefficients[i]) for i in half)
    for p, g, m, coefs in loop:  # (keywords spelled out: a dict unpacked per parameter costs on many small ones)
        _single_tensor_sign(p, g, m, coefs, lr=lr, beta=beta, weight_decay=weight_decay, maximize=maximize)


def _check_update_arguments(params, grads, avgs, coefficients, state_steps, *, lr, beta, weight_decay, maximize,
                            foreach, fused, capturable, found_inf, chunk_numel) -> None:
    """`sign_update`'s argument checks, before any tensor changes: TypeError/ValueError naming the argument. They
    read no tensor data (a tensor ``lr``/``beta``/``weight_decay`` of the traced routes is checked for its size
    only), so they cost nothing on a GPU; O(1) per call (the tensors themselves are checked by the routes' ops)."""
    lists = {"params": params, "grads": grads, "avgs": avgs}
    if state_steps is not None:
        lists["state_steps"] = state_steps
    if not isinstance(coefficients, torch.Tensor):
        lists["coefficients"] = coefficients
    for name, values in lists.items():
        if not isinstance(values, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors (one per parameter), got {type(values).__name__}")
        if len(values) != len(params):
            raise ValueError(f"{name} must have one entry per parameter ({len(params)}), got {len(values)}")
    if torch.compiler.is_compiling():  # the optimizer checked its groups eagerly; numbers may be symbolic here
        return
    for name, value, bounds in (("lr", lr, dict(low=0.0)), ("beta", beta, dict(low=0.0, high=1.0, high_open=True)),
                                ("weight_decay", weight_decay, dict(low=0.0))):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool or value.is_meta:
                raise TypeError(f"{name} must be a real number or a 1-element real tensor with data, got a tensor of "
                                f"shape {tuple(value.shape)} and dtype {value.dtype} on {value.device}")
        else:
            validation.as_real(name, value, **bounds)
    if not isinstance(maximize, bool):
        raise TypeError(f"maximize must be a bool, got {type(maximize).__name__}")
    _check_flags(foreach, fused, capturable)
    if found_inf is not None and not (isinstance(found_inf, torch.Tensor) and found_inf.numel() == 1
                                      and not found_inf.is_meta):
        raise TypeError("found_inf must be None or a 1-element tensor with data (torch's GradScaler protocol), got "
                        + (f"a tensor of shape {tuple(found_inf.shape)} on {found_inf.device}"
                           if isinstance(found_inf, torch.Tensor) else type(found_inf).__name__))
    validation.as_int("chunk_numel", chunk_numel)  # (<= 0: one piece, no chunking)


def _unless_found_inf(found_inf: torch.Tensor, written: List[torch.Tensor], run) -> None:
    """``run()``, then every tensor of ``written`` put back where ``found_inf`` is non-zero, by
    ``torch.where(skip, before, after)`` (NaN-safe: a poisoned update is discarded, not multiplied by 0): the
    decision stays a tensor, so no host read of the flag (torch's fused kernels skip on the device too)."""
    skip = found_inf.reshape(()) != 0
    before = [t.clone() for t in written]
    run()
    for t, b in zip(written, before):
        t.copy_(torch.where(skip.to(t.device), b, t))


def _fused_sign(params, grads, avgs, coefficients, state_steps, *, lr, beta, weight_decay, maximize,
                found_inf=None) -> List[int]:
    """The fused operator (`sign_optim.fused`), one call per device; the indices left to the other routes (a
    layout or device it does not take, e.g. a non-contiguous view). Given the operator's table, every parameter
    goes to the operator (the caller checked them), DTensors by their local shards."""
    if isinstance(coefficients, torch.Tensor):
        _fused.fused_sign_(params, grads, avgs, state_steps, coefficients, beta=float(beta), maximize=maximize,
                           found_inf=found_inf)
        return []
    local = [(_fused.local_shard(p), _fused.local_shard(g), _fused.local_shard(m))
             for p, g, m in zip(params, grads, avgs)]
    by_device: Dict[torch.device, List[int]] = {}
    rest = []
    for i, ((p, g, m), s) in enumerate(zip(local, state_steps)):
        if _fused.supported(p, g, m, s) and _fused.available(p.device) and (
                found_inf is None or found_inf.device == p.device):
            by_device.setdefault(p.device, []).append(i)
        else:
            rest.append(i)
    for idx in by_device.values():
        table = _fused.kernel_coefficients([coefficients[i] for i in idx], lr=lr, weight_decay=float(weight_decay))
        _fused.fused_sign_([local[i][0] for i in idx], [local[i][1] for i in idx], [local[i][2] for i in idx],
                           [state_steps[i] for i in idx], table, beta=float(beta), maximize=maximize,
                           found_inf=found_inf)
    return rest


def _compiled_fused_sign(params, grads, avgs, coefficients, state_steps, *, lr, beta, weight_decay, maximize,
                         found_inf=None) -> None:
    """The fused operator under ``torch.compile``: the table is built from tensor coefficients (no Python number
    derived from the counters, so no recompilation per step) and the operator is one node of the graph (its
    fake implementation: `sign_optim.fused`)."""
    rows = [torch.stack([torch.as_tensor(x, dtype=torch.float64).reshape(()) for x in
                         (1.0 - lr * weight_decay, -lr * c0, -lr * a, -lr * (0.0 if b is None else b))])
            for c0, a, b in coefficients]
    torch.ops.sign_optim.fused_sign_(params, grads, avgs, state_steps, torch.stack(rows), float(beta), maximize,
                                     found_inf)


def _moving_average_and_decay(p, g, m, *, lr, beta, weight_decay, maximize):
    """The shared first half of every implementation; returns the float32 work copy of a half-precision ``p``
    (or ``p`` itself) and the gradient in the average's dtype."""
    work = p.float() if p.dtype in _HALF else p
    g = g.to(m.dtype)
    if maximize:
        g = -g
    m.lerp_(g, 1.0 - beta)
    if weight_decay != 0:
        work.mul_(1.0 - lr * weight_decay)
    return work, g


def _single_tensor_sign(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, coefs: Coefficients, *, lr: float,
                        beta: float, weight_decay: float, maximize: bool) -> None:
    work, g = _moving_average_and_decay(p, g, m, lr=lr, beta=beta, weight_decay=weight_decay, maximize=maximize)
    c0, a, b = coefs
    work.add_(g, alpha=-lr * c0)
    if a != 0 or b != 0:
        sign_m = m.sign()
        if a != 0:
            work.addcmul_(sign_m, g.abs(), value=-lr * a)
        if b != 0:
            work.addcmul_(sign_m.abs_(), g, value=-lr * b)
    if work is not p:
        p.copy_(work)


def _traced_sign(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, coefs, *, lr, beta: float, weight_decay: float,
                 maximize: bool) -> None:
    """`_single_tensor_sign` with tensor coefficients (``b`` None or 0 where the rule has none) and a tensor or
    number ``lr``, as one expression: no Python number derived from a tensor, so ``torch.compile`` does not
    recompile per step, and inductor fuses it."""
    work, g = _moving_average_and_decay(p, g, m, lr=lr, beta=beta, weight_decay=weight_decay, maximize=maximize)
    c0, a, b = coefs
    sign_m = m.sign()
    direction = (g if isinstance(c0, (int, float)) and c0 == 1 else g * c0) + sign_m * g.abs() * a
    if b is not None and not (isinstance(b, (int, float)) and b == 0):
        direction = direction + sign_m.abs() * g * b
    work.add_(direction * (-lr))
    if work is not p:
        p.copy_(work)


def _multi_tensor_sign(params, grads, avgs, coefficients, *, lr, beta, weight_decay, maximize, chunk_numel) -> None:
    for c_params, c_grads, c_avgs, c_coefs in _cache_sized_chunks(params, grads, avgs, coefficients, chunk_numel):
        if maximize:
            c_grads = torch._foreach_neg(c_grads)
        torch._foreach_lerp_(c_avgs, c_grads, 1.0 - beta)
        if weight_decay != 0:
            torch._foreach_mul_(c_params, 1.0 - lr * weight_decay)
        c0s = {c[0] for c in c_coefs}
        if len(c0s) == 1:
            torch._foreach_add_(c_params, c_grads, alpha=-lr * c0s.pop())
        else:
            torch._foreach_add_(c_params, torch._foreach_mul(c_grads, [-lr * c[0] for c in c_coefs]))
        scale_a, scale_b = _scales([-lr * c[1] for c in c_coefs]), _scales([-lr * c[2] for c in c_coefs])
        if scale_a == 0 and scale_b == 0:
            continue
        signs = torch._foreach_sign(c_avgs)
        if scale_a != 0:
            _foreach_addcmul_(c_params, signs, torch._foreach_abs(c_grads), scale_a)
        if scale_b != 0:
            torch._foreach_abs_(signs)
            _foreach_addcmul_(c_params, signs, c_grads, scale_b)


def _scales(values: List[float]) -> Union[float, List[float]]:
    """One scalar when every tensor takes the same (the faster foreach overload), else the list."""
    return values[0] if len(set(values)) == 1 else values


def _foreach_addcmul_(out: List[torch.Tensor], t1: List[torch.Tensor], t2: List[torch.Tensor],
                      scale: Union[float, List[float]]) -> None:
    """``out[i] += scale(_i) * t1[i] * t2[i]`` for one scale or one scale per tensor."""
    if isinstance(scale, list):
        torch._foreach_addcmul_(out, t1, t2, scale)
    else:
        torch._foreach_addcmul_(out, t1, t2, value=scale)


def _cache_sized_chunks(params, grads, avgs, coefficients, chunk_numel: int) -> Iterator[Tuple[list, list, list, list]]:
    """Split the foreach work on CPU into pieces of about ``chunk_numel`` elements.

    On CPU a foreach op is a loop over the tensors, so each op of the rule streams every tensor
    through memory, and out-of-place temporaries of full size are fresh (page-faulting) allocations.
    Running the whole rule on one cache-sized piece after another keeps the data in cache and lets
    the allocator reuse the temporaries. Large contiguous tensors are cut into flat views at
    multiples of 64 elements (the vectorized kernels then see the same element boundaries as on the
    whole tensor, so the result is the same as the single-tensor path). Other devices: one chunk.
    """
    if not params or params[0].device.type != "cpu" or chunk_numel <= 0:
        yield params, grads, avgs, list(coefficients)
        return
    chunk_numel = max(64, chunk_numel // 64 * 64)
    cur: Tuple[list, list, list, list] = ([], [], [], [])
    size = 0
    for p, g, m, c in zip(params, grads, avgs, coefficients):
        n = p.numel()
        if n > chunk_numel and p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and g.shape == p.shape:
            for pieces in zip(*(t.view(-1).split(chunk_numel) for t in (p, g, m))):
                yield [pieces[0]], [pieces[1]], [pieces[2]], [c]
            continue
        for lst, item in zip(cur, (p, g, m, c)):
            lst.append(item)
        size += n
        if size >= chunk_numel:
            yield cur
            cur, size = ([], [], [], []), 0
    if cur[0]:
        yield cur
