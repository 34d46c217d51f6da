"""The Admin flags of ``transformer_admin`` and ``transformer_lm_admin``: declared once, defaults, checks.

The flags are the fields of `AdminConfig` (both models) and `TransformerAdminConfig` (an encoder-decoder
adds ``--encoder-as-parameter``), fairseq dataclasses with their help: ``transformer_lm_admin``'s config
inherits them (with `fairseq_plugins.moe_ffn.MoEConfig`'s ``--moe-*``), and the args-based
``transformer_admin`` generates its argparse flags from them (`add_admin_args`).

Each thing is done in one place, as fairseq does it:

* defaults: the architecture function (``transformer_admin``'s call `admin_defaults`, from the same fields;
  ``transformer_lm_admin``'s fairseq fills from its dataclass);
* checks: `check_admin_args`, run by the flag check `check_transformer_admin_flags` once, on the parsed
  command line after the architecture function (one line naming the flag, before any data loads, through
  `fairseq_plugins.flags`): the choices with the libraries' validator and the flag's name, then what is
  refused in combination (Pre-LN, DeepNorm with trainable omegas, ``--admin-profile`` without profiling);
* ``build_model`` only builds: it neither fills nor checks.
"""

import os
from dataclasses import dataclass, field
from typing import Optional

import admin_torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass

from toolbox_core import validation

from .flags import FlagError, check_flag, declared_values, fill_defaults, flag_check
from .moe_ffn import MoEConfig, add_moe_args, check_moe_args

__all__ = ["ADMIN_INITS", "ADMIN_ARGS", "AdminConfig", "TransformerAdminConfig", "add_admin_args", "admin_defaults",
           "check_admin_args", "check_transformer_admin_flags"]

#: the values of ``--admin-init``.
ADMIN_INITS = ("admin", "profiled", "deepnorm")
#: the model arguments ``transformer_admin`` adds to the stock transformer's (removed by folding).
ADMIN_ARGS = ("admin_init", "admin_output_change_scale", "encoder_as_parameter", "decoder_as_parameter", "admin_profile")


@dataclass
class AdminConfig(FairseqDataclass):
    """The Admin flags every Admin model takes (a decoder-only model has no encoder)."""

    admin_init: ChoiceEnum(list(ADMIN_INITS)) = field(  # type: ignore[valid-type]
        default="admin",
        metadata={"help": "omega initialization: closed-form Admin (default), profiled Admin, or DeepNorm"})
    admin_output_change_scale: ChoiceEnum(list(admin_torch.OUTPUT_CHANGE_SCALES)) = field(  # type: ignore[valid-type]
        default="O(logn)", metadata={"help": "closed-form Admin's output change scale (default O(logn))"})
    decoder_as_parameter: bool = field(
        default=False, metadata={"help": "decoder omegas are trainable vectors of size decoder_embed_dim"})
    admin_profile: Optional[str] = field(
        default=None, metadata={"help": "profiled Admin: read the omegas from this JSON file if it exists, "
                                        "otherwise profile on the first training batch and write them there"})
    qk_norm: bool = field(
        default=False, metadata={"help": "qk-layernorm: a LayerNorm on each head's queries and keys in every "
                                         "attention (Wortsman et al. 2023's remedy for attention-logit growth)"})


@dataclass
class TransformerAdminConfig(AdminConfig):
    """The Admin flags of an encoder-decoder model."""

    encoder_as_parameter: bool = field(
        default=False, metadata={"help": "encoder omegas are trainable vectors of size encoder_embed_dim"})


def add_admin_args(parser) -> None:
    """The Admin and ``--moe-*`` flags of the args-based ``transformer_admin`` (its ``add_args``), generated
    from `TransformerAdminConfig` as fairseq generates a dataclass model's (no defaults: the architecture
    functions fill them with `admin_defaults`)."""
    group = parser.add_argument_group("Admin residual scaling (transformer_admin)")
    gen_parser_from_dataclass(group, TransformerAdminConfig(), delete_default=True)
    add_moe_args(parser)


def admin_defaults(args) -> None:
    """The architecture functions' part of ``transformer_admin`` (the one place its defaults are filled): the
    admin and ``--moe-*`` arguments ``args`` lacks get `TransformerAdminConfig`'s and `MoEConfig`'s defaults.

        >>> import argparse
        >>> args = argparse.Namespace(admin_init="deepnorm")
        >>> admin_defaults(args)
        >>> args.admin_init, args.admin_output_change_scale, args.moe_experts
        ('deepnorm', 'O(logn)', 0)
    """
    fill_defaults(args, TransformerAdminConfig, MoEConfig)


def check_admin_args(args) -> None:
    """The admin (and ``--moe-*``) flags of a parsed command line or a model configuration (a flag not given: its
    declared default); `FlagError` names the flag. ``args`` is read, not changed."""
    admin = declared_values(args, TransformerAdminConfig)
    check_flag("--admin-init", validation.as_choice, str(admin.admin_init), choices=ADMIN_INITS)
    check_flag("--admin-output-change-scale", validation.as_choice, str(admin.admin_output_change_scale),
               choices=admin_torch.OUTPUT_CHANGE_SCALES)
    if getattr(args, "encoder_normalize_before", False) or getattr(args, "decoder_normalize_before", False):
        raise FlagError(
            "--encoder-normalize-before / --decoder-normalize-before are not accepted by transformer_admin "
            "(Admin rescales the shortcut of Post-LN sublayers; use --arch transformer for Pre-LN)"
        )
    if str(admin.admin_init) == "deepnorm" and (admin.encoder_as_parameter or admin.decoder_as_parameter):
        raise FlagError(
            "--encoder-as-parameter / --decoder-as-parameter are accepted only with --admin-init admin or "
            "profiled (DeepNorm's alpha is a constant)"
        )
    profile = admin.admin_profile
    if profile is not None:
        if str(admin.admin_init) != "profiled":
            raise FlagError(f"--admin-profile is accepted only with --admin-init profiled "
                            f"(got --admin-init {admin.admin_init})")
        parent = os.path.dirname(os.path.abspath(profile))
        if not os.path.isdir(parent):
            raise FlagError(f"--admin-profile {profile}: directory {parent} does not exist")
        if os.path.isdir(profile):
            raise FlagError(f"--admin-profile {profile} is a directory; give a JSON file path")
    if getattr(args, "cross_self_attention", False):
        raise FlagError("--cross-self-attention is not accepted by transformer_admin")
    check_moe_args(args)


@flag_check
def check_transformer_admin_flags(args) -> None:
    """Run `check_admin_args` on command lines whose ``--arch`` is an Admin model's architecture."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    from .modules.admin_profiling import AdminProfiling

    model = ARCH_MODEL_REGISTRY.get(getattr(args, "arch", None))
    if isinstance(model, type) and issubclass(model, AdminProfiling):
        check_admin_args(args)
