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
(`fairseq_plugins.moe_ffn`; ``--moe-router``, ``--moe-tau``, ``--moe-balance-weight``,
``--moe-capacity-factor``; train with ``--criterion label_smoothed_cross_entropy_moe``).

``--qk-norm`` adds qk-layernorm (a LayerNorm on each head's queries and keys,
`fairseq_plugins.modules.admin_layers.apply_qk_norm`) to every
attention; with z-loss (``--criterion label_smoothed_cross_entropy_zloss --z-loss 1e-4``) these are the
remedies of Wortsman et al. 2023 that the stability monitor's warnings name.

``--encoder-as-parameter`` / ``--decoder-as-parameter`` make omega a trainable vector of size
embed_dim, as in the original recipes. Only Post-LN is supported.

Example:

    fairseq-train data-bin --user-dir fairseq_plugins --arch transformer_admin_wmt_en_de_18_18 \\
        --admin-init admin --admin-output-change-scale 'O(logn)' --share-all-embeddings ...

A trained model folds into a stock ``transformer`` checkpoint with
``python -m fairseq_plugins.fold_checkpoint IN.pt OUT.pt``.

This module registers the model and its architectures, whose functions fill the Admin and MoE defaults
(`fairseq_plugins.admin.admin_defaults`; fairseq applies the function of ``--arch`` after parsing and again
to the model's configuration before ``build_model``, which only builds; the flags are checked once, at parsing); the flags are declared and checked in `fairseq_plugins.admin`, the layers are `fairseq_plugins.modules.admin_layers`, profiling is the mixin
`fairseq_plugins.modules.admin_profiling.AdminProfiling`.
"""

import copy

from fairseq.models import MODEL_REGISTRY, register_model
from fairseq.models.transformer import TransformerModel
from fairseq.models.transformer.transformer_legacy import (
    base_architecture,
    transformer_iwslt_de_en,
    transformer_vaswani_wmt_en_de_big,
)

from ..admin import ADMIN_ARGS, ADMIN_INITS, add_admin_args, admin_defaults
from ..admin import check_transformer_admin_flags  # noqa: F401  (its old home)
from ..modules.admin_layers import (  # noqa: F401  (decoder_sublayers ... apply_qk_norm: their old home)
    TransformerAdminDecoder,
    TransformerAdminDecoderLayer,
    TransformerAdminEncoder,
    TransformerAdminEncoderLayer,
    apply_qk_norm,
    decoder_sublayers,
    encoder_sublayers,
    residual_modules,
)
from ..modules.admin_profiling import AdminProfiling
from ..registry import register_architecture_once, register_once

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


@register_once(MODEL_REGISTRY, register_model, "transformer_admin")
class TransformerAdminModel(AdminProfiling, TransformerModel):
    """fairseq's (legacy, args-based) ``transformer`` with Admin / DeepNorm residuals (module docstring)."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_admin_args(parser)  # generated from the flags' one declaration, fairseq_plugins.admin

    def __init__(self, args, encoder, decoder):
        super().__init__(args, encoder, decoder)
        self._init_profiling(args)

    @classmethod
    def build_model(cls, args, task):
        # fairseq applied the --arch function (the defaults) to args, the flags were checked at parsing: only build
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
    admin_defaults(args)
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
    admin_defaults(args)
    transformer_iwslt_de_en(args)


@register_architecture_once("transformer_admin", "transformer_admin_vaswani_wmt_en_de_big")
def transformer_admin_vaswani_wmt_en_de_big(args):
    """The big model of Vaswani et al. (1024 / 4096 / 16 heads, dropout 0.3)."""
    admin_defaults(args)
    transformer_vaswani_wmt_en_de_big(args)
