"""``transformer_admin``: fairseq's Post-LN transformer with Admin (or DeepNorm) residual scaling.

Every residual connection of the stock ``transformer`` computes ``LN(x + f(x))``; here it
computes ``LN(omega * x + f(x))`` through an [`admin_torch.OmegaResidual`][admin_torch.OmegaResidual] (or
``alpha * x`` through an [`admin_torch.DeepNormResidual`][admin_torch.DeepNormResidual]). The layers override only
fairseq's ``residual_connection(x, residual)`` hook, so everything else (attention, incremental
decoding, checkpoints) is the stock code.

Sublayer counts (N of [`admin_torch.calculate_init`][admin_torch.calculate_init]): the encoder has ``2 * encoder_layers``
residual sublayers (self-attention, FFN), the decoder ``3 * decoder_layers`` (self-attention,
cross-attention, FFN). The decoder's N counts the DECODER's sublayers only, not the encoder's:
the decoder's shortcut stream starts at its own (LayerNorm-free) embedding and the encoder output
enters only through cross-attention, whose keys/values are LayerNorm outputs; Admin's original
profiling code (Transformer-Clinic) likewise keeps two separate running variances,
``encoder_ratio`` and ``decoder_ratio``, each starting at 1.

Initializations (``--admin-init``):

* ``admin`` (default): closed-form omega, ``calculate_init(N, --admin-output-change-scale)``.
* ``profiled``: the original two-stage Admin. The first training forward pass runs once more
  under ``torch.no_grad()`` to measure each sublayer's output variance
  ([`admin_torch.profile_omegas`][admin_torch.profile_omegas], encoder and decoder as separate chains), sets the omegas
  and writes them to ``--admin-profile PATH`` (JSON); the persistent buffer ``admin_profiled``
  records it, so resuming from a checkpoint does not profile again. If PATH exists when the
  model is built, the omegas are loaded from it instead.
* ``deepnorm``: DeepNet's encoder-decoder constants ([`admin_torch.deepnorm_init`][admin_torch.deepnorm_init] with N, M
  counted in layers): alpha on the shortcut, fc1, fc2, v_proj and out_proj initialized with
  gain beta ([`admin_torch.deepnorm_scale_`][admin_torch.deepnorm_scale_]).

``--moe-experts E`` makes every FFN a mixture of E experts routed by a discrete sample
(`fairseq_plugins.moe`; ``--moe-router``, ``--moe-tau``, ``--moe-balance-weight``,
``--moe-capacity-factor``; train with ``--criterion label_smoothed_cross_entropy_moe``).

``--qk-norm`` adds qk-layernorm (a LayerNorm on each head's queries and keys, `apply_qk_norm`) to every
attention; with z-loss (``--criterion label_smoothed_cross_entropy_zloss --z-loss 1e-4``) these are the
remedies of Wortsman et al. 2023 that the stability monitor's warnings name.

``--encoder-as-parameter`` / ``--decoder-as-parameter`` make omega a trainable vector of size
embed_dim, as in the original recipes. Only Post-LN is supported.

Example:

    fairseq-train data-bin --user-dir fairseq_plugins --arch transformer_admin_wmt_en_de_18_18 \\
        --admin-init admin --admin-output-change-scale 'O(logn)' --share-all-embeddings ...

A trained model folds into a stock ``transformer`` checkpoint with
``python -m fairseq_plugins.fold_checkpoint IN.pt OUT.pt``.
"""

import copy
import logging
import os
from typing import List, Optional

import torch
from torch import nn

import admin_torch
import reinmax
from fairseq.distributed import fsdp_wrap
from fairseq.models import MODEL_REGISTRY, register_model
from fairseq.models.transformer import (
    TransformerConfig,
    TransformerDecoder,
    TransformerEncoder,
    TransformerModel,
)
from fairseq.models.transformer.transformer_legacy import (
    base_architecture,
    transformer_iwslt_de_en,
    transformer_vaswani_wmt_en_de_big,
)
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase

from toolbox_core import validation

