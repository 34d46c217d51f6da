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
`stop_reason` says why.

The gradient-norm signal is the Trainer's own: before ``optimizer.step`` the Trainer calls
``accelerator.clip_grad_norm_`` (clipping at ``max_grad_norm``, or at infinity only to log the norm), which
returns the global norm *before* clipping. The callback wraps that method on this Trainer's accelerator only
(callbacks are not handed their Trainer: it is found on the call stack at ``on_train_begin``, the Trainer
whose callback handler holds this callback) and hands the value to the guard
(`StabilityGuard.observe_grad_norm`): the guard makes no pass of its own over the gradients, and it scores the
norm before clipping, where a spike shows (the clipped norm is at most ``max_grad_norm``: it would hide it).
Where the Trainer computes the norm elsewhere (DeepSpeed, which reports the previous step's; gradients on
several device meshes), the Trainer is not found, or a ``clip_grad_norm_`` call covers only some of the
optimizer's parameters (a user's clipping of some layers), the guard computes the norm of the gradients it steps
on.

Resume: the callback is a ``transformers.ExportableState``. Every checkpoint's ``trainer_state.json`` holds the
guard's state (`StabilityGuard.state_dict`, as JSON: its counters, the detector's running statistics, the
batches still to skip, the backoff and escalation windows) under ``stateful_callbacks``; a Trainer resumed from
that checkpoint (``trainer.train(resume_from_checkpoint=...)``) reads it back at ``on_train_begin``, so the
resumed run's guard decides as the uninterrupted one's would (a checkpoint without it, from an older version:
the guard starts afresh, said in a warning). The Trainer's ``restore_callback_states_from_checkpoint=True`` is
refused (ValueError naming it, when the Trainer is built or training begins): at a resume the Trainer would
replace this callback by one rebuilt from saved constructor arguments, and a policy or a monitor cannot be saved
as JSON, so the resumed guard would silently run with other settings than the ones given.
"""

import logging
import sys

from typing import Any, Callable, Dict, Optional

__all__ = ["StabilityGuardCallback"]

_CLASS = None
_LOG = logging.getLogger(__name__)


def _refuse_callback_restore(args: Any) -> None:
    if getattr(args, "restore_callback_states_from_checkpoint", False):
        raise ValueError("restore_callback_states_from_checkpoint=True: the Trainer would replace the "
                         "StabilityGuardCallback by one rebuilt without its arguments (policy, monitor, thresholds); "
                         "leave it False, the callback restores the guard's state from the checkpoint itself")


def _guard_state_to_json(state: Dict[str, Any]) -> Dict[str, Any]:
    """`StabilityGuard.state_dict` as JSON values: the detector's tensors as ``{"dtype", "shape", "values"}``."""
    det = {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape), "values": v.flatten().tolist()}
           if hasattr(v, "tolist") and hasattr(v, "dtype") else v for k, v in state["detector"].items()}
    return {**state, "detector": det, "skip_log": [list(x) for x in state["skip_log"]]}


