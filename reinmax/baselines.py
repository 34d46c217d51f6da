"""The estimators ReinMax is compared with, all returning ``(y_hard, y_soft)`` like :func:`reinmax`.

Each returns ``y_hard = D - sg(p) + p`` (value: the one-hot sample ``D``; gradient: that of a soft
surrogate ``p``) and ``y_soft = softmax(logits)`` (plain softmax gradient), so the estimators are
interchangeable in a model that uses both outputs (for example a KL term on ``y_soft``).
"""

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._checks import check_generator, check_logits, check_tau, raise_if_nan
from .sampling import sample_categorical


def _prepare(logits: Tensor, tau, dim: int, generator) -> Tuple[float, int]:
    tau = check_tau(tau)
    dim = check_logits(logits, dim)
    check_generator(generator, logits)
    return tau, dim


def _one_hot_like(p: Tensor, idx: Tensor, dim: int) -> Tensor:
    return torch.zeros_like(p, memory_format=torch.contiguous_format).scatter_(dim, idx, 1.0)


def _straight(one_hot: Tensor, surrogate: Tensor) -> Tensor:
    # value one_hot, gradient of surrogate
    return surrogate + (one_hot - surrogate).detach()


def _uniform_open(shape, like: Tensor, generator) -> Tensor:
    """Uniform numbers in [tiny, 1 - eps/2] (never 0 or 1), float32 at least."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    u = torch.rand(shape, generator=generator, dtype=dtype, device=like.device)
    info = torch.finfo(dtype)
    return u.clamp_(min=info.tiny, max=1.0 - info.eps / 2)


def straight_through(logits: Tensor, tau: float = 1.0, *, dim: int = -1,
                     generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    r"""Straight-through: ``D ~ softmax(logits)``, gradient of ``p = softmax(logits / tau)``.

    Example::

        >>> y_hard, y_soft = straight_through(torch.randn(2, 5), 1.0)
    """
    tau, dim = _prepare(logits, tau, dim, generator)
    pi0 = torch.softmax(logits, dim)
    idx = sample_categorical(pi0.detach(), dim, generator)
    p = pi0 if tau == 1.0 else torch.softmax(logits / tau, dim)
    return _straight(_one_hot_like(pi0, idx, dim), p), pi0


def gumbel_softmax(logits: Tensor, tau: float = 1.0, *, dim: int = -1,
                   generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    r"""Gumbel-Softmax straight-through (``torch.nn.functional.gumbel_softmax(hard=True)``), safely.

    ``y = logits + G`` with Gumbel noise ``G = -log(-log(U))``, ``U`` kept inside ``[tiny, 1 - eps/2]``
    so the noise is always finite (torch's version can draw 0 or inf and return NaN);
    ``D = one_hot(argmax y)``, gradient of ``softmax(y / tau)``. Noise and the surrogate are computed
    in float32 for float16/bfloat16 logits.

    Example::

        >>> y_hard, y_soft = gumbel_softmax(torch.randn(2, 5), 0.5)
    """
    tau, dim = _prepare(logits, tau, dim, generator)
    pi0 = torch.softmax(logits, dim)
    raise_if_nan(pi0.detach().sum(dim))
    work = logits if logits.dtype == torch.float64 else logits.float()
    gumbels = _uniform_open(logits.shape, logits, generator).log_().neg_().log_().neg_()
    y = (work + gumbels) / tau
    p = torch.softmax(y, dim)
    idx = y.detach().argmax(dim, keepdim=True)
    return _straight(_one_hot_like(p, idx, dim), p).to(logits.dtype), pi0


def gapped_straight_through(logits: Tensor, tau: float = 1.0, *, dim: int = -1, gap: float = 1.0,
                            generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    r"""Gapped straight-through ("GST-1.0", Fan et al., ICML 2022).

    ``D ~ softmax(logits)``; the logits are moved, without gradient, so that the sampled one equals
    the maximum logit ``m`` and every other one is at most ``m - gap``; the gradient is that of
    ``softmax(moved / tau)``::

        moved_k = m                      (k the sample)
        moved_j = min(logits_j, m - gap) (j != k)

    Example::

        >>> y_hard, y_soft = gapped_straight_through(torch.randn(2, 5), 1.0, gap=1.0)
    """
    tau, dim = _prepare(logits, tau, dim, generator)
    if isinstance(gap, bool) or not isinstance(gap, numbers.Real) or not math.isfinite(gap) or gap < 0:
        raise ValueError(f"gap must be a finite real number >= 0, got {gap!r}")
    pi0 = torch.softmax(logits, dim)
    idx = sample_categorical(pi0.detach(), dim, generator)
    one_hot = _one_hot_like(pi0, idx, dim)
    with torch.no_grad():
        top = logits.amax(dim, keepdim=True)
        sampled = one_hot.bool()
        # finite logits only here: -inf stays -inf (never sampled), so no inf - inf
        moved = torch.where(sampled, top, torch.minimum(logits, top - gap))
        shift = torch.where(torch.isinf(logits), torch.zeros_like(logits), moved - logits)
    p = torch.softmax((logits + shift) / tau, dim)
    return _straight(one_hot, p), pi0


def gumbel_rao(logits: Tensor, tau: float = 1.0, *, dim: int = -1, k: int = 10,
               generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    r"""Gumbel-Rao Monte Carlo ("GR-MCK", Paulus et al., ICLR 2021) with ``k`` samples.

    ``D ~ softmax(logits)``; ``k`` Gumbel perturbations ``G`` are drawn conditionally on
    ``argmax(logits + G) = D``; the gradient is that of ``mean_k softmax((logits + G_k) / tau)``.
    Conditional draws (with ``log pi = log_softmax(logits)``, ``E ~ Exp(1)``)::

        y_D = -log E_D,   y_j = -log(E_j / pi_j + E_D)   (j != D)

    Example::

        >>> y_hard, y_soft = gumbel_rao(torch.randn(2, 5), 1.0, k=10)
    """
    tau, dim = _prepare(logits, tau, dim, generator)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k (number of Gumbel samples) must be an int >= 1, got {k!r}")
    pi0 = torch.softmax(logits, dim)
    idx = sample_categorical(pi0.detach(), dim, generator)
    one_hot = _one_hot_like(pi0, idx, dim)
    work = logits if logits.dtype == torch.float64 else logits.float()
    with torch.no_grad():
        log_pi = torch.log_softmax(work, dim)
        e = _uniform_open((int(k),) + tuple(logits.shape), work, generator).log_().neg_()  # Exp(1) > 0
        e_d = e.gather(dim + 1, idx.unsqueeze(0).expand(int(k), *idx.shape))  # dim >= 0 here
        others = -torch.log(e * torch.exp(-log_pi) + e_d)  # pi_j = 0 -> -inf: never the argmax
        y = torch.where(one_hot.bool(), -torch.log(e), others)
        shift = y - log_pi  # y = log_pi + shift; adding it to logits keeps softmax and gradient
        shift = torch.where(torch.isinf(log_pi), torch.zeros_like(shift), shift)
    p = torch.softmax((work.unsqueeze(0) + shift) / tau, dim + 1).mean(0)
    return _straight(one_hot, p.to(logits.dtype)), pi0