from ..flags import FlagError, check_flag, flag_check
from ..moe import add_moe_args, check_moe_args, install_moe_ffn, moe_defaults
from ..registry import register_architecture_once, register_once

logger = logging.getLogger(__name__)

__all__ = [
    "ADMIN_INITS",
    "ADMIN_ARGS",
    "AdminProfiling",
    "TransformerAdminModel",
    "TransformerAdminEncoder",
    "TransformerAdminDecoder",
    "TransformerAdminEncoderLayer",
    "TransformerAdminDecoderLayer",
    "encoder_sublayers",
    "decoder_sublayers",
    "residual_modules",
]

#: the values of ``--admin-init``.
ADMIN_INITS = ("admin", "profiled", "deepnorm")
#: the model arguments this model adds to the stock transformer's (removed by folding).
ADMIN_ARGS = ("admin_init", "admin_output_change_scale", "encoder_as_parameter", "decoder_as_parameter", "admin_profile")

ENCODER_SUBLAYERS_PER_LAYER = 2  # self-attention, FFN
DECODER_SUBLAYERS_PER_LAYER = 3  # self-attention, cross-attention, FFN
LM_SUBLAYERS_PER_LAYER = 2  # a decoder-only (language model) layer: self-attention, FFN


def encoder_sublayers(args) -> int:
    """N of the encoder: 2 residual sublayers per encoder layer."""
    return ENCODER_SUBLAYERS_PER_LAYER * args.encoder_layers


def decoder_sublayers(args) -> int:
    """N of the decoder: 3 residual sublayers per decoder layer (the encoder's are not counted)."""
    return DECODER_SUBLAYERS_PER_LAYER * args.decoder_layers


_ADMIN_DEFAULTS = {"admin_init": "admin", "admin_output_change_scale": "O(logn)", "encoder_as_parameter": False,
                   "decoder_as_parameter": False, "admin_profile": None, "qk_norm": False}


def _admin_defaults(args) -> None:
    """Fill the admin (and ``--moe-*``) arguments a model configuration lacks (an args Namespace, a
    TransformerConfig, or a dataclass config whose fields are not all admin arguments: a language model
    has no encoder)."""
    moe_defaults(args)
    for name, default in _ADMIN_DEFAULTS.items():
        value = getattr(args, name, None)
        if value is None or ((name.endswith("_as_parameter") or name == "qk_norm") and not isinstance(value, bool)):
            value = default if value is None else bool(value)
            try:
                setattr(args, name, value)
            except Exception:  # an OmegaConf struct config without that key: it keeps its own default
                pass


def _check_admin_args(args) -> None:
    """The admin flags of a parsed command line or model Namespace; `FlagError` names the flag."""
    _admin_defaults(args)
    check_flag("--admin-init", validation.as_choice, str(args.admin_init), choices=ADMIN_INITS)
    check_flag("--admin-output-change-scale", validation.as_choice, str(args.admin_output_change_scale),
               choices=admin_torch.OUTPUT_CHANGE_SCALES)
    if getattr(args, "encoder_normalize_before", False) or getattr(args, "decoder_normalize_before", False):
        raise FlagError(
            "--encoder-normalize-before / --decoder-normalize-before are not accepted by transformer_admin "
            "(Admin rescales the shortcut of Post-LN sublayers; use --arch transformer for Pre-LN)"
        )
    if args.admin_init == "deepnorm" and (getattr(args, "encoder_as_parameter", False) or args.decoder_as_parameter):
        raise FlagError(
            "--encoder-as-parameter / --decoder-as-parameter are accepted only with --admin-init admin or "
            "profiled (DeepNorm's alpha is a constant)"
        )
    if args.admin_profile is not None:
        if args.admin_init != "profiled":
            raise FlagError(f"--admin-profile is accepted only with --admin-init profiled "
                            f"(got --admin-init {args.admin_init})")
        parent = os.path.dirname(os.path.abspath(args.admin_profile))
        if not os.path.isdir(parent):
            raise FlagError(f"--admin-profile {args.admin_profile}: directory {parent} does not exist")
        if os.path.isdir(args.admin_profile):
            raise FlagError(f"--admin-profile {args.admin_profile} is a directory; give a JSON file path")
    if getattr(args, "cross_self_attention", False):
        raise FlagError("--cross-self-attention is not accepted by transformer_admin")
    check_moe_args(args)


