"""Shared infrastructure of the toolbox's libraries (admin_torch, reinmax, sign_optim).

:mod:`stability_toolbox.validation` holds the argument checks every library uses and the global
switch of the data checks (:func:`set_data_checks`), re-exported here.
"""

from .validation import data_checks, data_checks_enabled, set_data_checks

__all__ = ["data_checks", "data_checks_enabled", "set_data_checks"]
