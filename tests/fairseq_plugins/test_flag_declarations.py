"""Every plugin flag is declared once, as a field of a fairseq dataclass with its help and default; the
args-based ``transformer_admin`` generates its argparse flags from the same fields as the dataclass models."""

import argparse
import dataclasses

import fairseq_plugins  # noqa: F401  (registers the models)
from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY
from fairseq_plugins.admin import AdminConfig, TransformerAdminConfig
from fairseq_plugins.criterions.zloss import ZLossConfig
from fairseq_plugins.moe_ffn import MOE_DEFAULTS, MoEConfig


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


def test_the_language_model_architectures_fill_the_declared_defaults():
    """A language model's --arch function fills the Admin and --moe-* defaults (a checkpoint's configuration from
    before a flag existed); build_model then only builds."""
    for arch in ("transformer_lm_admin_deep", "transformer_lm_admin_gpt"):
        args = argparse.Namespace(admin_init="deepnorm")
        ARCH_CONFIG_REGISTRY[arch](args)
        want = {flag[2:].replace("-", "_"): default for flag, (_, default) in declared(AdminConfig, MoEConfig).items()}
        assert {name: getattr(args, name) for name in want} == {**want, "admin_init": "deepnorm"}, arch


def test_a_command_line_is_given_defaults_by_the_architecture_and_checked_once(monkeypatch):
    """fairseq-train's path for transformer_admin, counted: parsing applies the --arch function (the one place
    defaults are filled) and the flag checks (once); fairseq's models.build_model applies the --arch function to
    the model's configuration again, as for every args-based model; the model's build_model neither fills nor
    checks."""
    import collections
    from types import SimpleNamespace

    from fairseq import models, options
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from fairseq_plugins import admin, flags

    calls = collections.Counter()

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(admin, "fill_defaults", counted("fill", admin.fill_defaults))
    monkeypatch.setattr(flags, "_CHECKS", [counted(check.__qualname__, check) for check in flags._CHECKS])
    argv = ["data-bin", "--task", "translation", "--arch", "transformer_admin", "--encoder-layers", "1",
            "--decoder-layers", "1", "--share-all-embeddings", "--optimizer", "adam", "--moe-experts", "2",
            "--criterion", "label_smoothed_cross_entropy_moe"]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    checks = {name for name in calls if name != "fill"}
    assert "check_transformer_admin_flags" in checks and len(checks) == len(flags._CHECKS)
    assert calls == {"fill": 1, **{name: 1 for name in checks}}
    cfg = convert_namespace_to_omegaconf(args)
    d = Dictionary()
    models.build_model(cfg.model, SimpleNamespace(source_dictionary=d, target_dictionary=d))
    assert calls == {"fill": 2, **{name: 1 for name in checks}}
