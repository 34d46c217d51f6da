"""The layers of the Admin transformers: fairseq's Post-LN layers with Admin (or DeepNorm) residuals.

Every residual connection of fairseq's stock layers computes ``LN(x + f(x))``; these compute
``LN(omega * x + f(x))`` through an [`admin_torch.OmegaResidual`][admin_torch.OmegaResidual] (or ``alpha * x``
through an [`admin_torch.DeepNormResidual`][admin_torch.DeepNormResidual]). The layers override only fairseq's
``residual_connection(x, residual)`` hook, so everything else (attention, incremental decoding, checkpoints)
is the stock code. The omegas, DeepNorm's constants and qk-layernorm are the library's
([`admin_torch`][admin_torch]); this module builds fairseq layers around them for
``fairseq_plugins.models.transformer_admin`` and ``transformer_lm_admin``.

Sublayer counts (N of [`admin_torch.calculate_init`][admin_torch.calculate_init]): an encoder layer has 2 residual
sublayers (self-attention, FFN), a decoder layer 3 (self-attention, cross-attention, FFN), a decoder-only
(language model) layer 2. The decoder's N counts the DECODER's sublayers only (see
`fairseq_plugins.models.transformer_admin`).
"""

from typing import List, Optional

from torch import nn

import admin_torch
import reinmax
from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import TransformerConfig, TransformerDecoder, TransformerEncoder
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase

from ..moe_ffn import install_moe_ffn

__all__ = [
    "ENCODER_SUBLAYERS_PER_LAYER",
    "DECODER_SUBLAYERS_PER_LAYER",
    "LM_SUBLAYERS_PER_LAYER",
    "encoder_sublayers",
    "decoder_sublayers",
    "TransformerAdminEncoderLayer",
    "TransformerAdminDecoderLayer",
    "TransformerAdminEncoder",
    "TransformerAdminDecoder",
    "apply_qk_norm",
    "residual_modules",
]

ENCODER_SUBLAYERS_PER_LAYER = 2  # self-attention, FFN
DECODER_SUBLAYERS_PER_LAYER = 3  # self-attention, cross-attention, FFN
LM_SUBLAYERS_PER_LAYER = 2  # a decoder-only (language model) layer: self-attention, FFN


def encoder_sublayers(args) -> int:
    """N of the encoder: 2 residual sublayers per encoder layer."""
    return ENCODER_SUBLAYERS_PER_LAYER * args.encoder_layers


def decoder_sublayers(args) -> int:
    """N of the decoder: 3 residual sublayers per decoder layer (the encoder's are not counted)."""
    return DECODER_SUBLAYERS_PER_LAYER * args.decoder_layers


def _layer_residuals(args, cfg, side: str, decoder_only: bool = False):
    """The residual modules of one ``side`` ('encoder' or 'decoder') layer, and DeepNorm's beta (or None).

    ``decoder_only``: a language model's decoder (2 sublayers per layer; DeepNorm's decoder-only constants).
    """
    if decoder_only:
        per_layer = LM_SUBLAYERS_PER_LAYER
    else:
        per_layer = ENCODER_SUBLAYERS_PER_LAYER if side == "encoder" else DECODER_SUBLAYERS_PER_LAYER
    side_cfg = getattr(cfg, side)
    beta = None
    if args.admin_init == "deepnorm":
        dn = admin_torch.deepnorm_init(0 if decoder_only else cfg.encoder.layers, cfg.decoder.layers)
        alpha, beta = getattr(dn, f"{side}_alpha"), getattr(dn, f"{side}_beta")
        return [admin_torch.DeepNormResidual(alpha) for _ in range(per_layer)], beta
    as_parameter = bool(getattr(args, f"{side}_as_parameter", False))
    residuals = [admin_torch.as_module(per_layer * side_cfg.layers, args.admin_output_change_scale,
                                       as_parameter=as_parameter,
                                       embed_dim=side_cfg.embed_dim if as_parameter else None)
                 for _ in range(per_layer)]
    return residuals, beta


def _deepnorm_linears(layer) -> List[nn.Linear]:
    attns = [layer.self_attn] + ([layer.encoder_attn] if getattr(layer, "encoder_attn", None) is not None else [])
    if isinstance(layer.fc1, reinmax.RoutedFeedForward):  # each expert's fc1 and fc2, as 2-d views
        moe = layer.fc1
        ffn = [w for e in range(moe.num_experts) for w in (moe.fc1_weight.data[e], moe.fc2_weight.data[e])]
    else:
        ffn = [layer.fc1, layer.fc2]
    return ffn + [p for a in attns for p in (a.v_proj, a.out_proj)]


