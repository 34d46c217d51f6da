"""The ReinMax estimator (Liu et al., 2023, arXiv 2304.08612) as a lean autograd Function."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._checks import check_generator, check_logits, check_tau
from .sampling import sample_categorical

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class ReinMaxFunction(torch.autograd.Function):
    """Forward: ``(one_hot(sample ~ softmax(logits)), softmax(logits))``; backward: the ReinMax gradient.

    Saves only ``softmax(logits)`` (an output, so no extra memory when the caller keeps it) and the
    sampled index (one int64 per slice). The tempered softmax is recomputed in backward from
    ``softmax(logits)`` as ``pi0 ** (1 / tau)`` renormalized, which equals ``softmax(logits / tau)``
    up to rounding wherever ``pi0`` does not underflow to 0 (a category whose probability
    underflows gets the gradient 0 from that term; in float32 that needs a logit gap above ~87).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, tau: float, dim: int, generator: Optional[torch.Generator]):
        pi0 = torch.softmax(logits, dim)
        idx = sample_categorical(pi0, dim, generator)
        one_hot = torch.zeros_like(pi0).scatter_(dim, idx, 1.0)
        ctx.save_for_backward(pi0, idx)
        ctx.tau, ctx.dim = tau, dim
        ctx.set_materialize_grads(False)
        return one_hot, pi0

    @staticmethod
    def backward(ctx, g: Optional[Tensor], h: Optional[Tensor]):
        pi0, idx = ctx.saved_tensors
        if g is None and h is None:
            return None, None, None, None
        tau, dim = ctx.tau, ctx.dim
        out_dtype = pi0.dtype
        if out_dtype in _LOW_PRECISION:  # accumulate in float32, hand back the logits' dtype
            pi0 = pi0.float()
            g = None if g is None else g.float()
            h = None if h is None else h.float()
        # 2 J(pi1) g - 0.5 J(pi0) g + J(pi0) h with pi1 = (pi_tau + D) / 2, expanded so that every
        # full-size pass does useful work (J(p) v = p * (v - p.v)):
        #   = g * (pi_tau - pi0 / 2) - pi_tau * s1 + pi0 * (h - s0) + D * (g_D - s1)
        #   s1 = (pi_tau.g + g_D) / 2,  s0 = pi0.h - pi0.g / 2
        if g is None:  # only y_soft was used: plain softmax gradient
            return pi0 * (h - torch.linalg.vecdot(pi0, h, dim=dim).unsqueeze(dim)), None, None, None
        if tau == 1.0:
            pi_tau = pi0
        else:  # softmax(logits / tau) = pi0 ** (1 / tau), renormalized (exact where pi0 did not underflow)
            pi_tau = torch.log(pi0).mul_(1.0 / tau).exp_()  # log+exp: much faster than pow on CPU
            pi_tau = pi_tau.div_(pi_tau.sum(dim, keepdim=True))
        g_at = g.gather(dim, idx)
        s1 = (torch.linalg.vecdot(pi_tau, g, dim=dim).unsqueeze(dim) + g_at).mul_(0.5)
        s0 = torch.linalg.vecdot(pi0, g, dim=dim).unsqueeze(dim).mul_(-0.5)
        if h is not None:
            s0 = s0.add_(torch.linalg.vecdot(pi0, h, dim=dim).unsqueeze(dim))
        grad = torch.add(pi_tau, pi0, alpha=-0.5).mul_(g)
        grad = grad.addcmul_(pi_tau, s1, value=-1.0)
        if h is not None:
            grad = grad.addcmul_(pi0, h - s0)
        else:
            grad = grad.addcmul_(pi0, s0, value=-1.0)
        grad = grad.scatter_add_(dim, idx, g_at - s1)
        return grad.to(out_dtype), None, None, None


def reinmax(logits: Tensor, tau: float, *, dim: int = -1,
            generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    r"""ReinMax: a one-hot sample with a second-order accurate gradient estimate.

    Returns ``(y_hard, y_soft)``: ``y_hard = one_hot(D)`` with ``D ~ Categorical(softmax(logits))``
    (no temperature in the forward pass) and ``y_soft = softmax(logits)``. In backward, with
    ``g = dL/dy_hard``, ``h = dL/dy_soft`` and ``J(p) = diag(p) - p p^T``::

        pi0 = softmax(logits),  pi1 = (softmax(logits / tau) + y_hard) / 2
        dL/dlogits = 2 J(pi1) g - 0.5 J(pi0) g + J(pi0) h

    Same calling convention as the public ``reinmax`` 0.1.0 package, plus ``dim`` and ``generator``.
    The paper uses ``tau`` in [1, 1.5]; any finite ``tau > 0`` is accepted.

    Args:
        logits: unnormalized log-probabilities, any shape, any floating dtype, may be non-contiguous.
            ``-inf`` marks a category that is never drawn (and gets zero gradient).
        tau: temperature of the backward pass, a finite number > 0.
        dim: the category dimension.
        generator: optional ``torch.Generator`` for reproducible sampling.

    Returns:
        ``(y_hard, y_soft)``, both shaped and typed like ``logits``.

    Raises:
        TypeError: non-floating ``logits``, non-numeric ``tau``.
        ValueError: ``tau`` not finite or <= 0, empty or invalid ``dim``, NaN or +inf in ``logits``
            or a slice of all ``-inf``.

    Example::

        >>> logits = torch.randn(4, 3, requires_grad=True)
        >>> y_hard, y_soft = reinmax(logits, 1.0)
        >>> (y_hard * torch.arange(3.0)).sum().backward()
    """
    tau = check_tau(tau)
    dim = check_logits(logits, dim)
    check_generator(generator, logits)
    return ReinMaxFunction.apply(logits, tau, dim, generator)
