"""The Admin flags of ``transformer_admin`` and ``transformer_lm_admin``: declared once, defaults, checks.

The flags are the fields of `AdminConfig` (both models) and `TransformerAdminConfig` (an encoder-decoder
adds ``--encoder-as-parameter``), fairseq dataclasses with their help: ``transformer_lm_admin``'s config
inherits them (with `fairseq_plugins.moe.MoEConfig`'s ``--moe-*``), and the args-based
``transformer_admin`` generates its argparse flags from them (`add_admin_args`). `admin_defaults` fills what
a command line left out from the same fields.

`check_admin_args` checks the values (one line naming the flag, before any data loads, through
`fairseq_plugins.flags`): the choices with the libraries' validator and the flag's name, then what is
refused in combination (Pre-LN, DeepNorm with trainable omegas, ``--admin-profile`` without profiling).
"""

import os
from dataclasses import dataclass, field, fields
from typing import Optional

import admin_torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass

from toolbox_core import validation

from .flags import FlagError, check_flag, flag_check
from .moe import add_moe_args, check_moe_args, moe_defaults

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


_ADMIN_FIELDS = [f for f in fields(TransformerAdminConfig) if f.name != "_name"]


def admin_defaults(args) -> None:
    """Fill the admin (and ``--moe-*``) arguments a model configuration lacks (an args Namespace, a
    TransformerConfig, or a dataclass config whose fields are not all admin arguments: a language model
    has no encoder), with `TransformerAdminConfig`'s defaults."""
    moe_defaults(args)
    for f in _ADMIN_FIELDS:
        value = getattr(args, f.name, None)
        if value is None or (f.type is bool and not isinstance(value, bool)):
            value = f.default if value is None else bool(value)
            try:
                setattr(args, f.name, value)
            except Exception:  # an OmegaConf struct config without that key: it keeps its own default
                pass


def check_admin_args(args) -> None:
    """The admin flags of a parsed command line or model Namespace; `FlagError` names the flag."""
    admin_defaults(args)
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
    """Run `check_admin_args` on command lines whose ``--arch`` is an Admin model's architecture."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    from .modules.admin_profiling import AdminProfiling

    model = ARCH_MODEL_REGISTRY.get(getattr(args, "arch", None))
    if isinstance(model, type) and issubclass(model, AdminProfiling):
        check_admin_args(args)
