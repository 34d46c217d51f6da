"""Give ``fairseq-train`` the plugins' training-loop flags, and carry them to the training's configuration.

fairseq-fixed 0.12.3.1 has no argparse hook for a plugin's training-loop flags: the ``--user-dir`` is imported
inside ``options.get_parser`` before the training parser exists, and afterwards only the chosen model, task,
optimizer, criterion... add arguments. Nor would such flags reach the training: ``fairseq_cli.train`` turns the
parsed arguments into its configuration with ``convert_namespace_to_omegaconf``, which keeps the fields of
fairseq's dataclasses only (an args-based model, task or optimizer gets a Namespace of every flag, a
dataclass-configured one, e.g. ``transformer_lm``, does not), and that configuration is all the ``Trainer`` and
the ranks fairseq spawns see. `install` wraps

* ``fairseq.options.add_checkpoint_args`` (which ``get_training_parser`` looks up at call time) to add the flags
  of every function registered with `register_arg_adder` to the training parser, and to it only
  (``fairseq-generate`` and ``fairseq-interactive`` also call it, run no training step, and reject the flags as
  unknown, as ``fairseq-eval-lm`` does), and
* ``fairseq.dataclass.utils.convert_namespace_to_omegaconf`` (and every fairseq module's name for it bound
  before the plugins were imported: ``fairseq_cli.train``'s, ``fairseq.trainer``'s for a ``Trainer`` built from
  a Namespace) to copy those flags from the parsed arguments into ``cfg.common``,

so a feature reads its flags from the trainer's configuration (`flag_value`) on every rank: fairseq's
``distributed_utils.call_main`` hands that configuration to the ranks it spawns, and a rank started by a
launcher parses its own command line. Nothing goes through the environment.

    >>> import argparse
    >>> def add_demo_args(parser):
    ...     parser.add_argument("--demo-flag", default=None)
    >>> register_arg_adder(add_demo_args) is add_demo_args
    True
    >>> "demo_flag" in carried_flags()
    True
    >>> _ADDERS.pop("fairseq_plugins.repairs.training_flags.add_demo_args") is add_demo_args
    True
"""

import argparse
import functools
import sys
from typing import Any, Callable, Dict, Set

from ._wrap import wrap_once

__all__ = ["install", "register_arg_adder", "carried_flags", "flag_value"]

#: the top-level packages whose modules may have bound ``convert_namespace_to_omegaconf`` before `install`
_FAIRSEQ = ("fairseq", "fairseq_cli")

#: ``module.qualname -> add_args(parser)``: the training-loop flags of the features, in registration order
_ADDERS: Dict[str, Callable[[argparse.ArgumentParser], None]] = {}


def register_arg_adder(add_args: Callable[[argparse.ArgumentParser], None]) -> Callable:
    """Register ``add_args(parser)``, which adds a feature's training-loop flags (once per function; returns it)."""
    _ADDERS.setdefault(f"{add_args.__module__}.{add_args.__qualname__}", add_args)
    return add_args


def carried_flags() -> Set[str]:
    """The ``dest`` of every registered flag: what the conversion copies into ``cfg.common``."""
    parser = argparse.ArgumentParser(add_help=False)
    for add_args in _ADDERS.values():
        add_args(parser)
    return {action.dest for action in parser._actions}


def flag_value(cfg: Any, name: str, default: Any = None) -> Any:
    """The carried flag ``name`` of a fairseq configuration (``cfg.common.<name>``), or ``default`` when the
    configuration does not hold it (made without the plugins' training parser, e.g. by ``fairseq-hydra-train``)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return OmegaConf.select(cfg, f"common.{name}", default=default)
    return getattr(getattr(cfg, "common", None), name, default)


def _is_training_parser(parser: argparse.ArgumentParser) -> bool:
    """Whether ``parser`` is ``get_training_parser``'s: ``fairseq-generate`` and ``fairseq-interactive`` call
    ``add_checkpoint_args`` too, but run no training step, so a training-loop flag there would be accepted and do
    nothing; only the training parser has fairseq's optimization flags (``--max-update``) by then."""
    return any("--max-update" in action.option_strings for action in parser._actions)


def _adding_flags(add_checkpoint_args: Callable) -> Callable:
    @functools.wraps(add_checkpoint_args)
    def add_checkpoint_and_plugin_args(parser, *args, **kwargs):
        out = add_checkpoint_args(parser, *args, **kwargs)
        if _is_training_parser(parser):
            for add_args in _ADDERS.values():
                add_args(parser)
        return out

    return add_checkpoint_and_plugin_args


def _carrying_flags(convert: Callable) -> Callable:
    @functools.wraps(convert)
    def convert_namespace_to_omegaconf(args, *more, **kwargs):
        cfg = convert(args, *more, **kwargs)
        carried = {name: getattr(args, name) for name in sorted(carried_flags()) if hasattr(args, name)}
        if carried:
            from omegaconf import open_dict

            with open_dict(cfg):
                for name, value in carried.items():
                    cfg.common[name] = value
        return cfg

    return convert_namespace_to_omegaconf


def install() -> None:
    """Wrap ``fairseq.options.add_checkpoint_args`` and ``convert_namespace_to_omegaconf`` (idempotent)."""
    import fairseq.options
    from fairseq.dataclass import utils as dataclass_utils

    wrap_once(fairseq.options, "add_checkpoint_args", _adding_flags)
    wrap_once(dataclass_utils, "convert_namespace_to_omegaconf", _carrying_flags)
    # the modules imported before the plugins bound fairseq's function under their own name: fairseq_cli.train
    # (fairseq-train's conversion), fairseq.trainer (a Trainer built from a Namespace), fairseq.checkpoint_utils...
    for name, module in list(sys.modules.items()):
        bound = getattr(module, "convert_namespace_to_omegaconf", None) if name.split(".")[0] in _FAIRSEQ else None
        if getattr(bound, "__module__", None) == dataclass_utils.__name__:
            wrap_once(module, "convert_namespace_to_omegaconf", _carrying_flags)
