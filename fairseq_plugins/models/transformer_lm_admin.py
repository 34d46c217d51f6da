"""``transformer_lm_admin``: fairseq's decoder-only language model, Post-LN, with Admin (or DeepNorm) residuals.

The decoder of fairseq's ``transformer_lm`` with every residual connection ``LN(x + f(x))`` computed
as ``LN(omega * x + f(x))`` ([`admin_torch.OmegaResidual`][admin_torch.OmegaResidual]) or ``LN(alpha * x + f(x))``
([`admin_torch.DeepNormResidual`][admin_torch.DeepNormResidual]). A decoder-only layer has two residual sublayers
(self-attention, FFN), so ``N = 2 * decoder_layers``; DeepNorm takes its decoder-only constants
``alpha = (2M)^(1/4)``, ``beta = (8M)^(-1/4)``.

The flags are ``transformer_admin``'s: ``--admin-init admin|profiled|deepnorm``,
``--admin-output-change-scale``, ``--decoder-as-parameter``, ``--admin-profile``, and the
mixture-of-experts FFN's ``--moe-experts``, ``--moe-router``, ``--moe-tau``, ``--moe-balance-weight``,
``--moe-capacity-factor`` (`fairseq_plugins.moe_ffn`), and ``--qk-norm`` (qk-layernorm,
`fairseq_plugins.modules.admin_layers.apply_qk_norm`). Pre-LN
(``--decoder-normalize-before``) is refused. Architectures, named after fairseq's own:

* ``transformer_lm_admin``: the base (512 / 2048 / 8 heads, 6 layers),
* ``transformer_lm_admin_gpt``, ``transformer_lm_admin_gpt2_small``, ``_gpt2_medium``, ``_gpt2_big``:
  the GPT sizes of ``transformer_lm_gpt*`` (GELU), Post-LN,
* ``transformer_lm_admin_deep``: 24 layers at 256 / 1024 / 4 heads, the stability setting.

``python -m fairseq_plugins.fold_checkpoint IN OUT`` turns a checkpoint into a stock ``transformer_lm``
checkpoint that ``fairseq-eval-lm`` scores without ``--user-dir``.

Example:

    fairseq-train data-bin --task language_modeling --user-dir fairseq_plugins \\
        --arch transformer_lm_admin_deep --admin-init admin --tokens-per-sample 128 ...
"""

import argparse
import copy
from dataclasses import dataclass

from fairseq.models import MODEL_REGISTRY, register_model
from fairseq.models.transformer_lm import DEFAULT_MAX_TARGET_POSITIONS, TransformerLanguageModel, \
    TransformerLanguageModelConfig
from fairseq.utils import safe_getattr
from omegaconf import OmegaConf

from ..admin import AdminConfig
from ..flags import FlagError, fill_defaults, flag_check
from ..modules.admin_layers import TransformerAdminDecoder, apply_qk_norm
from ..modules.admin_profiling import AdminProfiling
from ..moe_ffn import MoEConfig
from ..registry import register_architecture_once, register_once

__all__ = ["TransformerLMAdminConfig", "TransformerLMAdmin", "check_transformer_lm_admin_flags"]


@dataclass
class TransformerLMAdminConfig(MoEConfig, AdminConfig, TransformerLanguageModelConfig):  # fields: the base first
    """fairseq's ``transformer_lm`` configuration with the Admin flags (`fairseq_plugins.admin.AdminConfig`) and
    the ``--moe-*`` flags (`fairseq_plugins.moe_ffn.MoEConfig`), each declared once there."""


#: fairseq ``transformer_lm`` flags that this model refuses (its omegas fold into a token embedding)
_REFUSED = (("--character-embeddings", "character_embeddings"), ("--adaptive-input", "adaptive_input"))


@flag_check
def check_transformer_lm_admin_flags(args) -> None:
    """What ``transformer_lm_admin`` refuses of ``transformer_lm``'s flags (its Admin and ``--moe-*`` flags:
    `fairseq_plugins.admin.check_transformer_admin_flags`)."""
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    if ARCH_MODEL_NAME_REGISTRY.get(getattr(args, "arch", None)) != "transformer_lm_admin":
        return
    for flag, name in _REFUSED:
        if safe_getattr(args, name, False):
            raise FlagError(f"{flag} is not accepted by transformer_lm_admin (its omegas fold into a token embedding)")


