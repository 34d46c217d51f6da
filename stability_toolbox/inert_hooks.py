"""The monitor's hooks on a model report into this model only: a copy of the model carries an inert hook.

Every hook a monitor installs (on modules, parameters, the optimizer) is wrapped by
[`wrap_hooks`][stability_toolbox.inert_hooks.wrap_hooks] in a small callable that ``copy.deepcopy`` (an EMA copy of
the model) and pickling (``torch.save(model)``) replace by a function that does nothing: the copy pickles,
and it never reports into the monitor of the original.
"""

from typing import Any, Callable, Iterable

__all__ = ["wrap_hooks"]


def _inert_hook(*_args, **_kwargs) -> None:
    """What a monitor's hook becomes in a pickled or deep-copied model: nothing."""
    return None


def _make_inert():
    return _inert_hook


class _Hook:
    """A monitor's hook on the model: calls ``fn`` in this model only. A ``copy.deepcopy`` of the model (an EMA
    copy) and a pickled one (``torch.save(model)``) get `_inert_hook` instead, so they are picklable and
    never report into this monitor."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        return _inert_hook

    def __reduce__(self):
        return (_make_inert, ())


def wrap_hooks(handles: Iterable[Any]) -> None:
    """Wrap the hook behind each of ``handles`` (``torch.utils.hooks.RemovableHandle``) once, in place."""
    for handle in handles:
        hooks = handle.hooks_dict_ref()
        if hooks is not None and handle.id in hooks and not isinstance(hooks[handle.id], _Hook):
            hooks[handle.id] = _Hook(hooks[handle.id])
