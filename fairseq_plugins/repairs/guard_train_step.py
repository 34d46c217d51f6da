"""Run the stability guard of ``--stability-guard`` in fairseq's training step.

fairseq-fixed 0.12.3.1's ``Trainer`` has no callback around an update and ends the run on a non-finite gradient
(``FloatingPointError`` out of ``train_step``). `install` wraps ``fairseq.trainer.Trainer.train_step`` once: when
[`fairseq_plugins.guard`][fairseq_plugins.guard]'s flags are set, the first call puts the guard on the trainer's
optimizer (it then acts inside ``optimizer.step``); a ``FloatingPointError`` becomes the guard's ``nonfinite``
signal (the update was not applied: fairseq raised before it) and the step returns None, as fairseq's own
out-of-memory skip does; once the guard stops, ``cfg.optimization.max_update`` is set to the current update, so
fairseq saves and ends as at ``--max-update``. Without the flags it calls the step unchanged.
"""

import functools

from ._wrap import wrap_once

__all__ = ["install"]


def _wrap_train_step(train_step):
    @functools.wraps(train_step)
    def train_step_guarded(self, samples, raise_oom=False):
        from .. import guard as fg  # imported with the other registrations, after the repairs are installed

        cfg = fg.guard_config()
        if cfg is None:
            return train_step(self, samples, raise_oom)
        g = getattr(self, "_stability_guard", None)
        if g is None:
            g = self._stability_guard = fg.make_guard(self, cfg)
        try:
            out = None if g.stopped else train_step(self, samples, raise_oom)
        except FloatingPointError as err:
            out = None
            self.zero_grad()
            g.report("nonfinite", f"fairseq: {err}")
        if g.stopped:  # fairseq ends at the next check, saving its checkpoint, as at --max-update
            self.cfg.optimization.max_update = self.get_num_updates()
        return out

    train_step_guarded._stability_guard = True
    return train_step_guarded


def install() -> None:
    """Wrap ``fairseq.trainer.Trainer.train_step`` (idempotent)."""
    import fairseq.trainer

    wrap_once(fairseq.trainer.Trainer, "train_step", _wrap_train_step)
