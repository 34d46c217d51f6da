"""``fairseq-train --stability-monitor DIR``: the live stability monitor for any fairseq architecture.

    fairseq-train data-bin --user-dir fairseq_plugins --arch transformer ... \\
        --stability-monitor runs/mon --stability-monitor-interval 100

records every ``--stability-monitor-interval`` updates (default 100) the per-layer quantities of
[`stability_toolbox.StabilityMonitor`][stability_toolbox.StabilityMonitor] (residual-branch ratio, output change, gradient norm,
update/weight ratio, activation range, attention-logit maximum, loss spikes, and ``log_z`` / ``log_z_rms`` of the
output logits, handed over by `feed_output_logits`) and writes under DIR:
``monitor.jsonl``, TensorBoard scalars (``tb/``), ``summary.md`` and ``heatmap_<quantity>.png`` at the
end of training (with several ranks: ``DIR/rank<R>``). A quantity trending toward divergence logs one
``stability warning: ...`` line in the training log (logger ``fairseq_plugins.monitor``).

The layers are found through the descriptions `fairseq_plugins.fold_checkpoint` folds with
(`fairseq_plugins.modules.layer_kinds`, in admin_torch's registry): stock ``transformer`` /
``transformer_lm`` layers, Post-LN or Pre-LN (``--*-normalize-before``), and ``transformer_admin`` /
``transformer_lm_admin`` through their residual modules; other architectures fall back to their
LayerNorms.

The flags are declared here (`add_monitor_args`; plain argparse: they belong to no fairseq component, so no
fairseq dataclass holds them) and checked by `check_monitor_flags` at parsing, which writes the parsed values back
on the arguments. This module registers two things into the generic repairs that ``import fairseq_plugins``
installs: the flags ([`training_flags`][fairseq_plugins.repairs.training_flags] adds them to the training parser
and carries them on fairseq's configuration, ``cfg.common``, to every rank) and `monitored_step`
([`train_step`][fairseq_plugins.repairs.train_step] runs it around ``Trainer.train_step``), which reads them from
the trainer's configuration.

A bad value ends the tool with one line naming the flag, exit status 2 (`FlagError`).
"""

import argparse
import atexit
import logging
from pathlib import Path
from typing import Optional

import torch

from stability_toolbox.inert_hooks import wrap_hooks
from stability_toolbox.monitor import StabilityMonitor

from .flags import FlagError, flag_check, library_check
from .modules import layer_kinds  # noqa: F401  (registers fairseq's layers: the monitor finds them)
from .repairs.train_step import feature_of, register_step_wrapper
from .repairs.training_flags import flag_value, register_arg_adder

__all__ = ["add_monitor_args", "check_monitor_flags", "monitor_of", "monitor_settings", "make_monitor",
           "monitored_step", "feed_output_logits", "DEFAULT_INTERVAL"]

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL = 100


@register_arg_adder
def add_monitor_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--stability-monitor`` and ``--stability-monitor-interval`` (once) to ``parser``."""
    if any("--stability-monitor" in a.option_strings for a in parser._actions):
        return
    group = parser.add_argument_group("stability monitor (fairseq_plugins)")
    group.add_argument("--stability-monitor", metavar="DIR", default=None,
                       help="record per-layer stability quantities (residual ratio, output change, gradient norm, "
                            "update ratio, activation range, attention logits, loss spikes) under DIR")
    group.add_argument("--stability-monitor-interval", metavar="N", default=DEFAULT_INTERVAL,
                       help=f"log every N updates (default {DEFAULT_INTERVAL})")


@flag_check
def check_monitor_flags(args) -> None:
    """Validate the monitor flags of a parsed command line and write the parsed values back on ``args`` (the
    directory made absolute, the interval an int), from where fairseq's configuration carries them."""
    directory = getattr(args, "stability_monitor", None)
    interval = getattr(args, "stability_monitor_interval", DEFAULT_INTERVAL)
    if directory is None:
        if interval not in (None, DEFAULT_INTERVAL, str(DEFAULT_INTERVAL)):
            raise FlagError("--stability-monitor-interval is accepted only with --stability-monitor DIR")
        return
    try:
        interval = int(str(interval), 10)
    except ValueError:
        raise FlagError(f"--stability-monitor-interval must be an integer >= 1, got {interval!r}") from None
    # the bound is the library's: a monitor built on a probe with this interval (its `every`) checks it
    library_check({"every": "--stability-monitor-interval"}, _probe_monitor, interval)
    if not str(directory).strip():
        raise FlagError("--stability-monitor must name a directory, got an empty string")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise FlagError(f"--stability-monitor {directory} exists and is not a directory")
    parent = path.resolve().parent
    if not path.exists() and not parent.is_dir():
        raise FlagError(f"--stability-monitor {directory}: directory {parent} does not exist")
    args.stability_monitor, args.stability_monitor_interval = str(path.resolve()), interval


