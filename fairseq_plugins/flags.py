"""A bad value of a plugin flag ends a fairseq tool with one line and exit status 2, before any data loads.

Each plugin declares its flags once (a fairseq dataclass) and registers a check with `flag_check`. The
checks run once, on the fully parsed arguments at the end of ``options.parse_args_and_arch`` (after the
architecture function of ``--arch``) in every tool (train, generate, validate, interactive, eval-lm), before the
task, the model or any data is set up (the repair [`fairseq_plugins.repairs.flag_checks`][fairseq_plugins.repairs.flag_checks]);
``build_model`` checks nothing. A check validates a value with the libraries' validator and the
flag's name (`check_flag`), so the bound is written once, and raises `FlagError` naming the flag and the
accepted values, e.g.:

    fairseq-train: error: --sign-beta must be a finite real number in [0, 1), got 1.5

Unhandled `FlagError` and `DataError` (an empty or fully filtered training set) are printed as that one
line (exit status 2 for a flag, 1 for data; the repair
[`fairseq_plugins.repairs.one_line_errors`][fairseq_plugins.repairs.one_line_errors]) instead of a 50-line traceback.
Called from Python, both are plain ``ValueError`` subclasses.
"""

import argparse
import dataclasses
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional


__all__ = ["FlagError", "DataError", "flag_check", "check_args", "check_flag", "library_check", "declared_defaults",
           "fill_defaults", "declared_values", "one_line_errors", "one_line_status"]


class FlagError(ValueError):
    """A plugin flag has a bad value (the message names the flag and the accepted values)."""


class DataError(ValueError):
    """The data cannot be trained on (an empty or fully filtered split): the message says which and why."""


_CHECKS: List[Callable[[argparse.Namespace], None]] = []


def flag_check(fn: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """Decorator: run ``fn(args)`` on every parsed command line (it returns quietly for args it does not concern)."""
    if fn.__qualname__ not in {c.__qualname__ for c in _CHECKS}:  # a re-imported module registers once
        _CHECKS.append(fn)
    return fn


def check_args(args: argparse.Namespace) -> None:
    """Run every registered check; the first failure raises `FlagError`."""
    for check in _CHECKS:
        check(args)


def check_flag(flag: str, check: Callable, value, **bounds):
    """``check(flag, value, **bounds)`` (a [`toolbox_core.validation`][toolbox_core.validation] helper) with its
    TypeError/ValueError turned into `FlagError`; the message starts with the flag."""
    try:
        return check(flag, value, **bounds)
    except (TypeError, ValueError) as err:
        raise FlagError(str(err)) from None


def library_check(flags: Dict[str, str], check: Callable, *args, **kwargs):
    """``check(*args, **kwargs)`` (a library's own validation: a constructor, a factory) with its TypeError/ValueError
    turned into `FlagError`, the library's argument name at the start of the message replaced by its flag from
    ``flags`` (``{"beta": "--sign-beta"}``): the library owns the bound, the plugin only names the flag.

        >>> def scale(beta):
        ...     if not 0 <= beta < 1:
        ...         raise ValueError(f"beta must be in [0, 1), got {beta}")
        >>> library_check({"beta": "--sign-beta"}, scale, 1.5)
        Traceback (most recent call last):
        fairseq_plugins.flags.FlagError: --sign-beta must be in [0, 1), got 1.5
    """
    try:
        return check(*args, **kwargs)
    except (TypeError, ValueError) as err:
        message = str(err)
        name = message.split(" ", 1)[0]
        raise FlagError(flags[name] + message[len(name):] if name in flags else message) from None


def declared_defaults(*declarations: type) -> Dict[str, Any]:
    """``field -> default`` of fairseq dataclasses (the flags' one declaration), ``_name`` left out.

        >>> from fairseq_plugins.moe_ffn import MoEConfig
        >>> declared_defaults(MoEConfig)["moe_experts"]
        0
    """
    return {f.name: f.default for d in declarations for f in dataclasses.fields(d) if f.name != "_name"}


def fill_defaults(args, *declarations: type) -> None:
    """What an architecture function does (the one place a model's defaults are filled): set each field of
    ``declarations`` that ``args`` lacks (absent or None) to its declared default. fairseq opens an OmegaConf
    config for the architecture function, so ``args`` may be a Namespace or such a config."""
    for name, default in declared_defaults(*declarations).items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)


def declared_values(args, *declarations: type) -> SimpleNamespace:
    """The fields of ``declarations`` as ``args`` gives them, the declared default where it gives none, leaving
    ``args`` unchanged: what a check reads (a dataclass model's parsed command line holds only the flags given;
    fairseq fills the others from the dataclass after the checks ran).

        >>> from fairseq_plugins.moe_ffn import MoEConfig
        >>> declared_values(argparse.Namespace(moe_experts=4), MoEConfig).moe_router
        'sparsemixer'
    """
    return SimpleNamespace(**{name: default if getattr(args, name, None) is None else getattr(args, name)
                              for name, default in declared_defaults(*declarations).items()})


# exception type -> exit status of the one-line report; like argparse, 2 for a bad command line
_ONE_LINE: Dict[type, int] = {FlagError: 2, DataError: 1}


def one_line_errors(*types: type, status: int) -> None:
    """Report unhandled exceptions of ``types`` as one ``<prog>: error: ...`` line, exit ``status``.

    The report itself is the repair [`fairseq_plugins.repairs.one_line_errors`][fairseq_plugins.repairs.one_line_errors],
    installed by ``import fairseq_plugins``; this only records the types.
    """
    for t in types:
        _ONE_LINE[t] = status


def one_line_status(exc_type: type) -> Optional[int]:
    """The exit status of a one-line report of ``exc_type``, or None (a traceback, as usual)."""
    return next((code for t, code in _ONE_LINE.items() if issubclass(exc_type, t)), None)
