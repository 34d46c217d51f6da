"""AddSign (Bello et al., 2017): ``w <- w - lr * (alpha + d * sign(g) * sign(m)) * g``."""

from typing import Any, Dict, Iterable, Union

import torch

from toolbox_core import validation

from .functional import _addsign_coefficients
from .sign_optimizer import SignDecay, SignOptimizer, shares_argument_docs

__all__ = ["AddSign"]


@shares_argument_docs
class AddSign(SignOptimizer):
    r"""AddSign: scale the gradient up where it agrees in sign with its moving average, down where not.

    With ``m <- beta * m + (1 - beta) * g`` updated first (no bias correction) and
    ``d = sign_internal_decay(step)`` (the step before this update; 1 without a decay):

    $$
    w \leftarrow w - \mathrm{lr}\,(\alpha + d\,\mathrm{sign}(g)\,\mathrm{sign}(m))\,g
    $$

    implemented as ``w - lr * alpha * g - lr * d * sign(m) * |g|`` (the same value, fewer passes).
    State: one tensor per parameter (``exp_avg``, float32 for float16/bfloat16 parameters, which are
    updated in float32) and a 0-d tensor ``step``: half of Adam's memory.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        alpha: the constant term of the factor (real). Default: 1.

    Examples:
        >>> from sign_optim import LinearInternalDecay
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = AddSign(model.parameters(), lr=1e-3, sign_internal_decay=LinearInternalDecay(1000))
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        beta: float = 0.9,
        alpha: float = 1.0,
        sign_internal_decay: SignDecay = None,
        *,
        weight_decay: float = 0.0,
        maximize: bool = False,
        foreach: Union[bool, None] = None,
        fused: Union[bool, None] = None,
        capturable: bool = False,
    ) -> None:
        defaults = dict(lr=lr, beta=beta, alpha=alpha, weight_decay=weight_decay, maximize=maximize,
                        foreach=foreach, fused=fused, capturable=capturable)
        super().__init__(params, defaults, sign_internal_decay)

    rule = "addsign"
    rule_coefficients = staticmethod(_addsign_coefficients)  # unchecked: the class checks alpha and each decay

    def _check_group(self, group: Dict[str, Any]) -> None:
        super()._check_group(group)
        validation.as_real("alpha", group["alpha"])
