"""The ReinMax estimator (Liu et al., 2023, arXiv 2304.08612) as a lean autograd Function."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._checks import check_generator, check_hard, check_logits, check_tau, one_hot, work_dtype
from .sampling import draw


class ReinMaxFunction(torch.autograd.Function):
    """Forward: ``(one_hot(sample ~ softmax(logits)), softmax(logits))``; backward: the ReinMax gradient.

    Saves ``log_softmax(logits)`` in the working precision (float32, or float64 for float64
    logits) and the sampled index (one int64 per slice): 4 bytes per element for float16, bfloat16
    and float32 logits, 8 for float64 (reinmax 0.1.0 saves the sample, the logits and the softmax:
    12 bytes per float32 element). Backward works in that precision from the saved log-probabilities:
    ``softmax(logits / tau) = softmax(log_softmax(logits) / tau)`` exactly, so the tempered softmax
    is finite and exact for every finite ``tau > 0`` (no ``0 / 0`` when ``tau`` is small, no lost
    category when a probability underflows), and small categories keep their gradient in half
    precision. Usable under ``torch.func`` (``setup_context`` and a generated vmap rule).

    ``ReinMaxFunction.apply(logits, tau, dim, generator)`` returns ``(y_hard, y_soft, log_probs,
    index)``: the last two (``log_softmax(logits)`` in the working precision and the sampled index
    with size 1 at ``dim``) are what backward needs, returned so that ``torch.func`` can save them.
    Use [`reinmax`][reinmax.reinmax], which checks its arguments and returns the first two.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor, tau: float, dim: int, generator: Optional[torch.Generator]):
        # argument checks (no data read): ``apply`` is public, and a bad ``tau`` would otherwise pass forward
        # silently and fail (or give a wrong gradient) only in backward
        check_tau(tau)
        check_logits(logits, dim)
        check_generator(generator, logits)
        log_pi0 = torch.log_softmax(logits, dim, dtype=work_dtype(logits.dtype))
        pi0 = log_pi0.exp()
        idx = draw(pi0, dim, generator)
        y_hard = one_hot(idx, logits, dim)
        return y_hard, pi0.to(logits.dtype), log_pi0, idx

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, tau, dim, _ = inputs
        _, _, log_pi0, idx = output
        ctx.save_for_backward(log_pi0, idx)
        ctx.tau, ctx.dim = tau, dim
        ctx.mark_non_differentiable(log_pi0, idx)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g: Optional[Tensor], h: Optional[Tensor], _g_log: Optional[Tensor], _g_idx: Optional[Tensor]):
        log_pi0, idx = ctx.saved_tensors
        if g is None and h is None:
            return None, None, None, None
        tau, dim = ctx.tau, ctx.dim
        out_dtype = g.dtype if g is not None else h.dtype
        work = log_pi0.dtype
        g = None if g is None else g.to(work)
        h = None if h is None else h.to(work)
        pi0 = log_pi0.exp()

        def dot(a: Tensor, b: Tensor) -> Tensor:
            return torch.linalg.vecdot(a, b, dim=dim).unsqueeze(dim)

        if g is None:  # only y_soft was used: plain softmax gradient
            return (pi0 * (h - dot(pi0, h))).to(out_dtype), None, None, None
        # softmax(logits / tau) from the log-probabilities: the shift by logsumexp cancels
        pi_tau = pi0 if tau == 1.0 else torch.softmax(log_pi0 * (1.0 / tau), dim)
        # 2 J(pi1) g - 0.5 J(pi0) g + J(pi0) h with pi1 = (pi_tau + D) / 2, expanded so that every
        # full-size pass does useful work (J(p) v = p * (v - p.v)):
        #   = g * (pi_tau - pi0 / 2) - pi_tau * s1 + pi0 * (h - s0) + D * (g_D - s1)
        #   s1 = (pi_tau.g + g_D) / 2,  s0 = pi0.h - pi0.g / 2
        g_at = g.gather(dim, idx)
        s1 = (dot(pi_tau, g) + g_at) * 0.5
        s0 = dot(pi0, g) * -0.5
        if h is not None:
            s0 = s0 + dot(pi0, h)
        # one fresh full-size tensor, updated in place (no temporaries); out of place under torch.func,
        # whose vmap has no rule for every in-place op
        inplace = torch._C._functorch.peek_interpreter_stack() is None
        grad = torch.add(pi_tau, pi0, alpha=-0.5)
        if inplace:
            grad.mul_(g).addcmul_(pi_tau, s1, value=-1.0)
            if h is not None:
                grad.addcmul_(pi0, h)
            grad.addcmul_(pi0, s0, value=-1.0).scatter_add_(dim, idx, g_at - s1)
        else:
            grad = (grad * g).addcmul(pi_tau, s1, value=-1.0)
            if h is not None:
                grad = grad.addcmul(pi0, h)
            grad = grad.addcmul(pi0, s0, value=-1.0).scatter_add(dim, idx, g_at - s1)
        return grad.to(out_dtype), None, None, None


