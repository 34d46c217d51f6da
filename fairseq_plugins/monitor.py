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
fairseq dataclass holds them) and checked by `check_monitor_flags`, which records them in the environment
(``FAIRSEQ_STABILITY_MONITOR``) that spawned ranks inherit. Two repairs, installed by ``import fairseq_plugins``,
connect them to fairseq: [`fairseq_plugins.repairs.monitor_flags`][fairseq_plugins.repairs.monitor_flags] adds the
flags to the training parser and [`fairseq_plugins.repairs.monitor_train_step`][fairseq_plugins.repairs.monitor_train_step]
runs the monitor around ``Trainer.train_step``.

A bad value ends the tool with one line naming the flag, exit status 2 (`FlagError`).
"""

import argparse
import atexit
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from toolbox_core import validation
from stability_toolbox.hooks import wrap_hooks
from stability_toolbox.monitor import StabilityMonitor

from .flags import FlagError, check_flag, flag_check
from .modules import layer_kinds  # noqa: F401  (registers fairseq's layers: the monitor finds them)

__all__ = ["add_monitor_args", "check_monitor_flags", "monitor_of", "monitor_config", "make_monitor",
           "feed_output_logits", "ENV", "DEFAULT_INTERVAL"]

logger = logging.getLogger(__name__)

#: the environment variable holding the parsed flags (JSON), inherited by spawned ranks
ENV = "FAIRSEQ_STABILITY_MONITOR"
DEFAULT_INTERVAL = 100


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
    """Validate the monitor flags of a parsed command line and record them for the training loop."""
    directory = getattr(args, "stability_monitor", None)
    interval = getattr(args, "stability_monitor_interval", DEFAULT_INTERVAL)
    if directory is None:
        os.environ.pop(ENV, None)
        if interval not in (None, DEFAULT_INTERVAL, str(DEFAULT_INTERVAL)):
            raise FlagError("--stability-monitor-interval is accepted only with --stability-monitor DIR")
        return
    try:
        interval = int(str(interval), 10)
    except ValueError:
        raise FlagError(f"--stability-monitor-interval must be an integer >= 1, got {interval!r}") from None
    interval = check_flag("--stability-monitor-interval", validation.as_int, interval, minimum=1)
    if not str(directory).strip():
        raise FlagError("--stability-monitor must name a directory, got an empty string")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise FlagError(f"--stability-monitor {directory} exists and is not a directory")
    parent = path.resolve().parent
    if not path.exists() and not parent.is_dir():
        raise FlagError(f"--stability-monitor {directory}: directory {parent} does not exist")
    os.environ[ENV] = json.dumps({"dir": str(path.resolve()), "interval": interval})


def monitor_config() -> Optional[dict]:
    """The flags `check_monitor_flags` recorded for this process (``{"dir": ..., "interval": ...}``), or None."""
    raw = os.environ.get(ENV)
    return json.loads(raw) if raw else None


def _unwrap(model):
    # DDP and fairseq's legacy wrappers keep the model in .module
    while hasattr(model, "module") and not hasattr(model, "encoder") and not hasattr(model, "decoder"):
        model = model.module
    return model


def monitor_of(trainer) -> Optional[StabilityMonitor]:
    """The monitor a fairseq ``Trainer`` runs (created on its first ``train_step``), or None."""
    return getattr(trainer, "_stability_monitor", None)


def make_monitor(trainer, cfg: dict) -> StabilityMonitor:
    """The monitor of a fairseq ``Trainer`` for the recorded flags ``cfg`` (one directory per rank), closed at exit."""
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


