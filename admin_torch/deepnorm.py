"""DeepNorm (DeepNet, arXiv 2203.00555): ``x_next = LN(alpha * x + G(x))`` with beta-scaled init.

The second initialization of the toolbox, with the same shape of interface as Admin: a
residual module ([`DeepNormResidual`][admin_torch.DeepNormResidual], alpha on the shortcut) plus the constants
([`deepnorm_init`][admin_torch.deepnorm_init]) and the weight scaling at init ([`deepnorm_scale_`][admin_torch.deepnorm_scale_]).
"""

from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from toolbox_core import validation

from .residual import check_operands

__all__ = ["DeepNormInit", "deepnorm_init", "deepnorm_scale_", "DeepNormResidual", "DEEPNORM_SCALED_PROJECTIONS"]

#: the projections whose init DeepNet scales by beta (q_proj and k_proj keep gain 1).
DEEPNORM_SCALED_PROJECTIONS = ("fc1", "fc2", "v_proj", "out_proj")


@dataclass(frozen=True)
class DeepNormInit:
    """DeepNorm constants; the fields of a part the model does not have are None."""

    encoder_alpha: Optional[float]
    encoder_beta: Optional[float]
    decoder_alpha: Optional[float]
    decoder_beta: Optional[float]

    def __post_init__(self) -> None:
        # each field None or a finite number > 0, stored as a Python float (frozen: set through object.__setattr__)
        for name in ("encoder_alpha", "encoder_beta", "decoder_alpha", "decoder_beta"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, validation.as_real(name, value, low=0.0, low_open=True))


def _check_layers(name: str, value) -> int:
    n = validation.as_int(name, value, minimum=0)
    validation.as_real(name, n)  # beyond float range: ValueError, not OverflowError
    return n


def deepnorm_init(num_encoder_layers: int = 0, num_decoder_layers: int = 0) -> DeepNormInit:
    r"""DeepNorm's alpha (shortcut multiplier) and beta (init gain) for N encoder and M decoder LAYERS.

    * encoder only (M = 0): `\alpha = (2N)^{1/4}`, `\beta = (8N)^{-1/4}`
    * decoder only (N = 0): `\alpha = (2M)^{1/4}`, `\beta = (8M)^{-1/4}`
    * encoder-decoder: encoder `\alpha = 0.81 (N^4 M)^{1/16}`, `\beta = 0.87 (N^4 M)^{-1/16}`;
      decoder `\alpha = (3M)^{1/4}`, `\beta = (12M)^{-1/4}`

    N and M count layers (not sublayers), as in the DeepNet paper.

    Examples:
        >>> deepnorm_init(num_encoder_layers=6).encoder_alpha == 12 ** 0.25
        True
    """
    n = _check_layers("num_encoder_layers", num_encoder_layers)
    m = _check_layers("num_decoder_layers", num_decoder_layers)
    if n == 0 and m == 0:
        raise ValueError("at least one of num_encoder_layers, num_decoder_layers must be >= 1, got 0 and 0")
    if m == 0:
        return DeepNormInit((2 * n) ** 0.25, (8 * n) ** -0.25, None, None)
    if n == 0:
        return DeepNormInit(None, None, (2 * m) ** 0.25, (8 * m) ** -0.25)
    nm = float(n) ** 4 * m
    return DeepNormInit(0.81 * nm ** (1 / 16), 0.87 * nm ** (-1 / 16), (3 * m) ** 0.25, (12 * m) ** -0.25)


def _check_beta(beta) -> float:
    return validation.as_real("beta", beta, low=0.0, low_open=True)


@torch.no_grad()
def deepnorm_scale_(
    linear_weights: Iterable[Union[Tensor, nn.Linear]], beta: float, mode: str = "xavier_normal"
) -> None:
    """DeepNet's init of the fc1, fc2, v_proj and out_proj weights, in place.

    Args:
        linear_weights: the weight tensors (or `nn.Linear` modules) to initialize;
            pass only fc1, fc2, v_proj and out_proj (see `DEEPNORM_SCALED_PROJECTIONS`).
        beta: the gain, from [`deepnorm_init`][admin_torch.deepnorm_init].
        mode: ``'xavier_normal'`` re-initializes each weight with ``xavier_normal_(w, gain=beta)``
            (the DeepNet paper's pseudocode); ``'scale'`` multiplies the existing weight by beta
            (the torchscale implementation, which divides the default init by 1/beta).

    Examples:
        >>> fc = nn.Linear(8, 8)
        >>> deepnorm_scale_([fc.weight], deepnorm_init(6).encoder_beta)
    """
    beta = _check_beta(beta)
    if mode not in ("xavier_normal", "scale"):
        raise ValueError(f"mode must be 'xavier_normal' or 'scale', got {mode!r}")
    for w in linear_weights:
        if isinstance(w, nn.Linear):
            w = w.weight
        if not isinstance(w, Tensor) or w.dim() < 2:
            raise TypeError(f"linear_weights must hold 2-d weight tensors or nn.Linear modules, got {type(w).__name__}")
        if mode == "xavier_normal":
            nn.init.xavier_normal_(w, gain=beta)
        else:
            w.mul_(beta)


class DeepNormResidual(nn.Module):
    """DeepNorm's residual connection ``forward(x, f_x) = alpha * x + f_x``.

    alpha is a 1-element buffer (in ``state_dict``), cast to ``x``'s dtype in the forward pass
    as in [`admin_torch.OmegaResidual`][admin_torch.OmegaResidual].

    Examples:
        >>> res = DeepNormResidual(deepnorm_init(6).encoder_alpha)
        >>> y = res(torch.randn(2, 8), torch.randn(2, 8))
    """

    def __init__(self, alpha: float):
        super().__init__()
        self.register_buffer("alpha", torch.tensor([validation.as_real("alpha", alpha)]))

    def forward(self, x: Tensor, f_x: Tensor) -> Tensor:
        check_operands(x, "f_x", f_x, self.alpha.device, "alpha")
        alpha = self.alpha.to(dtype=x.dtype) if x.is_floating_point() else self.alpha  # never truncated
        return x * alpha + f_x

    def extra_repr(self) -> str:
        return f"alpha={self.alpha.float().item():.4g}"
