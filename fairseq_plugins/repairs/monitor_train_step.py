"""Run the stability monitor of ``--stability-monitor`` around fairseq's training step.

fairseq-fixed 0.12.3.1's ``Trainer`` has no callback around an update: a plugin cannot see the gradients
before the next ``train_step`` zeroes them, nor the update it made. `install` wraps
``fairseq.trainer.Trainer.train_step`` once: when [`fairseq_plugins.monitor`][fairseq_plugins.monitor]'s flags
are set (the monitor is created on the first step), on a logged update it arms the monitor before the call
and reads the gradients (normalized, clipped), the update and the loss after it. Between logged updates the
wrapper does one integer comparison; without the flags it calls the step unchanged.
"""

import functools

from ._wrap import wrap_once

__all__ = ["install"]


def _wrap_train_step(train_step):
    @functools.wraps(train_step)
    def train_step_monitored(self, samples, raise_oom=False):
        from .. import monitor  # imported with the other registrations, after the repairs are installed

        cfg = monitor.monitor_config()
        if cfg is None:
            return train_step(self, samples, raise_oom)
        mon = getattr(self, "_stability_monitor", None)
        if mon is None:
            mon = self._stability_monitor = monitor.make_monitor(self, cfg)
        step = self.get_num_updates()
        if not mon.is_logging_step(step):  # the common case: one comparison, no hook, no sync
            mon.step_count = step + 1
            return train_step(self, samples, raise_oom)
        mon.begin_step(step)
        try:
            out = train_step(self, samples, raise_oom)
        except BaseException:
            mon.end_step()
            raise
        # the gradients stay in place until the next train_step zeroes them (normalized, clipped)
        mon.capture_grads()
        loss = None
        if isinstance(out, dict) and out.get("loss") is not None:
            loss = float(out["loss"])  # the step's smoothed, normalized loss as fairseq logs it (base 2)
        mon.end_step(loss)
        return out

    train_step_monitored._stability_monitor = True
    return train_step_monitored


def install() -> None:
    """Wrap ``fairseq.trainer.Trainer.train_step`` (idempotent)."""
    import fairseq.trainer

    wrap_once(fairseq.trainer.Trainer, "train_step", _wrap_train_step)
