"""The estimators ReinMax is compared with, all returning ``(y_hard, y_soft)`` like [`reinmax`][reinmax.reinmax].

Each returns ``y_hard = D - sg(p) + p`` (value: the one-hot sample ``D``; gradient: that of a soft
surrogate ``p``) and ``y_soft = softmax(logits)`` (plain softmax gradient), so the estimators are
interchangeable in a model that uses both outputs (for example a KL term on ``y_soft``).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from toolbox_core import validation

from ._checks import check_generator, check_logits, check_probabilities, check_tau, one_hot, work_dtype
from .sampling import draw


def _prepare(logits: Tensor, tau, dim, generator) -> Tuple[float, int, Tensor, Tensor]:
    """Checked ``tau`` and ``dim``, the logits in the working precision and their softmax (data-checked)."""
    tau = check_tau(tau)
    dim = check_logits(logits, dim)
    check_generator(generator, logits)
    work = logits.to(work_dtype(logits.dtype))
    pi0 = torch.softmax(work, dim)
    return tau, dim, work, pi0


def _straight(sample: Tensor, surrogate: Tensor, logits: Tensor, pi0: Tensor) -> Tuple[Tensor, Tensor]:
    """``(y_hard, y_soft)`` in the logits' dtype: value ``sample`` (one-hot), gradient of ``surrogate``."""
    # sample + (s - sg(s)) is exactly one-hot (x - x == 0), unlike s + sg(sample - s)
    y_hard = sample + (surrogate - surrogate.detach())
    return y_hard.to(logits.dtype), pi0.to(logits.dtype)


def _uniform_open(shape, work: Tensor, generator) -> Tensor:
    """Uniform numbers in [tiny, 1 - eps/2] (never 0 or 1), in the working precision."""
    u = torch.rand(shape, generator=generator, dtype=work.dtype, device=work.device)
    info = torch.finfo(work.dtype)
    return u.clamp(min=info.tiny, max=1.0 - info.eps / 2)


def straight_through(logits: Tensor, tau: float = 1.0, *, dim: int = -1,
                     generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    r"""Straight-through: ``D ~ softmax(logits)``, gradient of ``p = softmax(logits / tau)``.

    Examples:
        >>> y_hard, y_soft = straight_through(torch.randn(2, 5), 1.0)
    """
    tau, dim, work, pi0 = _prepare(logits, tau, dim, generator)
    idx = draw(pi0.detach(), dim, generator)
    p = pi0 if tau == 1.0 else torch.softmax(work / tau, dim)
    return _straight(one_hot(idx, pi0, dim), p, logits, pi0)


def gumbel_softmax(logits: Tensor, tau: float = 1.0, *, dim: int = -1,
                   generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    r"""Gumbel-Softmax straight-through (``torch.nn.functional.gumbel_softmax(hard=True)``), safely.

    ``y = logits + G`` with Gumbel noise ``G = -log(-log(U))``, ``U`` kept inside ``[tiny, 1 - eps/2]``
    so the noise is always finite (torch's version can draw 0 or inf and return NaN);
    ``D = one_hot(argmax y)``, gradient of ``softmax(y / tau)``.

    Examples:
        >>> y_hard, y_soft = gumbel_softmax(torch.randn(2, 5), 0.5)
    """
    tau, dim, work, pi0 = _prepare(logits, tau, dim, generator)
    check_probabilities(pi0.detach().sum(dim))
    gumbels = _uniform_open(work.shape, work, generator).log().neg().log().neg()
    y = (work + gumbels) / tau
    p = torch.softmax(y, dim)
    idx = y.detach().argmax(dim, keepdim=True)
    return _straight(one_hot(idx, p, dim), p, logits, pi0)


def gapped_straight_through(logits: Tensor, tau: float = 1.0, *, dim: int = -1, gap: float = 1.0,
                            generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    r"""Gapped straight-through ("GST-1.0", Fan et al., ICML 2022).

    ``D ~ softmax(logits)``; the logits are moved, without gradient, so that the sampled one equals
    the maximum logit ``m`` and every other one is at most ``m - gap``; the gradient is that of
    ``softmax(moved / tau)``:

        moved_k = m                      (k the sample)
        moved_j = min(logits_j, m - gap) (j != k)

    Examples:
        >>> y_hard, y_soft = gapped_straight_through(torch.randn(2, 5), 1.0, gap=1.0)
    """
    gap = validation.as_real("gap", gap, low=0.0)
    tau, dim, work, pi0 = _prepare(logits, tau, dim, generator)
    idx = draw(pi0.detach(), dim, generator)
    sample = one_hot(idx, pi0, dim)
    with torch.no_grad():
        top = work.amax(dim, keepdim=True)
        # finite logits only here: -inf stays -inf (never sampled), so no inf - inf
        moved = torch.where(sample.bool(), top, torch.minimum(work, top - gap))
        shift = torch.where(torch.isinf(work), torch.zeros_like(work), moved - work)
    p = torch.softmax((work + shift) / tau, dim)
    return _straight(sample, p, logits, pi0)


def gumbel_rao(logits: Tensor, tau: float = 1.0, *, dim: int = -1, k: int = 10,
               generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    r"""Gumbel-Rao Monte Carlo ("GR-MCK", Paulus et al., ICLR 2021) with ``k`` samples.

    ``D ~ softmax(logits)``; ``k`` Gumbel perturbations ``G`` are drawn conditionally on
    ``argmax(logits + G) = D``; the gradient is that of ``mean_k softmax((logits + G_k) / tau)``.
    Conditional draws (with ``log pi = log_softmax(logits)``, ``E ~ Exp(1)``):

        y_D = -log E_D,   y_j = -log(E_j / pi_j + E_D)   (j != D)

    Examples:
        >>> y_hard, y_soft = gumbel_rao(torch.randn(2, 5), 1.0, k=10)
    """
    k = validation.as_int("k", k, minimum=1)
    tau, dim, work, pi0 = _prepare(logits, tau, dim, generator)
    idx = draw(pi0.detach(), dim, generator)
    sample = one_hot(idx, pi0, dim)
    with torch.no_grad():
        log_pi = torch.log_softmax(work, dim)
        e = _uniform_open((k,) + tuple(work.shape), work, generator).log().neg()  # Exp(1) > 0
        e_d = e.gather(dim + 1, idx.unsqueeze(0).expand(k, *idx.shape))  # dim >= 0 here
        others = -torch.log(e * torch.exp(-log_pi) + e_d)  # pi_j = 0 -> -inf: never the argmax
        y = torch.where(sample.bool(), -torch.log(e), others)
        shift = y - log_pi  # y = log_pi + shift; adding it to logits keeps softmax and gradient
        shift = torch.where(torch.isinf(log_pi), torch.zeros_like(shift), shift)
    p = torch.softmax((work.unsqueeze(0) + shift) / tau, dim + 1).mean(0)
    return _straight(sample, p, logits, pi0)
