"""Shared infrastructure of the toolbox's libraries (admin_torch, reinmax, sign_optim).

:mod:`stability_toolbox.validation` holds the argument checks every library uses and the global
switch of the data checks (:func:`set_data_checks`), re-exported here.
:class:`StabilityMonitor` (:mod:`stability_toolbox.monitor`) records Admin's per-layer stability quantities
live during training; :mod:`stability_toolbox.hf_callback` runs it in a HuggingFace ``Trainer``.
"""

from .validation import data_checks, data_checks_enabled, set_data_checks
from .monitor import DEFAULT_RULES, StabilityMonitor, WarningRule, register_layer_kind

__all__ = ["data_checks", "data_checks_enabled", "set_data_checks", "StabilityMonitor", "WarningRule", "DEFAULT_RULES",
           "register_layer_kind"]
