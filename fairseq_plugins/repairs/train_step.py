"""Run the plugins' step wrappers (the stability monitor's, the guard's) around fairseq's training step.

fairseq-fixed 0.12.3.1's ``Trainer`` has no callback around an update: a plugin cannot see the gradients before
the next ``train_step`` zeroes them, nor the update it made, nor turn fairseq's ``FloatingPointError`` into a
skipped update. `install` wraps ``fairseq.trainer.Trainer.train_step`` once; the wrapper passes the step through
every wrapper registered with `register_step_wrapper`, the first registered outermost. A step wrapper is
``wrapper(trainer, step, samples, raise_oom)`` and calls ``step(samples, raise_oom)`` to run the rest (the
wrappers registered after it, then fairseq's step); it reads its settings from ``trainer.cfg``
([`training_flags.flag_value`][fairseq_plugins.repairs.training_flags.flag_value]).

    >>> calls = []
    >>> def logged(trainer, step, samples, raise_oom=False):
    ...     calls.append("before")
    ...     return step(samples, raise_oom)
    >>> register_step_wrapper("demo", logged) is logged
    True
    >>> class Trainer:
    ...     cfg = None  # no plugin flags in its configuration: the features' wrappers pass the step on
    ...     def train_step(self, samples, raise_oom=False):
    ...         return len(samples)
    >>> wrap_once(Trainer, "train_step", _wrap_train_step)
    >>> Trainer().train_step([1, 2]), calls
    (2, ['before'])
    >>> _WRAPPERS.pop("demo") is logged
    True
"""

import functools
from typing import Any, Callable, Dict, Optional

from ._wrap import wrap_once

__all__ = ["feature_of", "install", "register_step_wrapper", "StepWrapper"]

#: ``wrapper(trainer, step, samples, raise_oom) -> the step's output``
StepWrapper = Callable[[Any, Callable, Any, bool], Any]

#: key -> step wrapper, in registration order (the first registered runs outermost)
_WRAPPERS: Dict[str, StepWrapper] = {}


def register_step_wrapper(key: str, wrapper: StepWrapper) -> StepWrapper:
    """Run ``wrapper`` around every ``Trainer.train_step`` (once per ``key``: a second registration is a no-op)."""
    _WRAPPERS.setdefault(key, wrapper)
    return wrapper


def feature_of(trainer: Any, attr: str, settings: Callable[[Any], Optional[dict]],
               make: Callable[[Any, dict], Any]) -> Any:
    """The feature a step wrapper runs (a monitor, a guard), kept on ``trainer`` as ``attr``: made on the trainer's
    first step, ``make(trainer, settings(trainer.cfg))``, or None when ``settings`` finds its flag absent."""
    if attr not in vars(trainer):
        config = settings(trainer.cfg)
        setattr(trainer, attr, None if config is None else make(trainer, config))
    return getattr(trainer, attr)


def _wrap_train_step(train_step: Callable) -> Callable:
    @functools.wraps(train_step)
    def train_step_with_plugins(self, samples, raise_oom=False):
        step = functools.partial(train_step, self)
        for wrapper in reversed(list(_WRAPPERS.values())):
            step = functools.partial(wrapper, self, step)
        return step(samples, raise_oom)

    return train_step_with_plugins


def install() -> None:
    """Wrap ``fairseq.trainer.Trainer.train_step`` (idempotent)."""
    import fairseq.trainer

    wrap_once(fairseq.trainer.Trainer, "train_step", _wrap_train_step)