def _guard_state_from_json(state: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of `_guard_state_to_json` (ValueError for anything else)."""
    import torch

    try:
        det = {k: torch.tensor([float(x) if x is None else x for x in v["values"]], dtype=getattr(torch, v["dtype"]))
               .reshape(v["shape"]) if isinstance(v, dict) else v for k, v in state["detector"].items()}
        return {**state, "detector": det, "skip_log": [tuple(x) for x in state["skip_log"]]}
    except (KeyError, TypeError, AttributeError, RuntimeError) as err:
        raise ValueError(f"state: not a saved StabilityGuard state ({type(err).__name__}: {err})") from None


def _trainer_of(callback: Any) -> Any:
    """The ``transformers.Trainer`` running ``callback``: the ``self`` of a caller on the stack that is a Trainer
    whose callback handler holds this very callback (the Trainer hands callbacks no reference to itself), or
    None."""
    from transformers import Trainer

    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer) and \
                any(cb is callback for cb in getattr(getattr(owner, "callback_handler", None), "callbacks", ())):
            return owner
        frame = frame.f_back
    return None


#: set on the clip_grad_norm_ this module puts on an accelerator: the guard it feeds
_FEEDS = "_stability_guard_feeds"


def _guards(guard: Any) -> bool:
    """Whether ``guard`` still guards its optimizer (not detached, e.g. by the user mid-run: a detached guard is
    handed nothing)."""
    return getattr(vars(guard.optimizer).get("step"), "_stability_guard", None) is guard


def _covers(parameters: list, guard: Any) -> bool:
    """Whether ``parameters`` hold every parameter of the guard's optimizer that has a gradient (the norm clipped
    over them is then the global norm, the one the guard scores)."""
    ids = {id(p) for p in parameters}
    return all(id(p) in ids for g in guard.optimizer.param_groups for p in g["params"] if p.grad is not None)


def _feed_clip_norm(trainer: Any, guard: Any) -> Optional[Callable[[], None]]:
    """Wrap ``trainer.accelerator.clip_grad_norm_`` (this instance only) so each norm it returns is handed to
    ``guard``; returns the undo, or None where the Trainer's norm is not this update's (DeepSpeed)."""
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is None or not callable(getattr(accelerator, "clip_grad_norm_", None)):
        return None
    if str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED"):
        return None  # DeepSpeed clips inside its own step and reports the previous step's norm
    had_own = "clip_grad_norm_" in vars(accelerator)
    current = accelerator.clip_grad_norm_
    original = getattr(current, "__wrapped__", current) if getattr(current, _FEEDS, None) is not None else current

    def clip_grad_norm_(parameters, max_norm, norm_type=2, **kwargs):
        import torch

        # a list: the parameters are read twice (the clip, then `_covers`); a generator would be empty the second time
        parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        norm = original(parameters, max_norm, norm_type=norm_type, **kwargs)
        # the Trainer's call, right before optimizer.step: the pre-clip global norm of every parameter. A call over
        # a subset (a user's callback clipping some layers, at on_pre_optimizer_step: after the Trainer's call) is
        # not the norm the guard scores: not handed (the guard computes its own norm at the step)
        if norm is not None and float(norm_type) == 2.0 and not guard.stopped and _guards(guard) and \
                _covers(parameters, guard):
            guard.observe_grad_norm(norm)
        return norm

    clip_grad_norm_.__wrapped__ = original
    setattr(clip_grad_norm_, _FEEDS, guard)
    accelerator.clip_grad_norm_ = clip_grad_norm_

    def undo() -> None:
        if getattr(vars(accelerator).get("clip_grad_norm_"), _FEEDS, None) is guard:
            if had_own:
                accelerator.clip_grad_norm_ = original
            else:
                del accelerator.clip_grad_norm_

    return undo


def _build():
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    from .guard import StabilityGuard, check_trainer_arguments

    class StabilityGuardCallback(TrainerCallback, ExportableState):
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
            self._unfeed: Optional[Callable[[], None]] = None

        @property
        def stop_reason(self) -> Optional[str]:
            """Why the guard stopped the run (mechanism and remedy), or None."""
            return None if self.guard is None else self.guard.stop_reason

        def on_init_end(self, args, state, control, **kwargs):
            _refuse_callback_restore(args)
            return control

        def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
            _refuse_callback_restore(args)
            if model is None or optimizer is None:
                raise ValueError("model, optimizer: the Trainer passed none to the callback")
            if self.guard is not None:
                self.guard.detach()
            if self._unfeed is not None:
                self._unfeed()
                self._unfeed = None
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
            self.guard = StabilityGuard(model, inner, scheduler=lr_scheduler, monitor=self.monitor,
                                        **self.guard_kwargs)
            guard = self.guard
            saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
            if isinstance(saved, list):  # several callbacks of this class: the Trainer keeps a list
                saved = saved[0] if saved else None
            if state.global_step > 0 and isinstance(saved, dict) and "guard" in saved:
                guard.load_state_dict(_guard_state_from_json(saved["guard"]))  # resumed from a checkpoint
            elif state.global_step > 0:
                _LOG.warning("stability guard: resumed at update %d from a checkpoint without the guard's state (an "
                             "older version): its statistics start afresh", state.global_step)
                if isinstance(getattr(state, "stateful_callbacks", None), dict):
                    # the Trainer's next save updates this callback's entry in place and fails (KeyError) where
                    # the loaded state has none: give it one
                    state.stateful_callbacks.setdefault(type(self).__name__, self.state())

            def read_loss(module, _args, out):
                if not module.training or not __import__("torch").is_grad_enabled():
                    return
                loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
                if loss is not None:
                    guard.observe_loss(loss)

            self._hook = model.register_forward_hook(read_loss)
            trainer = _trainer_of(self)
            self._unfeed = None if trainer is None else _feed_clip_norm(trainer, guard)
            return control

        def state(self) -> Dict[str, Any]:
            """What a checkpoint's ``trainer_state.json`` keeps: the guard's state (no constructor arguments)."""
            out: Dict[str, Any] = {"args": {}, "attributes": {}}
            if self.guard is not None:
                out["guard"] = _guard_state_to_json(self.guard.state_dict())
            return out

        def on_step_end(self, args, state, control, **kwargs):
            if self.guard is not None and self.guard.stopped:
                control.should_training_stop = True
            return control

        def on_train_end(self, args, state, control, **kwargs):
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            if self._unfeed is not None:
                self._unfeed()
                self._unfeed = None
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