def reinmax(logits: Tensor, tau: float, hard: bool = True, *, dim: int = -1,
            generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    r"""ReinMax: a one-hot sample with a second-order accurate gradient estimate.

    Returns ``(y_hard, y_soft)``: ``y_hard = one_hot(D)`` with ``D ~ Categorical(softmax(logits))``
    (no temperature in the forward pass) and ``y_soft = softmax(logits)``. In backward, with
    ``g = dL/dy_hard``, ``h = dL/dy_soft`` and ``J(p) = diag(p) - p p^T``:

        pi0 = softmax(logits),  pi1 = (softmax(logits / tau) + y_hard) / 2
        dL/dlogits = 2 J(pi1) g - 0.5 J(pi0) g + J(pi0) h

    A drop-in for the public ``reinmax`` 0.1.0 package: the same positional arguments
    ``(logits, tau, hard)`` (``hard`` is accepted and, as in 0.1.0, has no effect: ``y_hard`` is
    always one-hot), plus ``dim`` and ``generator``. The paper uses ``tau`` in [1, 1.5]; any finite
    ``tau > 0`` is accepted and gives a finite gradient.

    Precision: the softmax, the sample and the backward pass are computed in float32 (float64 for
    float64 logits); both outputs have the dtype of ``logits``, also under ``torch.autocast``.
    Memory saved for backward: 4 bytes per element (8 for float64) plus one int64 per slice.

    Data checks (NaN/+inf logits, a slice of all ``-inf``) run in eager mode and are skipped under
    ``torch.compile`` and ``torch.func``; `stability_toolbox.set_data_checks` switches them
    off (each is a host-device synchronization on CUDA).

    Args:
        logits: unnormalized log-probabilities, any shape, any floating dtype, may be non-contiguous.
            ``-inf`` marks a category that is never drawn (and gets zero gradient).
        tau: temperature of the backward pass, a finite number > 0.
        hard: reinmax 0.1.0's flag, True or False, without effect.
        dim: the category dimension.
        generator: optional ``torch.Generator`` for reproducible sampling.

    Returns:
        ``(y_hard, y_soft)``, both shaped and typed like ``logits``.

    Raises:
        TypeError: non-floating ``logits``, non-numeric ``tau``, non-bool ``hard``.
        ValueError: ``tau`` not finite or <= 0, empty or invalid ``dim``, NaN or +inf in ``logits``
            or a slice of all ``-inf``.

    Examples:
        >>> logits = torch.randn(4, 3, requires_grad=True)
        >>> y_hard, y_soft = reinmax(logits, 1.0)
        >>> (y_hard * torch.arange(3.0)).sum().backward()
    """
    tau = check_tau(tau)
    check_hard(hard)
    dim = check_logits(logits, dim)
    check_generator(generator, logits)
    y_hard, y_soft, _, _ = ReinMaxFunction.apply(logits, tau, dim, generator)
    return y_hard, y_soft
