"""Run the plugins' flag checks once, on every parsed command line, before any data loads.

fairseq-fixed 0.12.3.1 has no hook for a plugin to check its flags: the first plugin code that sees a bad
value is the model's or optimizer's constructor, after the data is loaded (minutes into a run), and its
``ValueError`` comes out as a traceback. Every tool (train, generate, validate, interactive, eval-lm) parses
its command line with ``options.parse_args_and_arch``, which ends by applying the architecture function of
``--arch`` (the defaults) and fairseq's own post-processing; the tools look it up at call time. `install`
wraps it: right after it, every check registered with
[`fairseq_plugins.flags.flag_check`][fairseq_plugins.flags.flag_check] runs once on the parsed arguments.
A model's configuration that fairseq builds later (``models.build_model``, a checkpoint's) is not checked
again: the checks belong to the command line.
"""

import functools
from typing import Callable

from .. import flags
from ._wrap import wrap_once

__all__ = ["install"]


def _parse_then_check(parse_args_and_arch: Callable) -> Callable:
    @functools.wraps(parse_args_and_arch)
    def parse_args_and_arch_then_check(parser, input_args=None, parse_known=False, suppress_defaults=False,
                                       modify_parser=None):
        out = parse_args_and_arch(parser, input_args, parse_known, suppress_defaults, modify_parser)
        if not suppress_defaults:  # that parse calls this one without it first: the full arguments are checked
            flags.check_args(out[0] if parse_known else out)
        return out

    return parse_args_and_arch_then_check


def install() -> None:
    """Wrap fairseq's ``options.parse_args_and_arch`` (idempotent)."""
    from fairseq import options

    wrap_once(options, "parse_args_and_arch", _parse_then_check)
