"""Run the plugins' flag checks on every parsed command line, before any data loads.

fairseq-fixed 0.12.3.1 has no hook for a plugin to check its flags: the first plugin code that sees a bad
value is the model's or optimizer's constructor, after the data is loaded (minutes into a run), and its
``ValueError`` comes out as a traceback. The architecture function of ``--arch`` is the last thing fairseq
applies to the parsed arguments (``options.parse_args_and_arch`` in every tool, ``models.build_model`` for a
checkpoint's configuration). `install` wraps every registered architecture function, and fairseq's
``register_model_architecture`` so that the ones registered afterwards (the plugins', another user dir's)
are wrapped too: right after the architecture function, every check registered with
[`fairseq_plugins.flags.flag_check`][fairseq_plugins.flags.flag_check] runs on the arguments.
"""

import functools
from typing import Callable

from .. import flags
from ._wrap import wrap_once, wrapped_once

__all__ = ["install"]


def _checked(arch_fn: Callable) -> Callable:
    return wrapped_once(arch_fn, _arch_then_check)


def _arch_then_check(arch_fn: Callable) -> Callable:
    @functools.wraps(arch_fn)
    def arch_then_check(args):
        arch_fn(args)
        flags.check_args(args)

    return arch_then_check


def _registering_checked(register_model_architecture: Callable) -> Callable:
    @functools.wraps(register_model_architecture)
    def register_checked(model_name, arch_name):
        register = register_model_architecture(model_name, arch_name)

        def register_arch_fn(fn):
            register(_checked(fn))
            return fn  # the module keeps its own function, as with fairseq's decorator

        return register_arch_fn

    return register_checked


def install() -> None:
    """Wrap the registered architecture functions and fairseq's ``register_model_architecture`` (idempotent)."""
    from fairseq import models

    for name, fn in list(models.ARCH_CONFIG_REGISTRY.items()):
        models.ARCH_CONFIG_REGISTRY[name] = _checked(fn)
    wrap_once(models, "register_model_architecture", _registering_checked)
