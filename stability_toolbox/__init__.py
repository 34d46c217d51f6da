"""The live stability monitor: a feature package above the libraries (admin_torch, reinmax, sign_optim).

[`StabilityMonitor`][stability_toolbox.StabilityMonitor] records Admin's per-layer stability quantities live
during training, warns before the loss does and names the mechanism and the remedy. It is built from one-idea
modules:

* `stability_toolbox.monitor`: the step protocol (`begin_step`/`end_step`/`step`, `close`), composing
* `stability_toolbox.sites`: where the residual branches, norms and attention modules of a model are;
* `stability_toolbox.quantities`: the per-site statistics and the quantities computed from them;
* `stability_toolbox.attention_stats`: the attention-logit statistics;
* `stability_toolbox.probe`: the fixed probe batch replayed on logging steps;
* `stability_toolbox.warning_rules`: the warning rules, pure functions of the history;
* `stability_toolbox.records`: ``monitor.jsonl`` (and [`read_records`][stability_toolbox.records.read_records]),
  the summary table and the heatmaps;
* `stability_toolbox.inert_hooks`: hooks that go inert in a copied or pickled model.

[`StabilityGuard`][stability_toolbox.StabilityGuard] keeps a run alive through its instabilities (skip, rewind,
back off, stop; `stability_toolbox.guard`, with `stability_toolbox.guard_policy`, `stability_toolbox.spike_detector`,
`stability_toolbox.conditional_step` and `stability_toolbox.snapshots`; in a HuggingFace ``Trainer`` through
`stability_toolbox.hf_guard_callback`, in Lightning through `stability_toolbox.lightning_callback`).

[`UpdateSignals`][stability_toolbox.UpdateSignals] records cheap scalars at every update
(`stability_toolbox.leading_signals`) and [`SignalDetector`][stability_toolbox.SignalDetector] warns when one departs
from its own recent baseline (`stability_toolbox.signal_detector`; the monitor runs it on its per-update stream).

`stability_toolbox.hf_callback` runs the monitor in a HuggingFace ``Trainer``; `stability_toolbox.z_loss`
is the z-loss remedy. The shared helpers live one floor down, in `toolbox_core`; the data-check switch
([`set_data_checks`][toolbox_core.validation.set_data_checks] and friends) is re-exported here, and
``stability_toolbox.{checks,validation,files}`` still name the `toolbox_core` modules. Deprecated names of moved
modules, kept for old imports and for models pickled under them: ``stability_toolbox.hooks`` names
`stability_toolbox.inert_hooks`, ``stability_toolbox.listops`` (an alias module) the `listops_data` package.

Importing this package imports neither torch nor fairseq: the names re-exported here are imported on first
use, while ``from stability_toolbox import StabilityMonitor`` works as ever.

Examples:
    >>> import stability_toolbox
    >>> with stability_toolbox.data_checks(False):
    ...     stability_toolbox.data_checks_enabled()
    False
"""

import importlib
import sys
from typing import TYPE_CHECKING

from . import inert_hooks as _inert_hooks

if TYPE_CHECKING:  # what the names below are, for type checkers and the API docs; imported lazily at run time
    from .monitor import StabilityMonitor, register_layer_kind
    from .warning_rules import DEFAULT_RULES, WarningRule
    from .z_loss import DEFAULT_Z_LOSS, cross_entropy_with_z_loss, log_z
    from .guard import StabilityGuard
    from .guard_policy import GuardPolicy
    from .spike_detector import SpikeDetector
    from .leading_signals import UpdateSignals
    from .signal_detector import DEFAULT_SIGNAL_RULES, SignalDetector, SignalRule
    from toolbox_core.validation import data_checks, data_checks_enabled, set_data_checks

__all__ = ["data_checks", "data_checks_enabled", "set_data_checks", "StabilityMonitor", "WarningRule", "DEFAULT_RULES",
           "register_layer_kind", "cross_entropy_with_z_loss", "log_z", "DEFAULT_Z_LOSS", "StabilityGuard", "GuardPolicy",
           "SpikeDetector", "UpdateSignals", "SignalDetector", "SignalRule", "DEFAULT_SIGNAL_RULES"]

# name -> the submodule it comes from (they import torch)
_LAZY = {
    "data_checks": "validation",
    "data_checks_enabled": "validation",
    "set_data_checks": "validation",
    "StabilityMonitor": "monitor",
    "WarningRule": "warning_rules",
    "DEFAULT_RULES": "warning_rules",
    "register_layer_kind": "monitor",
    "cross_entropy_with_z_loss": "z_loss",
    "log_z": "z_loss",
    "DEFAULT_Z_LOSS": "z_loss",
    "StabilityGuard": "guard",
    "GuardPolicy": "guard_policy",
    "SpikeDetector": "spike_detector",
    "UpdateSignals": "leading_signals",
    "SignalDetector": "signal_detector",
    "SignalRule": "signal_detector",
    "DEFAULT_SIGNAL_RULES": "signal_detector",
}
# submodules that ``import stability_toolbox`` used to import eagerly: still reachable as attributes
_LAZY_SUBMODULES = ("validation", "monitor", "warning_rules", "z_loss")
# deprecated module names -> the module now holding that code: registered in sys.modules, so ``import
# stability_toolbox.hooks`` and a pickle naming ``stability_toolbox.hooks._make_inert`` get the new module
_MOVED = {"hooks": _inert_hooks}
for _name, _module in _MOVED.items():
    sys.modules.setdefault(f"{__name__}.{_name}", _module)


def __getattr__(name: str):
    """PEP 562: import a torch-based re-export (or submodule) on first access, then cache it."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _LAZY_SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _MOVED:
        return _MOVED[name]  # not cached: the deprecated names stay out of the namespace
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_LAZY_SUBMODULES))
