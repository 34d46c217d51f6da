"""AddSign (Bello et al., 2017): ``w <- w - lr * (alpha + d * sign(g) * sign(m)) * g``."""

from typing import Any, Dict, Iterable, Union

import torch

from toolbox_core import validation

from .functional import Coefficients, addsign_coefficients
from .sign_optimizer import SignDecay, SignOptimizer

__all__ = ["AddSign"]


class AddSign(SignOptimizer):
    r"""AddSign: scale the gradient up where it agrees in sign with its moving average, down where not.

    With ``m <- beta * m + (1 - beta) * g`` updated first (no bias correction) and
    ``d = sign_internal_decay(step)`` (the step before this update; 1 without a decay):

    $$
    w \leftarrow w - \mathrm{lr}\,(\alpha + d\,\mathrm{sign}(g)\,\mathrm{sign}(m))\,g
    $$

    implemented as ``w - lr * alpha * g - lr * d * sign(m) * |g|`` (the same value, fewer passes).
    ``weight_decay`` is decoupled (``w <- w - lr * weight_decay * w`` before the update), as in AdamW.
    State: one tensor per parameter (``exp_avg``, float32 for float16/bfloat16 parameters, which are
    updated in float32) and a 0-d tensor ``step``: half of Adam's memory.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate (>= 0). Default: 1e-3 (TensorFlow's default is 0.1).
        beta: moving-average coefficient in [0, 1). Default: 0.9.
        alpha: the constant term of the factor (real). Default: 1.
        sign_internal_decay: None (constant 1), a [`InternalDecay`][sign_optim.InternalDecay] (saved in
            ``state_dict``), or any callable ``step -> float`` (not serializable: pass it again when
            resuming, see [`SignOptimizer`][sign_optim.SignOptimizer]).
        weight_decay: decoupled weight decay (>= 0). Default: 0.
        maximize: maximize the objective instead of minimizing it. Default: False.
        foreach: use the ``torch._foreach_*`` implementation.
        fused: use the one-pass operator (`sign_optim.fused`: C++ on CPU, Triton on CUDA).
            ``fused=None, foreach=None`` (the default) takes the fused kernel where it is available,
            else foreach; ``fused=True`` where it is not is a ValueError. The paths agree to 1 ulp.
        capturable: keep the step counter on the parameters' device and never read a tensor on the
            host (CUDA graphs); ``lr`` may then be a device tensor. With ``fused=True`` on the CPU the
            fused operator runs (no device to sync with); on CUDA the traced update.

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

    def _check_group(self, group: Dict[str, Any]) -> None:
        super()._check_group(group)
        validation.as_real("alpha", group["alpha"])

    def coefficients(self, group: Dict[str, Any], decay: float) -> Coefficients:
        return addsign_coefficients(group["alpha"], decay)

    def tensor_coefficients(self, group: Dict[str, Any], decay: torch.Tensor):
        return group["alpha"], decay, None
