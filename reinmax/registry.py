"""Picking an estimator by name: `ESTIMATORS` and [`estimate`][reinmax.estimate]."""

from types import MappingProxyType
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from toolbox_core import validation

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


def check_estimator_name(name, arg: str = "name") -> str:
    """``name`` if it is a key of `ESTIMATORS`; TypeError/ValueError naming ``arg`` otherwise."""
    return validation.as_choice(arg, name, sorted(ESTIMATORS))


def check_estimator_options(name: str, tau: float, options: Mapping) -> Dict:
    """Validate ``options`` of estimator ``name`` now (a layer's constructor), not at its first forward.

    Runs the estimator once on a 1x2 tensor with a private generator (the global RNG is untouched).
    """
    options = dict(options)
    with torch.no_grad():
        ESTIMATORS[name](torch.zeros(1, 2), tau, generator=torch.Generator(), **options)
    return options


def estimate(name: str, logits: Tensor, tau: float, dim: int = -1,
             generator: Optional[torch.Generator] = None, **options) -> Tuple[Tensor, Tensor]:
    r"""Run the estimator ``name`` (a key of `ESTIMATORS`) on ``logits``.

    Returns ``(y_hard, y_soft)``: a one-hot sample that carries the estimator's gradient, and
    ``softmax(logits)``. ``options`` go to the estimator (``gap=`` for ``gapped_straight_through``,
    ``k=`` for ``gumbel_rao``); an option the estimator does not take is a TypeError.

    Examples:
        >>> y_hard, y_soft = estimate("reinmax", torch.randn(8, 4), 1.3)
        >>> y_hard, y_soft = estimate("gumbel_rao", torch.randn(8, 4), 1.0, k=5)
    """
    fn = ESTIMATORS[check_estimator_name(name)]
    return fn(logits, tau, dim=dim, generator=generator, **options)
