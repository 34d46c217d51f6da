"""The stability guard in a HuggingFace ``Trainer``: `StabilityGuardCallback`.

Importing this module does not import transformers; the callback class is built (as a subclass of
``transformers.TrainerCallback``) the first time it is looked up.

Examples:
    >>> from stability_toolbox.hf_guard_callback import StabilityGuardCallback   # doctest: +SKIP
    >>> trainer = Trainer(model, args, train_dataset=ds,
    ...                   callbacks=[StabilityGuardCallback(snapshot_every=100)])   # doctest: +SKIP
    >>> trainer.train()   # spikes skipped, rewinds on repeats, a clean stop with the diagnosis   # doctest: +SKIP

At ``on_train_begin`` the callback puts a [`StabilityGuard`][stability_toolbox.StabilityGuard] on the Trainer's
optimizer (the one inside accelerate's wrapper) with the Trainer's learning-rate scheduler; the loss of each
micro-batch is read from the model's output (a forward hook, training forwards only). The Trainer owns the
data loader, so a rewind restores the state and the data moves on: the next ``rewind_skip`` updates are
skipped. When the guard stops, ``control.should_training_stop`` ends the run at the end of the step and
`stop_reason` says why. The Trainer clips the gradients (``max_grad_norm``) before ``optimizer.step``: the
gradient-norm signal is then the clipped norm, the loss signal is unaffected.
"""

from typing import Any, Optional

__all__ = ["StabilityGuardCallback"]

_CLASS = None


def _build():
    from transformers import TrainerCallback

    from .guard import StabilityGuard, check_trainer_arguments

    class StabilityGuardCallback(TrainerCallback):
        """A ``TrainerCallback`` running [`StabilityGuard`][stability_toolbox.StabilityGuard] on the Trainer's optimizer.

        Args:
            monitor: a [`StabilityMonitor`][stability_toolbox.StabilityMonitor] (e.g. the one of a
                `StabilityMonitorCallback`) whose warnings the policy acts on, or None.
            **guard_kwargs: passed to [`StabilityGuard`][stability_toolbox.StabilityGuard] (``policy``,
                ``snapshot_every``, ``rewind_skip``, ``backoff``, ``log_dir``, ...; checked here).

        The guard is `guard` (created at ``on_train_begin``), its stop reason `stop_reason`.
        """

        def __init__(self, monitor: Any = None, **guard_kwargs: Any):
            check_trainer_arguments(monitor, guard_kwargs)  # a bad argument fails here, not at the first step
            self.monitor = monitor
            self.guard_kwargs = guard_kwargs
            self.guard: Optional[StabilityGuard] = None
            self._hook = None

        @property
        def stop_reason(self) -> Optional[str]:
            """Why the guard stopped the run (mechanism and remedy), or None."""
            return None if self.guard is None else self.guard.stop_reason

        def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
            if model is None or optimizer is None:
                raise ValueError("model, optimizer: the Trainer passed none to the callback")
            if self.guard is not None:
                self.guard.detach()
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
            self.guard = StabilityGuard(model, inner, scheduler=lr_scheduler, monitor=self.monitor,
                                        **self.guard_kwargs)
            guard = self.guard

            def read_loss(module, _args, out):
                if not module.training or not __import__("torch").is_grad_enabled():
                    return
                loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
                if loss is not None:
                    guard.observe_loss(loss)

            self._hook = model.register_forward_hook(read_loss)
            return control

        def on_step_end(self, args, state, control, **kwargs):
            if self.guard is not None and self.guard.stopped:
                control.should_training_stop = True
            return control

        def on_train_end(self, args, state, control, **kwargs):
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            if self.guard is not None:
                self.guard.detach()
            return control

    StabilityGuardCallback.__module__ = __name__
    return StabilityGuardCallback


def __getattr__(name: str):
    global _CLASS
    if name == "StabilityGuardCallback":
        if _CLASS is None:
            _CLASS = _build()
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
