"""``fairseq-train --stability-guard``: the stability guard for any fairseq architecture and optimizer.

    fairseq-train data-bin --user-dir fairseq_plugins --arch transformer ... --stability-guard \\
        --stability-guard-threshold 6 --stability-guard-snapshot-every 100 --stability-guard-rewind-skip 10

puts a [`stability_toolbox.StabilityGuard`][stability_toolbox.StabilityGuard] on the trainer's optimizer at the first
update: a loss (the criterion's, per target token) or global gradient norm far above its running statistics has
its update skipped, repeated skips rewind to the last snapshot (model, optimizer, random generators; the data
moves on and the next ``--stability-guard-rewind-skip`` updates are skipped) with the learning rate backed off,
rewinds that keep coming back cut the learning rate for the rest of the run (``--stability-guard-lr-cut``, at most
``--stability-guard-max-lr-cuts`` times), and a guard that keeps triggering stops the run cleanly (fairseq saves its checkpoint and ends as at
``--max-update``) with the diagnosis in the log. fairseq's own check of non-finite gradients
(``FloatingPointError``) becomes the guard's ``nonfinite`` signal (that update is skipped) instead of ending the
run. With ``--stability-monitor`` the monitor's warnings drive the policy too (deep Post-LN: stop, "convert with
admin_torch"). Every event is one ``stability guard: ...`` line (logger ``fairseq_plugins.guard``).

The gradient-norm signal is fairseq's own: every update fairseq computes the global gradient norm
(``Trainer.clip_grad_norm``, whatever ``--clip-norm``: the norm before clipping, after the fp16 unscaling) right
before the optimizer step; `read_grad_norm`, registered with the repair
[`grad_norm`][fairseq_plugins.repairs.grad_norm], hands it to the guard
(`StabilityGuard.observe_grad_norm`), which then makes no pass of its own over the gradients.

The flags are declared here (`add_guard_args`, plain argparse as the monitor's) and checked by
`check_guard_flags` at parsing, which writes the parsed values (or the defaults) back on the arguments; each bound
and default is the library's (a guard is built on a probe with the values given, and its errors name the flag). As the
monitor, this module registers its flags and its step wrapper `guarded_step` into the generic repairs
[`training_flags`][fairseq_plugins.repairs.training_flags] (the flags in the training parser, carried on fairseq's
configuration to every rank) and [`train_step`][fairseq_plugins.repairs.train_step] (inside the monitor's
wrapper), which reads them from the trainer's configuration. A bad value ends the tool with one line naming the
flag, exit status 2.
"""

import argparse
import dataclasses
import inspect
import logging
from pathlib import Path
from typing import Any, Dict, Optional

from stability_toolbox.guard import StabilityGuard
from stability_toolbox.guard_policy import GuardPolicy

from .flags import FlagError, flag_check, library_check
from .repairs.grad_norm import register_norm_reader
from .repairs.train_step import feature_of, register_step_wrapper
from .repairs.training_flags import flag_value, register_arg_adder

__all__ = ["add_guard_args", "check_guard_flags", "guard_settings", "guard_of", "make_guard", "guarded_step",
           "read_grad_norm", "library_defaults", "OPTIONS"]

logger = logging.getLogger(__name__)

#: ``--stability-guard-<name>``: (the StabilityGuard or GuardPolicy keyword, int or float, help). The bounds and the
#: defaults are the library's: `check_guard_flags` builds a guard with the values given, and `library_defaults`
#: reads the defaults from the library's signatures.
OPTIONS: Dict[str, tuple] = {
    "threshold": ("threshold", float,
                  "a loss or gradient norm more than this many robust sigmas above its running median is a spike"),
    "window": ("window", int, "updates the running statistics span"),
    "warmup": ("warmup", int, "updates before spikes are scored"),
    "min-ratio": ("min_ratio", float,
                  "a spike must also exceed this multiple of its running median, the loss's and the gradient norm's "
                  "alike (the library's default: 1.2 for the loss, 2.0 for the gradient norm)"),
    "snapshot-every": ("snapshot_every", int, "take a snapshot (in host memory) every N updates"),
    "snapshots": ("snapshots", int, "snapshots kept"),
    "rewind-skip": ("rewind_skip", int, "updates skipped after a rewind"),
    "backoff": ("backoff", float, "learning-rate factor after a rewind"),
    "backoff-updates": ("backoff_updates", int, "updates the learning-rate backoff lasts"),
    "lr-cut": ("lr_cut", float,
               "learning-rate factor of each persistent cut (rewinds that keep coming back), for the rest of the run"),
    "max-lr-cuts": ("max_lr_cuts", int, "persistent learning-rate cuts before the guard stops the run with its diagnosis"),
}
#: the OPTIONS keywords that are GuardPolicy fields (the others are StabilityGuard's)
POLICY_KEYWORDS = ("lr_cut", "max_lr_cuts")
#: the library's argument names -> flags, for its error messages (the snapshot ring calls its size ``size``)
LIBRARY_FLAGS = {**{keyword: f"--stability-guard-{name}" for name, (keyword, _, _) in OPTIONS.items()},
                 "size": "--stability-guard-snapshots"}


