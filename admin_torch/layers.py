"""Drop-in Admin versions of ``torch.nn.TransformerEncoderLayer`` and ``torch.nn.TransformerDecoderLayer``.

They are subclasses with the same constructor, plus keyword-only ``num_res_layers``,
``output_change_scale`` and ``as_parameter``; each residual connection ``norm(x + f(x))`` becomes
``norm(omega * x + f(x))`` through an [`admin_torch.OmegaResidual`][admin_torch.OmegaResidual] (``omega_sa``, ``omega_ff``;
the decoder also ``omega_mha``). Admin is for Post-LN: ``norm_first=True`` is a ValueError.

``num_res_layers`` is N of the stack: 2 per encoder layer, 3 per decoder layer, e.g. 12 for a
6-layer encoder. ``admin_torch.convert`` turns existing stock layers into these in place.

Examples:
    >>> layer = TransformerEncoderLayer(64, 4, 256, num_res_layers=2 * 6)
    >>> encoder = torch.nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False)
    >>> encoder(torch.randn(10, 3, 64)).shape
    torch.Size([10, 3, 64])
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolbox_core import validation

from .residual import OmegaResidual, as_module

__all__ = ["TransformerEncoderLayer", "TransformerDecoderLayer", "ENCODER_RESIDUALS", "DECODER_RESIDUALS"]

#: the OmegaResidual attributes of each layer, in call order
ENCODER_RESIDUALS = ("omega_sa", "omega_ff")
DECODER_RESIDUALS = ("omega_sa", "omega_mha", "omega_ff")


def _check_args(d_model, nhead, dim_feedforward, dropout, layer_norm_eps, batch_first, norm_first) -> None:
    """The arguments torch.nn checks late or not at all (a bool or float ``nhead``, a negative
    ``dim_feedforward``, a non-bool ``batch_first``: an AssertionError, a RuntimeError, or a silent mistake),
    before anything is built."""
    d = validation.as_int("d_model", d_model, minimum=1)
    h = validation.as_int("nhead", nhead, minimum=1)
    if d % h:
        raise ValueError(f"d_model={d} must be divisible by nhead={h} (each head has d_model / nhead dimensions)")
    validation.as_int("dim_feedforward", dim_feedforward, minimum=1)
    validation.as_real("dropout", dropout, low=0.0, high=1.0)
    validation.as_real("layer_norm_eps", layer_norm_eps, low=0.0, low_open=True)
    validation.as_bool("batch_first", batch_first)
    _check_post_ln(validation.as_bool("norm_first", norm_first))


def _check_input(layer: nn.Module, name: str, t) -> None:
    """``t`` a floating tensor of shape (S, E) or the layer's batched layout, E = d_model, on the layer's device."""
    weight = layer.norm1.weight
    if isinstance(t, Tensor) and t.dtype == weight.dtype and t.device == weight.device and not t.is_nested \
            and t.dim() in (2, 3) and t.shape[-1] == weight.shape[0]:
        return  # the common case, decided without building the message (this runs at every forward)
    shape = "(S, E) or " + ("(N, S, E)" if layer.self_attn.batch_first else "(S, N, E)") + \
        f" with E = d_model = {layer.norm1.normalized_shape[0]}"
    if isinstance(t, Tensor) and t.is_nested:  # torch.nn.TransformerEncoder's fast path (padding as a nested tensor)
        return
    validation.check_tensor(name, t, dims=(2, 3), last_dim=layer.norm1.normalized_shape[0], shape=shape)
    validation.check_device(name, t, layer.norm1.weight.device, "the layer's parameters")
    dtype = layer.norm1.weight.dtype
    if t.dtype != dtype and not torch.is_autocast_enabled(t.device.type):
        raise TypeError(f"{name} must have the layer's dtype {dtype} (or run under torch.autocast), got {t.dtype}")


def _check_post_ln(norm_first: bool) -> None:
    if norm_first:
        raise ValueError("norm_first=True (Pre-LN) is not accepted: Admin rescales the shortcut of Post-LN "
                         "sublayers; use torch.nn's layer for Pre-LN")


def _omegas(layer: nn.Module, names, num_res_layers, output_change_scale: str, as_parameter: bool) -> None:
    ref = layer.norm1.weight
    for name in names:
        res = as_module(num_res_layers, output_change_scale, as_parameter, layer.norm1.normalized_shape[0])
        setattr(layer, name, res.to(device=ref.device))


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` (Post-LN) with Admin's ``norm(omega * x + f(x))`` residuals.

    Args: those of ``torch.nn.TransformerEncoderLayer``, and keyword-only
        num_res_layers: N of the stack (2 per encoder layer), an integer >= 1.
        output_change_scale: ``'O(n)'``, ``'O(logn)'``, ``'default'`` or ``'O(1)'`` (see [`calculate_init`][admin_torch.calculate_init]).
        as_parameter: trainable omega vectors of size ``d_model``.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation=F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None, *,
                 num_res_layers: int, output_change_scale: str = "default", as_parameter: bool = False):
        _check_args(d_model, nhead, dim_feedforward, dropout, layer_norm_eps, batch_first, norm_first)
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                         norm_first, bias, device, dtype)
        _omegas(self, ENCODER_RESIDUALS, num_res_layers, output_change_scale, as_parameter)

    omega_sa: OmegaResidual
    omega_ff: OmegaResidual

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        _check_input(self, "src", src)
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask", other_type=F._none_or_dtype(src_mask),
            other_name="src_mask", target_type=src.dtype)
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                     target_type=src.dtype, check_other=False)
        x = src
        x = self.norm1(self.omega_sa(x, self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal)))
        x = self.norm2(self.omega_ff(x, self._ff_block(x)))
        return x


class TransformerDecoderLayer(nn.TransformerDecoderLayer):
    """``torch.nn.TransformerDecoderLayer`` (Post-LN) with Admin's ``norm(omega * x + f(x))`` residuals.

    Args: those of ``torch.nn.TransformerDecoderLayer``, and keyword-only ``num_res_layers`` (3 per
    decoder layer), ``output_change_scale``, ``as_parameter``, as for [`TransformerEncoderLayer`][admin_torch.TransformerEncoderLayer].
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation=F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None, *,
                 num_res_layers: int, output_change_scale: str = "default", as_parameter: bool = False):
        _check_args(d_model, nhead, dim_feedforward, dropout, layer_norm_eps, batch_first, norm_first)
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                         norm_first, bias, device, dtype)
        _omegas(self, DECODER_RESIDUALS, num_res_layers, output_change_scale, as_parameter)

    omega_sa: OmegaResidual
    omega_mha: OmegaResidual
    omega_ff: OmegaResidual

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        _check_input(self, "tgt", tgt)
        _check_input(self, "memory", memory)
        if tgt.dim() != memory.dim():
            raise ValueError(f"memory must have {tgt.dim()} dimensions like tgt, got shapes {tuple(memory.shape)} "
                             f"and {tuple(tgt.shape)}")
        x = tgt
        x = self.norm1(self.omega_sa(x, self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal)))
        x = self.norm2(self.omega_mha(x, self._mha_block(x, memory, memory_mask, memory_key_padding_mask,
                                                           memory_is_causal)))
        x = self.norm3(self.omega_ff(x, self._ff_block(x)))
        return x
