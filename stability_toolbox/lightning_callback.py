"""The stability guard in a PyTorch Lightning ``Trainer``: `StabilityGuardLightning`.

Importing this module does not import Lightning; the callback class (a subclass of
``pytorch_lightning.Callback``) is built the first time it is looked up.

Examples:
    >>> from stability_toolbox.lightning_callback import StabilityGuardLightning   # doctest: +SKIP
    >>> trainer = pl.Trainer(max_steps=10_000, callbacks=[StabilityGuardLightning(snapshot_every=200)])   # doctest: +SKIP
    >>> trainer.fit(module, loader)   # doctest: +SKIP

At ``on_fit_start`` the callback puts a [`StabilityGuard`][stability_toolbox.StabilityGuard] on the first optimizer
(automatic optimization) with the first learning-rate scheduler. Lightning steps the optimizer with a closure
that runs the forward and backward passes; the guard runs it, reads the loss it returns and the gradients, and
decides. Lightning owns the data loader: a rewind restores the state and the next ``rewind_skip`` updates are
skipped. When the guard stops, ``trainer.should_stop`` ends the fit and `stop_reason` says why. The guard's
statistics and counters go into Lightning's checkpoints (``state_dict``) and come back on resume. With
``accumulate_grad_batches`` > 1 the loss signal is the last micro-batch's (the one whose closure runs inside the
step); the gradient norm is the whole update's. Manual optimization is refused by name. Unlike
Lightning's ``SpikeDetection`` (which raises and leaves a skip list for a resumed run), the run goes on.

With gradient clipping by norm (``Trainer(gradient_clip_val=...)``) Lightning computes the global gradient norm
before every step and drops it (``Precision.clip_grad_by_norm`` returns nothing). The callback then replaces that
method on this fit's precision plugin only by the same call (``torch.nn.utils.clip_grad_norm_`` over the
plugin's ``main_params``, after the same unscaling of mixed precision) that also hands the norm it returns, the
norm before clipping, to the guard (`StabilityGuard.observe_grad_norm`): no second pass over the gradients, and
the spike is seen where the clipped norm would hide it. Without clipping, or with a plugin that clips its own
way (FSDP, DeepSpeed), the guard computes the norm itself. The plugin's method and the optimizer's ``step`` are
given back when the fit ends, by an exception too (``on_exception``).
"""

from typing import Any, Callable, Optional

__all__ = ["StabilityGuardLightning"]

_CLASS = None


#: set on the clip_grad_by_norm this module puts on a precision plugin: the guard it feeds
_FEEDS = "_stability_guard_feeds"


def _feed_clip_norm(trainer: Any, guard: Any) -> Optional[Callable[[], None]]:
    """Make ``trainer.precision_plugin.clip_grad_by_norm`` (this instance only) hand the norm it computes to
    ``guard``; returns the undo, or None for a plugin that clips otherwise than Lightning's base ``Precision``."""
    import torch
    from pytorch_lightning.plugins.precision import Precision

    plugin = getattr(trainer, "precision_plugin", None)
    if not isinstance(plugin, Precision) or type(plugin).clip_grad_by_norm is not Precision.clip_grad_by_norm:
        return None
    had_own = "clip_grad_by_norm" in vars(plugin)
    previous = vars(plugin).get("clip_grad_by_norm")

    def clip_grad_by_norm(optimizer, clip_val):
        # Precision.clip_grad_by_norm's body, keeping the norm it computes (the global norm before clipping)
        norm = torch.nn.utils.clip_grad_norm_(plugin.main_params(optimizer), clip_val)
        if optimizer is guard.optimizer and not guard.stopped:
            guard.observe_grad_norm(norm)

    setattr(clip_grad_by_norm, _FEEDS, guard)
    plugin.clip_grad_by_norm = clip_grad_by_norm

    def undo() -> None:
        if getattr(vars(plugin).get("clip_grad_by_norm"), _FEEDS, None) is guard:
            if had_own and getattr(previous, _FEEDS, None) is None:
                plugin.clip_grad_by_norm = previous
            else:
                del plugin.clip_grad_by_norm

    return undo


def _build():
    import pytorch_lightning as pl

    from .guard import StabilityGuard, check_trainer_arguments

    class StabilityGuardLightning(pl.Callback):
        """A Lightning ``Callback`` running [`StabilityGuard`][stability_toolbox.StabilityGuard] on the fit's optimizer.

        Args:
            monitor: a [`StabilityMonitor`][stability_toolbox.StabilityMonitor] whose warnings the policy acts on.
            **guard_kwargs: passed to [`StabilityGuard`][stability_toolbox.StabilityGuard] (checked here).
        """

        def __init__(self, monitor: Any = None, **guard_kwargs: Any):
            check_trainer_arguments(monitor, guard_kwargs)  # a bad argument fails here, not at the first step
            self.monitor = monitor
            self.guard_kwargs = guard_kwargs
            self.guard: Optional[StabilityGuard] = None
            self._resumed: Optional[dict] = None
            self._unfeed: Optional[Callable[[], None]] = None

        @property
        def stop_reason(self) -> Optional[str]:
            """Why the guard stopped the fit (mechanism and remedy), or None."""
            return None if self.guard is None else self.guard.stop_reason

        def on_fit_start(self, trainer, pl_module):
            if not trainer.optimizers:
                raise ValueError("optimizer: the LightningModule configured none (the guard needs one)")
            if not pl_module.automatic_optimization:
                raise ValueError("automatic_optimization: the guard steps the optimizer itself; with manual "
                                 "optimization use StabilityGuard directly")
            configs = trainer.lr_scheduler_configs
            scheduler = configs[0].scheduler if configs else None
            if self.guard is not None:
                self.guard.detach()
            if self._unfeed is not None:
                self._unfeed()
            self.guard = StabilityGuard(pl_module, trainer.optimizers[0], scheduler=scheduler, monitor=self.monitor,
                                        **self.guard_kwargs)
            self._unfeed = _feed_clip_norm(trainer, self.guard)
            if self._resumed is not None:  # a checkpoint's guard state (load_state_dict came first)
                self.guard.load_state_dict(self._resumed)
                self._resumed = None

        def state_dict(self):
            """The guard's state (`StabilityGuard.state_dict`), saved in Lightning's checkpoints."""
            return {} if self.guard is None else self.guard.state_dict()

        def load_state_dict(self, state_dict):
            """Resume the guard's statistics and counters from a checkpoint (applied when the guard is built)."""
            if state_dict:
                if self.guard is not None:
                    self.guard.load_state_dict(state_dict)
                else:
                    self._resumed = state_dict

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.guard is not None and self.guard.stopped:
                trainer.should_stop = True

        def on_fit_end(self, trainer, pl_module):
            if self._unfeed is not None:
                self._unfeed()
                self._unfeed = None
            if self.guard is not None:
                self.guard.detach()

        def on_exception(self, trainer, pl_module, exception):
            # a fit ended by an exception never reaches on_fit_end: give back the precision plugin's clipping and
            # the optimizer's step all the same (the trainer, the plugin and the optimizer outlive the fit)
            self.on_fit_end(trainer, pl_module)

    StabilityGuardLightning.__module__ = __name__
    return StabilityGuardLightning


def __getattr__(name: str):
    global _CLASS
    if name == "StabilityGuardLightning":
        if _CLASS is None:
            _CLASS = _build()
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