def _probe_monitor(every: int) -> None:
    """Build (and remove) a monitor with ``every`` on a LayerNorm probe: the library checks the bound."""
    StabilityMonitor(torch.nn.LayerNorm(1), every=every, signal_rules=[]).remove()


def monitor_settings(cfg) -> Optional[dict]:
    """``{"dir": ..., "interval": ...}`` of a fairseq configuration (the flags as `check_monitor_flags` left them),
    or None without ``--stability-monitor``."""
    directory = flag_value(cfg, "stability_monitor")
    if directory is None:
        return None
    return {"dir": directory, "interval": int(flag_value(cfg, "stability_monitor_interval", DEFAULT_INTERVAL))}


def _unwrap(model):
    # DDP and fairseq's legacy wrappers keep the model in .module
    while hasattr(model, "module") and not hasattr(model, "encoder") and not hasattr(model, "decoder"):
        model = model.module
    return model


def monitor_of(trainer) -> Optional[StabilityMonitor]:
    """The monitor a fairseq ``Trainer`` runs (created on its first ``train_step``), or None."""
    return getattr(trainer, "_stability_monitor", None)


def make_monitor(trainer, cfg: dict) -> StabilityMonitor:
    """The monitor of a fairseq ``Trainer`` for the settings ``cfg`` (`monitor_settings`; one directory per rank),
    closed at exit."""
    directory = Path(cfg["dir"])
    world = getattr(trainer, "data_parallel_world_size", 1)
    if world > 1:
        directory = directory / f"rank{trainer.data_parallel_rank}"
    model = _unwrap(trainer.model)
    mon = StabilityMonitor(model, directory, every=cfg["interval"], log=logger)
    feed_output_logits(model, mon)
    logger.info("stability monitor: %d sublayers via %s, every %d updates, writing to %s",
                len(mon.sites), mon.mechanism, mon.every, directory)
    atexit.register(mon.close)
    return mon


def feed_output_logits(model, mon: StabilityMonitor):
    """Hand the output logits of ``model``'s training forward passes on logged updates to
    [`mon.observe_logits`][stability_toolbox.StabilityMonitor.observe_logits] (``log_z``, ``log_z_rms``: output-logit
    divergence). fairseq's models return ``(logits, extra)`` with logits ``(batch, time, vocabulary)``; other
    outputs, evaluation passes and passes between logged updates are left alone (one attribute read). Returns
    the hook's handle (inert in a copied or pickled model)."""
    def hook(module, _args, out):
        if not mon.recording or not module.training:
            return
        logits = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.dim() == 3:
            mon.observe_logits(logits)

    handle = model.register_forward_hook(hook)
    wrap_hooks([handle])
    return handle


def monitored_step(trainer, step, samples, raise_oom=False):
    """The step wrapper of ``--stability-monitor`` (registered with the repair
    [`train_step`][fairseq_plugins.repairs.train_step]): on a logged update it arms the monitor before the step and
    reads the gradients (normalized, clipped), the update and the loss after it; on every other update it hands
    the per-update rules (`stability_toolbox.DEFAULT_SIGNAL_RULES`) their scalars, as in any other loop (no hook,
    no host-device sync). A step that raises or returns None (fairseq made no update: the counter stays) is
    discarded (`StabilityMonitor.discard_step`): nothing of it is recorded. The monitor is made on the trainer's
    first step from its configuration; without the flag it calls the step unchanged."""
    mon = feature_of(trainer, "_stability_monitor", monitor_settings, make_monitor)
    if mon is None:
        return step(samples, raise_oom)
    mon.begin_step(trainer.get_num_updates())  # hooks only on a logged update
    try:
        out = step(samples, raise_oom)
    except BaseException:
        mon.discard_step()  # a failed update logs nothing (and the error is fairseq's, not the monitor's)
        raise
    if out is None:
        # no update was made (fp16 overflow, every micro-batch out of memory, a guard's skipped non-finite step):
        # fairseq's counter stays, so recording it would log this update twice (once with no update in it)
        mon.discard_step()
        return out
    # the gradients stay in place until the next train_step zeroes them (normalized, clipped)
    mon.capture_grads()
    # the step's smoothed, normalized loss as fairseq logs it (base 2): a number, or a tensor kept on its device
    loss = out.get("loss") if isinstance(out, dict) else None
    mon.end_step(loss if loss is None or isinstance(loss, torch.Tensor) else float(loss))
    return out


register_step_wrapper("stability_monitor", monitored_step)