class TransformerAdminEncoderLayer(TransformerEncoderLayerBase):
    """A Post-LN encoder layer whose two residual connections are ``residuals[0]`` (self-attention)
    and ``residuals[1]`` (FFN): ``LN(residuals[k](x, f(x)))``."""

    def __init__(self, cfg, residuals: List[nn.Module], deepnorm_beta: Optional[float] = None, return_fc=False):
        super().__init__(cfg, return_fc=return_fc)
        if len(residuals) != ENCODER_SUBLAYERS_PER_LAYER:
            raise ValueError(f"residuals must hold {ENCODER_SUBLAYERS_PER_LAYER} modules, got {len(residuals)}")
        self.residuals = nn.ModuleList(residuals)
        install_moe_ffn(self, cfg, self.embed_dim, cfg.encoder.ffn_embed_dim, cfg.activation_fn)
        if deepnorm_beta is not None:
            admin_torch.deepnorm_scale_(_deepnorm_linears(self), deepnorm_beta)
        self._next_residual = 0

    def forward(self, *args, **kwargs):
        # fairseq calls residual_connection once per sublayer, in order; count the calls.
        self._next_residual = 0
        return super().forward(*args, **kwargs)

    def residual_connection(self, x, residual):
        k = self._next_residual
        self._next_residual = k + 1
        return self.residuals[k](residual, x)


class TransformerAdminDecoderLayer(TransformerDecoderLayerBase):
    """A Post-LN decoder layer with ``residuals[0]`` (self-attention), ``residuals[1]``
    (cross-attention) and ``residuals[2]`` (FFN); a decoder-only layer (``no_encoder_attn``, a
    language model's) has two: ``residuals[0]`` (self-attention) and ``residuals[1]`` (FFN)."""

    def __init__(self, cfg, residuals: List[nn.Module], deepnorm_beta: Optional[float] = None,
                 no_encoder_attn=False, add_bias_kv=False, add_zero_attn=False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
        wanted = LM_SUBLAYERS_PER_LAYER if no_encoder_attn else DECODER_SUBLAYERS_PER_LAYER
        if len(residuals) != wanted:
            raise ValueError(f"residuals must hold {wanted} modules, got {len(residuals)}")
        self.residuals = nn.ModuleList(residuals)
        install_moe_ffn(self, cfg, self.embed_dim, cfg.decoder.ffn_embed_dim, cfg.activation_fn)
        if deepnorm_beta is not None:
            admin_torch.deepnorm_scale_(_deepnorm_linears(self), deepnorm_beta)
        self._order = (0, 1, 2)
        self._next_residual = 0

    def forward(self, x, encoder_out=None, *args, **kwargs):
        # without cross-attention the second residual_connection call is the FFN's
        if len(self.residuals) == LM_SUBLAYERS_PER_LAYER:
            self._order = (0, 1)
        else:
            self._order = (0, 1, 2) if (self.encoder_attn is not None and encoder_out is not None) else (0, 2)
        self._next_residual = 0
        return super().forward(x, encoder_out, *args, **kwargs)

    def residual_connection(self, x, residual):
        k = self._order[self._next_residual]
        self._next_residual += 1
        return self.residuals[k](residual, x)


def _wrap(cfg, layer):
    """fairseq's activation checkpointing / FSDP wrapping, as the stock build_*_layer does."""
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not checkpoint else 0)


class TransformerAdminEncoder(TransformerEncoder):
    """The stock encoder built from `TransformerAdminEncoderLayer`."""

    def build_encoder_layer(self, args):
        cfg = TransformerConfig.from_namespace(args)
        residuals, beta = _layer_residuals(args, cfg, "encoder")
        return _wrap(cfg, TransformerAdminEncoderLayer(cfg, residuals, beta, return_fc=self.return_fc))


class TransformerAdminDecoder(TransformerDecoder):
    """The stock decoder built from `TransformerAdminDecoderLayer` (decoder-only layers when
    built with ``no_encoder_attn``, as a language model's)."""

    def build_decoder_layer(self, args, no_encoder_attn=False):
        cfg = TransformerConfig.from_namespace(args)
        residuals, beta = _layer_residuals(args, cfg, "decoder", decoder_only=no_encoder_attn)
        return _wrap(cfg, TransformerAdminDecoderLayer(cfg, residuals, beta, no_encoder_attn=no_encoder_attn))


def apply_qk_norm(model: nn.Module) -> int:
    """``--qk-norm``: qk-layernorm in every fairseq ``MultiheadAttention`` of ``model`` (self- and cross-attention),
    in place; returns how many modules got it.

    Each ``q_proj`` / ``k_proj`` becomes an [`admin_torch.QKNormLinear`][admin_torch.QKNormLinear] (the same ``nn.Linear`` weights,
    followed by a LayerNorm over each head's slice; fairseq then scales q by ``1/sqrt(d_head)`` as always), so
    incremental decoding caches normalised keys. fairseq's fused path (``F.multi_head_attention_forward``)
    reads ``q_proj.weight`` directly and would skip the norms: ``skip_embed_dim_check`` turns it off for these
    modules (its only other effect is skipping an input-width assertion).
    """
    from fairseq.modules.multihead_attention import MultiheadAttention

    count = 0
    for m in model.modules():
        if isinstance(m, MultiheadAttention) and not admin_torch.has_qk_norm(m):
            admin_torch.qk_norm_projections_(m.q_proj, m.k_proj, m.num_heads)
            m.skip_embed_dim_check = True
            count += 1
    return count


def residual_modules(model: nn.Module):
    """``(name, module)`` of every Admin / DeepNorm residual of ``model``, encoder first, in call order."""
    kinds = (admin_torch.OmegaResidual, admin_torch.DeepNormResidual)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
