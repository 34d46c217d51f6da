"""A bad value of a plugin flag ends a fairseq tool with one line and exit status 2, before any data loads.

fairseq applies the architecture function of ``--arch`` to the fully parsed arguments at the end of
``options.parse_args_and_arch`` (every tool: train, generate, validate, interactive, eval-lm), before
the task, the model or any data is set up. `install` wraps the registered architecture
functions so that, right after them, every check registered with `flag_check` runs on those
arguments. A check raises `FlagError` naming the flag and the accepted values, e.g.:

    fairseq-train: error: --sign-beta must be a finite real number in [0, 1), got 1.5

Unhandled `FlagError` and `DataError` (an empty or fully filtered training set) are
printed as that one line by a ``sys.excepthook`` (exit status 2 for a flag, 1 for data), instead of a
50-line traceback. Called from Python, both are plain ``ValueError`` subclasses.
"""

import argparse
import functools
import os
import sys
from typing import Callable, Dict, List


__all__ = ["FlagError", "DataError", "flag_check", "check_args", "check_flag", "install", "one_line_errors"]


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


def _wrap(arch_fn: Callable) -> Callable:
    if getattr(arch_fn, "_checks_flags", False):
        return arch_fn

    @functools.wraps(arch_fn)
    def arch_then_check(args):
        arch_fn(args)
        check_args(args)

    arch_then_check._checks_flags = True
    return arch_then_check


# exception type -> exit status of the one-line report; like argparse, 2 for a bad command line
_ONE_LINE: Dict[type, int] = {FlagError: 2, DataError: 1}


def one_line_errors(*types: type, status: int) -> None:
    """Report unhandled exceptions of ``types`` as one ``<prog>: error: ...`` line, exit ``status``."""
    for t in types:
        _ONE_LINE[t] = status
    _install_excepthook()


def _excepthook(previous):
    def hook(exc_type, exc, tb):
        status = next((code for t, code in _ONE_LINE.items() if issubclass(exc_type, t)), None)
        if status is None:
            return previous(exc_type, exc, tb)
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fairseq"
        sys.stdout.flush()
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        # SystemExit from an excepthook sets the exit status; finally blocks have run and atexit handlers run
        raise SystemExit(status)

    hook._one_line = True
    return hook


def _install_excepthook() -> None:
    if not getattr(sys.excepthook, "_one_line", False):
        sys.excepthook = _excepthook(sys.excepthook)


def install() -> None:
    """Wrap the registered architecture functions and install the one-line excepthook (idempotent)."""
    from fairseq.models import ARCH_CONFIG_REGISTRY

    for name, fn in list(ARCH_CONFIG_REGISTRY.items()):
        ARCH_CONFIG_REGISTRY[name] = _wrap(fn)
    _install_excepthook()


