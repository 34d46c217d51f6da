"""Give ``fairseq-train`` the ``--stability-monitor`` flags, which no fairseq hook can add.

fairseq-fixed 0.12.3.1 has no argparse hook for a plugin's training-loop flags: the ``--user-dir`` is imported
inside ``options.get_parser`` before the training parser exists, and afterwards only the chosen model, task,
optimizer, criterion... add arguments. ``fairseq.options.get_training_parser`` calls
``options.add_checkpoint_args`` after that import and looks it up at call time, so `install` wraps
``add_checkpoint_args`` to add the flags of [`fairseq_plugins.monitor`][fairseq_plugins.monitor]
([`add_monitor_args`][fairseq_plugins.monitor.add_monitor_args]) to the training parser. They are not in
fairseq's dataclass configuration (``convert_namespace_to_omegaconf`` drops them): the flag check
[`check_monitor_flags`][fairseq_plugins.monitor.check_monitor_flags] records them in the environment.
"""

import functools

from ._wrap import wrap_once

__all__ = ["install"]


def _wrap_add_checkpoint_args(add_checkpoint_args):
    @functools.wraps(add_checkpoint_args)
    def add_checkpoint_and_monitor_args(parser, *args, **kwargs):
        from .. import monitor  # imported with the other registrations, after the repairs are installed

        out = add_checkpoint_args(parser, *args, **kwargs)
        monitor.add_monitor_args(parser)
        return out

    add_checkpoint_and_monitor_args._stability_monitor = True
    return add_checkpoint_and_monitor_args


def install() -> None:
    """Wrap ``fairseq.options.add_checkpoint_args`` (idempotent)."""
    import fairseq.options

    wrap_once(fairseq.options, "add_checkpoint_args", _wrap_add_checkpoint_args)