@register_once(MODEL_REGISTRY, register_model, "transformer_lm_admin", dataclass=TransformerLMAdminConfig)
class TransformerLMAdmin(AdminProfiling, TransformerLanguageModel):
    """fairseq's ``transformer_lm`` (Post-LN) with Admin / DeepNorm residuals (module docstring)."""

    def __init__(self, decoder, args=None):
        super().__init__(decoder)
        self.legacy_args = args
        self._init_profiling(args)

    @classmethod
    def build_model(cls, args, task):
        # a flat Namespace: fairseq's TransformerConfig.from_namespace keeps the admin fields of a
        # Namespace, not of the OmegaConf config fairseq hands a dataclass model
        if not isinstance(args, argparse.Namespace):
            args = argparse.Namespace(**OmegaConf.to_container(args, resolve=True, enum_to_str=True)) \
                if OmegaConf.is_config(args) \
                else argparse.Namespace(**vars(args))
        # fairseq filled the defaults (the dataclass, the --arch function); the flags were checked at parsing: only build
        if args.decoder_layers_to_keep:
            args.decoder_layers = len(args.decoder_layers_to_keep.split(","))
        if safe_getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = safe_getattr(args, "tokens_per_sample", DEFAULT_MAX_TARGET_POSITIONS)
        embed_tokens = cls.build_embedding(args, task.source_dictionary, args.decoder_input_dim)
        decoder = TransformerAdminDecoder(args, task.target_dictionary, embed_tokens, no_encoder_attn=True)
        model = cls(decoder, copy.deepcopy(args))
        model.moe_balance_weight = float(args.moe_balance_weight)
        if args.qk_norm:
            apply_qk_norm(model)
        model._load_profile_file(args)
        return model

    def _profile_chains(self):
        return [self.decoder]

    def forward(self, src_tokens, **kwargs):
        if self.needs_profiling():
            self.profile_(lambda: super(TransformerLMAdmin, self).forward(src_tokens, **kwargs))
        return super().forward(src_tokens, **kwargs)


# ------------------------------------------------------------------ architectures
# fairseq's base_lm_architecture forces Pre-LN; these set the same sizes and keep Post-LN.


def _post_ln(args, *, dim: int, ffn: int, layers: int, heads: int, activation: str = "relu",
             attention_dropout: float = 0.0) -> None:
    fill_defaults(args, AdminConfig, MoEConfig)  # a checkpoint's configuration from before a flag existed
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", dim)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", ffn)
    args.decoder_layers = safe_getattr(args, "decoder_layers", layers)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", heads)
    args.activation_fn = safe_getattr(args, "activation_fn", activation)
    args.attention_dropout = safe_getattr(args, "attention_dropout", attention_dropout)
    args.dropout = safe_getattr(args, "dropout", 0.1)
    args.decoder_input_dim = safe_getattr(args, "decoder_input_dim", args.decoder_embed_dim)
    args.decoder_output_dim = safe_getattr(args, "decoder_output_dim", args.decoder_embed_dim)


@register_architecture_once("transformer_lm_admin", "transformer_lm_admin_gpt")
def transformer_lm_admin_gpt(args):
    """GPT (768 / 3072 / 12 layers / 12 heads, GELU), Post-LN with Admin."""
    _post_ln(args, dim=768, ffn=3072, layers=12, heads=12, activation="gelu", attention_dropout=0.1)


@register_architecture_once("transformer_lm_admin", "transformer_lm_admin_gpt2_small")
def transformer_lm_admin_gpt2_small(args):
    """GPT-2 small as fairseq names it (1024 / 4096 / 24 layers / 16 heads, GELU), Post-LN with Admin."""
    _post_ln(args, dim=1024, ffn=4096, layers=24, heads=16, activation="gelu", attention_dropout=0.1)


@register_architecture_once("transformer_lm_admin", "transformer_lm_admin_gpt2_medium")
def transformer_lm_admin_gpt2_medium(args):
    """GPT-2 medium (1280 / 5120 / 36 layers / 20 heads, GELU), Post-LN with Admin."""
    _post_ln(args, dim=1280, ffn=5120, layers=36, heads=20, activation="gelu", attention_dropout=0.1)


@register_architecture_once("transformer_lm_admin", "transformer_lm_admin_gpt2_big")
def transformer_lm_admin_gpt2_big(args):
    """GPT-2 big (1600 / 6400 / 48 layers / 25 heads, GELU), Post-LN with Admin."""
    _post_ln(args, dim=1600, ffn=6400, layers=48, heads=25, activation="gelu", attention_dropout=0.1)


@register_architecture_once("transformer_lm_admin", "transformer_lm_admin_deep")
def transformer_lm_admin_deep(args):
    """The stability setting: 24 layers at 256 / 1024 / 4 heads, where plain Post-LN stalls."""
    _post_ln(args, dim=256, ffn=1024, layers=24, heads=4)
