"""A bad value of a plugin flag ends a fairseq tool with one line and exit status 2, before any data loads.

Each plugin declares its flags once (a fairseq dataclass) and registers a check with `flag_check`. The
checks run on the fully parsed arguments right after fairseq applies the architecture function of
``--arch`` (the repair [`fairseq_plugins.repairs.flag_checks`][fairseq_plugins.repairs.flag_checks]), which is the end of
``options.parse_args_and_arch`` in every tool (train, generate, validate, interactive, eval-lm), before the
task, the model or any data is set up. A check validates a value with the libraries' validator and the
flag's name (`check_flag`), so the bound is written once, and raises `FlagError` naming the flag and the
accepted values, e.g.:

    fairseq-train: error: --sign-beta must be a finite real number in [0, 1), got 1.5

Unhandled `FlagError` and `DataError` (an empty or fully filtered training set) are printed as that one
line (exit status 2 for a flag, 1 for data; the repair
[`fairseq_plugins.repairs.one_line_errors`][fairseq_plugins.repairs.one_line_errors]) instead of a 50-line traceback.
Called from Python, both are plain ``ValueError`` subclasses.
"""

import argparse
from typing import Callable, Dict, List, Optional


__all__ = ["FlagError", "DataError", "flag_check", "check_args", "check_flag", "one_line_errors", "one_line_status"]


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
