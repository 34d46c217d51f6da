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

`sign_update` runs the update as torch.optim's ``adam()`` does, by one of its implementations:
`_single_tensor_sign` (a loop over parameters; half precision computed in float32 and stored once),
`_multi_tensor_sign` (``torch._foreach_*`` ops, in cache-sized chunks on the CPU) and, in
`sign_optim.fused`, the one-pass kernels (C on the CPU, Triton on CUDA), which take the same ``(a, b)``.
`_traced_sign` is the single-tensor form with tensor coefficients (``torch.compile``, ``capturable``).

Examples:
    >>> import torch
    >>> p, g, m = torch.ones(3), torch.tensor([1.0, -1.0, 2.0]), torch.zeros(3)
    >>> sign_update([p], [g], [m], [addsign_coefficients(1.0, 1.0)], lr=0.1, beta=0.9, weight_decay=0.0,
    ...             maximize=False, foreach=False)
    >>> p   # m = 0.1 g, so sign(g) sign(m) = 1: each element moves by lr (1 + 1) |g| against g's sign
    tensor([0.8000, 1.2000, 0.6000])
"""

import math
from typing import Iterator, List, Sequence, Tuple, Union

import torch

__all__ = ["Coefficients", "addsign_coefficients", "powersign_coefficients", "max_factor", "sign_update"]

#: ``(c0, a, b)`` of one parameter's update (module docstring)
Coefficients = Tuple[float, float, float]

_HALF = (torch.float16, torch.bfloat16)


def addsign_coefficients(alpha: float, decay: float) -> Coefficients:
    """AddSign's ``(c0, a, b)``: ``(alpha + d s) g`` = ``alpha g + d sign(m) |g|``."""
    return float(alpha), float(decay), 0.0


def powersign_coefficients(alpha: float, decay: float) -> Coefficients:
    """PowerSign's ``(c0, a, b) = (1, sinh(c), cosh(c) - 1)`` with ``c = decay * ln(alpha)``.

    OverflowError for ``|c|`` beyond float64's exponential range (the optimizer refuses such a step first)."""
    c = math.log(alpha) * decay
    return 1.0, math.sinh(c), math.expm1(c) - math.sinh(c)  # expm1(c) - sinh(c) = cosh(c) - 1, accurate near 0


def max_factor(coefficients: Coefficients) -> float:
    """The largest ``|factor|`` an update multiplies a gradient element by: ``|c0| + |a| + |b|`` (for
    PowerSign ``1 + sinh|c| + cosh(c) - 1 = exp|c|`` with ``c = d ln(alpha)``: ``alpha ** |d|`` for
    ``alpha >= 1``, ``(1 / alpha) ** |d|`` below)."""
    return sum(abs(x) for x in coefficients)


def sign_update(params: List[torch.Tensor], grads: List[torch.Tensor], avgs: List[torch.Tensor],
                coefficients: Sequence[Coefficients], *, lr: float, beta: float, weight_decay: float, maximize: bool,
                foreach: bool, chunk_numel: int = 1 << 16) -> None:
    """One step of the sign rule over ``params`` (in place), their gradients and moving averages ``avgs``
    (float32 for half-precision parameters), ``coefficients[i]`` for parameter ``i``. ``foreach`` picks
    `_multi_tensor_sign` (float32/float64 parameters of one device) over `_single_tensor_sign`.
    The step counters are the caller's."""
    if not params:  # the foreach ops refuse empty lists; nothing to update is a no-op on every path
        return
    if foreach:
        _multi_tensor_sign(params, grads, avgs, coefficients, lr=lr, beta=beta, weight_decay=weight_decay,
                           maximize=maximize, chunk_numel=chunk_numel)
    else:
        for p, g, m, coefs in zip(params, grads, avgs, coefficients):
            _single_tensor_sign(p, g, m, coefs, lr=lr, beta=beta, weight_decay=weight_decay, maximize=maximize)


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
    """`_single_tensor_sign` with tensor coefficients (``b`` None where the rule has none) and a tensor or
    number ``lr``, as one expression: no Python number derived from a tensor, so ``torch.compile`` does not
    recompile per step, and inductor fuses it."""
    work, g = _moving_average_and_decay(p, g, m, lr=lr, beta=beta, weight_decay=weight_decay, maximize=maximize)
    c0, a, b = coefs
    sign_m = m.sign()
    direction = (g if isinstance(c0, (int, float)) and c0 == 1 else g * c0) + sign_m * g.abs() * a
    if b is not None:
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