@flag_check
def check_transformer_admin_flags(args) -> None:
    """Run `_check_admin_args` on command lines whose ``--arch`` is an Admin model's architecture."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    model = ARCH_MODEL_REGISTRY.get(getattr(args, "arch", None))
    if isinstance(model, type) and issubclass(model, AdminProfiling):
        _check_admin_args(args)


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


class AdminProfiling:
    """Profiled Admin (``--admin-init profiled``) for a fairseq model with Admin residuals.

    The first training forward pass runs once more under ``torch.no_grad()`` to measure each
    sublayer's output variance ([`admin_torch.profile_omegas`][admin_torch.profile_omegas], each stack a separate chain),
    averages the omegas over distributed ranks, writes ``--admin-profile`` and marks the model
    profiled in the persistent buffer ``admin_profiled``.
    """

    def _init_profiling(self, args) -> None:
        if args.admin_init == "profiled":
            # 1 once the omegas are profiled (or loaded); saved with the model, so a resumed run keeps them
            self.register_buffer("admin_profiled", torch.zeros(1))
        # a host-side copy of admin_profiled: reading the buffer every step would sync with the GPU
        self._profiled: Optional[bool] = None

    def _profile_chains(self) -> List[nn.Module]:
        raise NotImplementedError

    def _load_profile_file(self, args) -> None:
        if args.admin_init == "profiled" and args.admin_profile and os.path.exists(args.admin_profile):
            admin_torch.apply_omegas(self, admin_torch.load_profile(args.admin_profile))
            self.admin_profiled.fill_(1)
            logger.info("%s: loaded profiled omegas from %s", type(self).__name__, args.admin_profile)

    def needs_profiling(self) -> bool:
        if self._admin_args().admin_init != "profiled" or not self.training:
            return False
        if self._profiled is None:  # once after construction or a checkpoint load, not per step
            self._profiled = self._all_ranks_profiled()
        return not self._profiled

    def _all_ranks_profiled(self) -> bool:
        """Whether every rank is profiled. With several ranks this is a collective: a restart where
        the profile file exists on only some ranks profiles again on all of them (the profiling
        averages over ranks), instead of leaving the others waiting in that average forever."""
        flag = self.admin_profiled.detach().clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _admin_args(self):
        return getattr(self, "legacy_args", None) or self.args

    def _load_from_state_dict(self, *args, **kwargs):
        self._profiled = None  # admin_profiled may change: read it again at the next training step
        super()._load_from_state_dict(*args, **kwargs)

    def profile_(self, run_forward) -> dict:
        """Profile the omegas with ``run_forward()`` (one forward pass on real data), average them
        over distributed ranks, write ``--admin-profile`` (rank 0) and mark the model profiled."""
        # profile_omegas averages over the distributed ranks: all ranks train the same model
        omegas = admin_torch.profile_omegas(self, run_forward, chains=self._profile_chains())
        path = self._admin_args().admin_profile
        if path and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
            admin_torch.save_profile(omegas, path)
            logger.info("%s: profiled %d omegas, written to %s", type(self).__name__, len(omegas), path)
        self.admin_profiled.fill_(1)
        self._profiled = True
        return omegas


@register_once(MODEL_REGISTRY, register_model, "transformer_admin")
class TransformerAdminModel(AdminProfiling, TransformerModel):
    """fairseq's (legacy, args-based) ``transformer`` with Admin / DeepNorm residuals (module docstring)."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        group = parser.add_argument_group("Admin residual scaling (transformer_admin)")
        group.add_argument("--admin-init", choices=ADMIN_INITS, default=None,
                           help="omega initialization: closed-form Admin (default), profiled Admin, or DeepNorm")
        group.add_argument("--admin-output-change-scale", choices=admin_torch.OUTPUT_CHANGE_SCALES, default=None,
                           help="closed-form Admin's output change scale (default O(logn))")
        group.add_argument("--encoder-as-parameter", action="store_true", default=None,
                           help="encoder omegas are trainable vectors of size encoder_embed_dim")
        group.add_argument("--decoder-as-parameter", action="store_true", default=None,
                           help="decoder omegas are trainable vectors of size decoder_embed_dim")
        group.add_argument("--admin-profile", metavar="PATH", default=None,
                           help="profiled Admin: read the omegas from PATH (JSON) if it exists, otherwise "
                                "profile on the first training batch and write them there")
        group.add_argument("--qk-norm", action="store_true", default=None,
                           help="qk-layernorm: a LayerNorm on each head's queries and keys in every attention "
                                "(Wortsman et al. 2023's remedy for attention-logit growth)")
        add_moe_args(parser)

    def __init__(self, args, encoder, decoder):
        super().__init__(args, encoder, decoder)
        self._init_profiling(args)

    @classmethod
    def build_model(cls, args, task):
        transformer_admin(args)
        _check_admin_args(args)
        model = super().build_model(args, task)
        # fairseq keeps a TransformerConfig as model.args; keep the flat Namespace too (for folding)
        model.legacy_args = copy.deepcopy(args)
        model.moe_balance_weight = float(args.moe_balance_weight)
        if args.qk_norm:
            apply_qk_norm(model)
        model._load_profile_file(args)
        return model

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        return TransformerAdminEncoder(args, src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        return TransformerAdminDecoder(args, tgt_dict, embed_tokens, no_encoder_attn=args.no_cross_attention)

    def _profile_chains(self):
        return [self.encoder, self.decoder]

    def forward(self, src_tokens, src_lengths, prev_output_tokens, **kwargs):
        if self.needs_profiling():
            self.profile_(lambda: super(TransformerAdminModel, self).forward(
                src_tokens, src_lengths, prev_output_tokens, **kwargs))
        return super().forward(src_tokens, src_lengths, prev_output_tokens, **kwargs)


# ------------------------------------------------------------------ architectures


@register_architecture_once("transformer_admin", "transformer_admin")
def transformer_admin(args):
    """6L-6L base (512 / 2048 / 8 heads), closed-form Admin O(logn)."""
    _admin_defaults(args)
    base_architecture(args)


@register_architecture_once("transformer_admin", "transformer_admin_wmt_en_de")
def transformer_admin_wmt_en_de(args):
    transformer_admin(args)


@register_architecture_once("transformer_admin", "transformer_admin_wmt_en_de_18_18")
def transformer_admin_wmt_en_de_18_18(args):
    """The Admin paper's 18L-18L WMT14 En-De model (base width)."""
    args.encoder_layers = getattr(args, "encoder_layers", 18)
    args.decoder_layers = getattr(args, "decoder_layers", 18)
    transformer_admin(args)


@register_architecture_once("transformer_admin", "transformer_admin_wmt_en_fr_60_12")
def transformer_admin_wmt_en_fr_60_12(args):
    """The Admin paper's 60L-12L WMT14 En-Fr model (base width)."""
    args.encoder_layers = getattr(args, "encoder_layers", 60)
    args.decoder_layers = getattr(args, "decoder_layers", 12)
    transformer_admin(args)


@register_architecture_once("transformer_admin", "transformer_admin_iwslt_de_en")
def transformer_admin_iwslt_de_en(args):
    """IWSLT'14 De-En size (512 / 1024 / 4 heads, 6L-6L)."""
    _admin_defaults(args)
    transformer_iwslt_de_en(args)


@register_architecture_once("transformer_admin", "transformer_admin_vaswani_wmt_en_de_big")
def transformer_admin_vaswani_wmt_en_de_big(args):
    """The big model of Vaswani et al. (1024 / 4096 / 16 heads, dropout 0.3)."""
    _admin_defaults(args)
    transformer_vaswani_wmt_en_de_big(args)
