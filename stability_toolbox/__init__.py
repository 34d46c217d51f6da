"""Shared infrastructure of the toolbox's libraries (admin_torch, reinmax, sign_optim).

[`toolbox_core.validation`][toolbox_core.validation] holds the argument checks every library uses and the global
switch of the data checks ([`set_data_checks`][toolbox_core.validation.set_data_checks]), re-exported here; its pure-Python argument
checks live in the torch-free [`toolbox_core.checks`][toolbox_core.checks].
[`StabilityMonitor`][stability_toolbox.StabilityMonitor] (`stability_toolbox.monitor`) records Admin's per-layer stability quantities
live during training; `stability_toolbox.hf_callback` runs it in a HuggingFace ``Trainer``.
`stability_toolbox.warning_rules` holds its warning rules (pure functions of its history: each warning
names the likely mechanism and the remedy); `stability_toolbox.z_loss` the z-loss remedy.
`toolbox_core.listops` holds the ListOps data code (generator, parser, evaluator, reader
and writer) in pure Python.

Importing this package imports neither torch nor fairseq: the names re-exported here from
[`validation`][toolbox_core.validation] and `monitor` (which need torch) are
imported on first use, so ``import toolbox_core.listops`` stays torch-free, while
``from stability_toolbox import StabilityMonitor`` works as ever.

Examples:
    >>> import stability_toolbox
    >>> with stability_toolbox.data_checks(False):
    ...     stability_toolbox.data_checks_enabled()
    False
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the names below are, for type checkers and the API docs; imported lazily at run time
    from .monitor import DEFAULT_RULES, StabilityMonitor, WarningRule, register_layer_kind
    from .z_loss import DEFAULT_Z_LOSS, cross_entropy_with_z_loss, log_z
    from toolbox_core.validation import data_checks, data_checks_enabled, set_data_checks

__all__ = ["data_checks", "data_checks_enabled", "set_data_checks", "StabilityMonitor", "WarningRule", "DEFAULT_RULES",
           "register_layer_kind", "cross_entropy_with_z_loss", "log_z", "DEFAULT_Z_LOSS"]

# name -> the submodule it comes from (both submodules import torch)
_LAZY = {
    "data_checks": "validation",
    "data_checks_enabled": "validation",
    "set_data_checks": "validation",
    "StabilityMonitor": "monitor",
    "WarningRule": "monitor",
    "DEFAULT_RULES": "monitor",
    "register_layer_kind": "monitor",
    "cross_entropy_with_z_loss": "z_loss",
    "log_z": "z_loss",
    "DEFAULT_Z_LOSS": "z_loss",
}
# submodules that ``import stability_toolbox`` used to import eagerly: still reachable as attributes
_LAZY_SUBMODULES = ("validation", "monitor", "warning_rules", "z_loss")


def __getattr__(name: str):
    """PEP 562: import a torch-based re-export (or submodule) on first access, then cache it."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _LAZY_SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_LAZY_SUBMODULES))
