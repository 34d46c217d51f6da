"""Give ``fairseq-train`` the ``--stability-guard`` flags, which no fairseq hook can add.

The same gap as [`fairseq_plugins.repairs.monitor_flags`][fairseq_plugins.repairs.monitor_flags] (fairseq-fixed
0.12.3.1 has no argparse hook for a plugin's training-loop flags): `install` wraps
``fairseq.options.add_checkpoint_args`` to add the flags of [`fairseq_plugins.guard`][fairseq_plugins.guard]
([`add_guard_args`][fairseq_plugins.guard.add_guard_args]) to the training parser; the flag check
[`check_guard_flags`][fairseq_plugins.guard.check_guard_flags] records them in the environment.
"""

import functools

from ._wrap import wrap_once

__all__ = ["install"]


def _wrap_add_checkpoint_args(add_checkpoint_args):
    @functools.wraps(add_checkpoint_args)
    def add_checkpoint_and_guard_args(parser, *args, **kwargs):
        from .. import guard  # imported with the other registrations, after the repairs are installed

        out = add_checkpoint_args(parser, *args, **kwargs)
        guard.add_guard_args(parser)
        return out

    add_checkpoint_and_guard_args._stability_guard = True
    return add_checkpoint_and_guard_args


def install() -> None:
    """Wrap ``fairseq.options.add_checkpoint_args`` (idempotent)."""
    import fairseq.options

    wrap_once(fairseq.options, "add_checkpoint_args", _wrap_add_checkpoint_args)
