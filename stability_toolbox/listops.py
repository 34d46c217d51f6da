"""Deprecated name: the ListOps data code lives in the torch-free `listops_data` package; this name stays an alias."""

import sys

import listops_data as _module

sys.modules[__name__] = _module
