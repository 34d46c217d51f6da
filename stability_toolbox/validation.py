"""Moved to `toolbox_core.validation` (the ground package the libraries share); this name stays an alias of it."""

import sys

from toolbox_core import validation as _module

sys.modules[__name__] = _module
