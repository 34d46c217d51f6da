"""The stability monitor in a HuggingFace ``Trainer``: `StabilityMonitorCallback`.

Importing this module does not import transformers; the callback class is built (as a subclass of
``transformers.TrainerCallback``) the first time it is looked up.

Examples:
    >>> from stability_toolbox.hf_callback import StabilityMonitorCallback   # doctest: +SKIP
    >>> trainer = Trainer(model, args, train_dataset=ds,
    ...                   callbacks=[StabilityMonitorCallback('runs/stability', every=100)])   # doctest: +SKIP
    >>> trainer.train()   # monitor.jsonl, tb/, summary.md, heatmap_*.png under runs/stability   # doctest: +SKIP

Works with stock models and with models [`admin_torch.convert`][admin_torch.convert] converted (BERT, RoBERTa, BART,
Marian, ...): the monitor finds their sublayers through the same descriptions. Per optimizer step:
``on_step_begin`` arms the monitor on logged steps (and hooks the model's output to read its ``loss``),
``on_pre_optimizer_step`` reads the gradients (after clipping, before ``optimizer.step``; the Trainer
zeroes them before ``on_step_end``), ``on_step_end`` records, ``on_train_end`` writes the summary and
heatmaps.
"""

from typing import Any, Optional

__all__ = ["StabilityMonitorCallback"]

_CLASS = None


def _build():
    from transformers import TrainerCallback

    from .monitor import StabilityMonitor

    class StabilityMonitorCallback(TrainerCallback):
        """A ``TrainerCallback`` running [`StabilityMonitor`][stability_toolbox.StabilityMonitor] on the trained model.

        Args:
            log_dir: where the monitor writes (default: ``<output_dir>/stability``).
            every: the logging interval in optimizer steps (default 100).
            **monitor_kwargs: passed to [`StabilityMonitor`][stability_toolbox.StabilityMonitor].

        The monitor is `monitor` (created at ``on_train_begin``; each ``trainer.train()`` gets a new one,
        appending to the same ``monitor.jsonl``).
        """

        def __init__(self, log_dir: Optional[str] = None, every: int = 100, **monitor_kwargs: Any):
            from toolbox_core import validation

            self.every = validation.as_int("every", every, minimum=1)
            if "log_dir" in monitor_kwargs or "model" in monitor_kwargs:
                raise TypeError("log_dir and model are set by the callback; pass log_dir positionally")
            self.log_dir = log_dir
            self.monitor_kwargs = monitor_kwargs
            self.monitor: Optional[StabilityMonitor] = None
            self._loss_hook = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # a second trainer.train() with this callback: a new monitor (the first one closed at on_train_end);
            # it appends to the same monitor.jsonl
            if self.monitor is None or self.monitor._closed or (model is not None and self.monitor.model is not model):
                if self.monitor is not None:
                    self.monitor.close()
                    self.monitor = None
                if model is None:
                    raise ValueError("model: the Trainer passed no model to the callback")
                import os

                log_dir = self.log_dir or os.path.join(args.output_dir, "stability")
                self.monitor = StabilityMonitor(model, log_dir, every=self.every, **self.monitor_kwargs)
            return control

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            mon = self.monitor
            if mon is not None and mon.begin_step(state.global_step) and model is not None:
                # the loss of the logged step, read from the model's output (only on logged steps)
                def read_loss(_m, _a, out):
                    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
                    if loss is not None:
                        mon.observe_loss(loss)
                self._loss_hook = model.register_forward_hook(read_loss)
                mon._wrap_hooks([self._loss_hook])  # inert in a copied / pickled model
            return control

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if self.monitor is not None:
                self.monitor.capture_grads()
            return control

        def on_step_end(self, args, state, control, **kwargs):
            if self._loss_hook is not None:
                self._loss_hook.remove()
                self._loss_hook = None
            if self.monitor is not None:
                self.monitor.end_step()
            return control

        def on_train_end(self, args, state, control, **kwargs):
            if self.monitor is not None:
                self.monitor.close()
            return control

    StabilityMonitorCallback.__module__ = __name__
    return StabilityMonitorCallback


def __getattr__(name: str):
    global _CLASS
    if name == "StabilityMonitorCallback":
        if _CLASS is None:
            _CLASS = _build()
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