def library_defaults() -> Dict[str, Any]:
    """``keyword -> default`` of every option, read from `StabilityGuard`'s and `GuardPolicy`'s signatures."""
    guard = inspect.signature(StabilityGuard.__init__).parameters
    policy = {f.name: f.default for f in dataclasses.fields(GuardPolicy)}
    return {kw: policy[kw] if kw in POLICY_KEYWORDS else guard[kw].default for kw, _, _ in OPTIONS.values()}


def _probe_guard(**config) -> None:
    """Build a guard with ``config`` on a one-parameter probe: the library checks every bound, as the run will."""
    import torch

    model = torch.nn.Linear(1, 1)
    policy = GuardPolicy(**{k: config.pop(k) for k in POLICY_KEYWORDS})
    StabilityGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), policy=policy, **config)


@register_arg_adder
def add_guard_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--stability-guard`` and its ``--stability-guard-*`` options (once) to ``parser``."""
    if any("--stability-guard" in a.option_strings for a in parser._actions):
        return
    group = parser.add_argument_group("stability guard (fairseq_plugins)")
    group.add_argument("--stability-guard", action="store_true", default=False,
                       help="skip spiking updates, rewind and back off on repeats, stop with the diagnosis when "
                            "it persists (stability_toolbox.StabilityGuard)")
    defaults = library_defaults()
    for name, (keyword, _, text) in OPTIONS.items():
        default = "" if defaults[keyword] is None else f"default {defaults[keyword]}; "  # None: in the text
        group.add_argument(f"--stability-guard-{name}", metavar="X", default=None,
                           help=f"{text} ({default}needs --stability-guard)")


def _parse(flag: str, raw: Any, kind: type):
    """The text of ``flag`` as a number of ``kind`` (its bounds are the library's)."""
    text = str(raw).strip()
    try:
        return int(text, 10) if kind is int else float(text)
    except ValueError:
        raise FlagError(f"{flag} must be {'an integer' if kind is int else 'a real number'}, got {raw!r}") from None


def _dest(name: str) -> str:
    return "stability_guard_" + name.replace("-", "_")


@flag_check
def check_guard_flags(args) -> None:
    """Validate the guard flags of a parsed command line and write the parsed values (the defaults for those not
    given) back on ``args``, from where fairseq's configuration carries them."""
    on = getattr(args, "stability_guard", False)
    given = {name: getattr(args, _dest(name), None) for name in OPTIONS}
    if not on:
        for name, raw in given.items():
            if raw is not None:
                raise FlagError(f"--stability-guard-{name} is accepted only with --stability-guard")
        return
    config = library_defaults()
    for name, raw in given.items():
        keyword, kind, _ = OPTIONS[name]
        if raw is not None:
            config[keyword] = _parse(f"--stability-guard-{name}", raw, kind)
    library_check(LIBRARY_FLAGS, _probe_guard, **config)
    for name in OPTIONS:
        setattr(args, _dest(name), config[OPTIONS[name][0]])


def guard_settings(cfg) -> Optional[dict]:
    """The StabilityGuard keywords of a fairseq configuration (the flags as `check_guard_flags` left them, and
    ``log_dir``: the ``--stability-monitor`` directory), or None without ``--stability-guard``."""
    if not flag_value(cfg, "stability_guard", False):
        return None
    defaults = library_defaults()
    settings = {keyword: flag_value(cfg, _dest(name), defaults[keyword]) for name, (keyword, _, _) in OPTIONS.items()}
    monitor_dir = flag_value(cfg, "stability_monitor")
    settings["log_dir"] = str(Path(monitor_dir).resolve()) if monitor_dir else None
    return settings


def guard_of(trainer) -> Optional[StabilityGuard]:
    """The guard a fairseq ``Trainer`` runs (created on its first ``train_step``), or None."""
    return getattr(trainer, "_stability_guard", None)


def _torch_optimizer(trainer):
    """The torch optimizer inside fairseq's wrappers (``FairseqOptimizer.optimizer``, ``FP16Optimizer``'s)."""
    import torch

    opt = trainer.optimizer  # fairseq builds it on first access
    while not isinstance(opt, torch.optim.Optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None or inner is opt:
            raise TypeError(f"--stability-guard: cannot find the torch optimizer inside {type(opt).__name__}")
        opt = inner
    return opt


def make_guard(trainer, cfg: dict) -> StabilityGuard:
    """The guard of a fairseq ``Trainer`` for the settings ``cfg`` (`guard_settings`): on the torch optimizer inside fairseq's,
    reading the criterion's loss per target token, with the monitor of ``--stability-monitor`` if any."""
    from .monitor import monitor_of

    kwargs = dict(cfg)
    log_dir = kwargs.pop("log_dir", None)
    policy = GuardPolicy(**{k: kwargs.pop(k) for k in POLICY_KEYWORDS if k in kwargs})
    world = getattr(trainer, "data_parallel_world_size", 1)
    if log_dir is not None and world > 1:
        log_dir = str(Path(log_dir) / f"rank{trainer.data_parallel_rank}")
    mon = monitor_of(trainer)
    guard = StabilityGuard(trainer.model, _torch_optimizer(trainer), policy=policy, monitor=mon,
                           log_dir=None if mon is not None else log_dir, log=logger, **kwargs)

    def read_loss(module, _args, out):
        if module.training and isinstance(out, tuple) and len(out) >= 2:
            loss, sample_size = out[0], out[1]
            guard.observe_loss(loss.detach().float() / max(float(sample_size), 1.0))

    trainer.criterion.register_forward_hook(read_loss)
    logger.info("stability guard: on %s, snapshots every %d updates, spikes above %g robust sigmas",
                type(guard.optimizer).__name__, guard.snapshot_every, guard.detector.threshold)
    return guard


def guarded_step(trainer, step, samples, raise_oom=False):
    """The step wrapper of ``--stability-guard`` (registered with the repair
    [`train_step`][fairseq_plugins.repairs.train_step], inside the monitor's). The guard is put on the trainer's
    optimizer at the first step (it then acts inside ``optimizer.step``); fairseq's ``FloatingPointError`` (a
    non-finite gradient: the update was not applied) becomes the guard's ``nonfinite`` signal and the step returns
    None, as fairseq's own out-of-memory skip does; once the guard stops, ``cfg.optimization.max_update`` is set to
    the current update, so fairseq saves and ends as at ``--max-update``. Without the flag it calls the step
    unchanged."""
    g = feature_of(trainer, "_stability_guard", guard_settings, make_guard)
    if g is None:
        return step(samples, raise_oom)
    try:
        out = None if g.stopped else step(samples, raise_oom)
    except FloatingPointError as err:
        out = None
        trainer.zero_grad()
        g.report("nonfinite", f"fairseq: {err}")
    if g.stopped:  # fairseq ends at the next check, saving its checkpoint, as at --max-update
        trainer.cfg.optimization.max_update = trainer.get_num_updates()
    return out


register_step_wrapper("stability_guard", guarded_step)


def read_grad_norm(trainer, norm) -> None:
    """The norm reader of ``--stability-guard`` (registered with the repair
    [`grad_norm`][fairseq_plugins.repairs.grad_norm]): the gradient norm fairseq computed for this update, handed
    to the trainer's guard before its optimizer step (`StabilityGuard.observe_grad_norm`). Without a guard (the
    flag off, or before the first step) it does nothing."""
    guard = guard_of(trainer)
    if guard is not None and not guard.stopped and norm is not None:
        guard.observe_grad_norm(norm)


register_norm_reader("stability_guard", read_grad_norm)
