"""stability_toolbox.inert_hooks: a wrapped hook runs in its model, a deep copy or a pickle of the model carries an
inert one, and a model pickled under an older module name (stability_toolbox.monitor's or stability_toolbox.hooks'
hooks) loads."""

import copy
import io
import pickle

import torch
from torch import nn

from stability_toolbox import inert_hooks as hooks, monitor


def test_wrapped_hook_runs_here_and_goes_inert_in_a_copy():
    calls = []
    model = nn.Linear(2, 2)
    handle = model.register_forward_hook(lambda m, a, o: calls.append(m))
    hooks.wrap_hooks([handle])
    hooks.wrap_hooks([handle])  # once: no wrapper around the wrapper
    (hook,) = model._forward_hooks.values()
    assert isinstance(hook, hooks._Hook) and not isinstance(hook.fn, hooks._Hook)
    model(torch.zeros(1, 2))
    assert calls == [model]
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        assert list(other._forward_hooks.values()) == [hooks._inert_hook]
        other(torch.zeros(1, 2))
    assert calls == [model]
    handle.remove()
    hooks.wrap_hooks([handle])  # a removed hook: nothing to wrap
    assert not model._forward_hooks


def test_pickles_naming_the_monitor_module_still_load():
    # protocol 0 by hand: what pickle wrote for a hook when _make_inert / _inert_hook lived in monitor.py
    assert pickle.loads(b"cstability_toolbox.monitor\n_make_inert\n(tR.") is hooks._inert_hook
    assert pickle.loads(b"cstability_toolbox.monitor\n_inert_hook\n.") is hooks._inert_hook
    assert monitor._inert_hook is hooks._inert_hook


def test_pickles_naming_the_former_hooks_module_still_load():
    # protocol 0 by hand: what pickle wrote for a copied hook while the module was stability_toolbox/hooks.py
    assert pickle.loads(b"cstability_toolbox.hooks\n_make_inert\n(tR.") is hooks._inert_hook
    import stability_toolbox.hooks
    from stability_toolbox.hooks import wrap_hooks
    assert stability_toolbox.hooks is hooks and wrap_hooks is hooks.wrap_hooks
