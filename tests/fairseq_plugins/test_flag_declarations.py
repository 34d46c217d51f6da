"""Every plugin flag is declared once, as a field of a fairseq dataclass with its help and default; the
args-based ``transformer_admin`` generates its argparse flags from the same fields as the dataclass models."""

import argparse
import dataclasses

import fairseq_plugins  # noqa: F401  (registers the models)
from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY
from fairseq_plugins.admin import AdminConfig, TransformerAdminConfig
from fairseq_plugins.criterions.zloss import ZLossConfig
from fairseq_plugins.moe import MOE_DEFAULTS, MoEConfig


def declared(*configs):
    """``--flag -> (help, default)`` of the dataclasses' fields."""
    return {"--" + f.name.replace("_", "-"): (f.metadata["help"], f.default)
            for config in configs for f in dataclasses.fields(config) if f.name != "_name"}


def model_flags(arch):
    """``--flag -> help`` of the model's own flags, as fairseq adds them (``add_args`` on a SUPPRESS group)."""
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    ARCH_MODEL_REGISTRY[arch].add_args(parser)
    return {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}


def test_the_admin_models_take_the_declared_flags_with_their_help():
    for arch, configs in (("transformer_admin", (TransformerAdminConfig, MoEConfig)),
                          ("transformer_lm_admin", (AdminConfig, MoEConfig))):
        flags, want = model_flags(arch), declared(*configs)
        assert {flag: flags.get(flag) for flag in want} == {flag: help for flag, (help, _) in want.items()}, arch
    assert "--encoder-as-parameter" not in model_flags("transformer_lm_admin")  # a language model has no encoder


def test_defaults_come_from_the_declaration():
    assert MOE_DEFAULTS == {flag[2:].replace("-", "_"): default for flag, (_, default) in declared(MoEConfig).items()}
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    ARCH_MODEL_REGISTRY["transformer_admin"].add_args(parser)
    args = parser.parse_args([])
    ARCH_CONFIG_REGISTRY["transformer_admin"](args)  # what fairseq applies after parsing
    for flag, (_, default) in declared(TransformerAdminConfig, MoEConfig).items():
        assert getattr(args, flag[2:].replace("-", "_")) == default, flag


def test_z_loss_is_declared_once_for_both_criteria():
    for name in ("cross_entropy_zloss", "label_smoothed_cross_entropy_zloss"):
        config = CRITERION_DATACLASS_REGISTRY[name]
        assert issubclass(config, ZLossConfig) and config().z_loss == ZLossConfig().z_loss
