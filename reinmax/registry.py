"""Picking an estimator by name: :data:`ESTIMATORS` and :func:`estimate`."""

from types import MappingProxyType
from typing import Callable, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .baselines import gapped_straight_through, gumbel_rao, gumbel_softmax, straight_through
from .reinmax_function import reinmax

#: name -> estimator function ``f(logits, tau, *, dim=-1, generator=None, **options) -> (y_hard, y_soft)``.
#: Options: ``gap`` (gapped_straight_through, default 1.0), ``k`` (gumbel_rao, default 10).
ESTIMATORS: Mapping[str, Callable[..., Tuple[Tensor, Tensor]]] = MappingProxyType({
    "reinmax": reinmax,
    "straight_through": straight_through,
    "gumbel_softmax": gumbel_softmax,
    "gapped_straight_through": gapped_straight_through,
    "gumbel_rao": gumbel_rao,
})


def check_estimator_name(name) -> str:
    if not isinstance(name, str) or name not in ESTIMATORS:
        raise ValueError(f"name must be one of {sorted(ESTIMATORS)}, got {name!r}")
    return name


def estimate(name: str, logits: Tensor, tau: float, dim: int = -1,
             generator: Optional[torch.Generator] = None, **options) -> Tuple[Tensor, Tensor]:
    r"""Run the estimator ``name`` (a key of :data:`ESTIMATORS`) on ``logits``.

    Returns ``(y_hard, y_soft)``: a one-hot sample that carries the estimator's gradient, and
    ``softmax(logits)``. ``options`` go to the estimator (``gap=`` for ``gapped_straight_through``,
    ``k=`` for ``gumbel_rao``); an option the estimator does not take is a TypeError.

    Example::

        >>> y_hard, y_soft = estimate("reinmax", torch.randn(8, 4), 1.3)
        >>> y_hard, y_soft = estimate("gumbel_rao", torch.randn(8, 4), 1.0, k=5)
    """
    fn = ESTIMATORS[check_estimator_name(name)]
    return fn(logits, tau, dim=dim, generator=generator, **options)
