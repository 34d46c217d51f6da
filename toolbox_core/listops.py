"""Deprecated name: the ListOps data code moved one floor up, to the torch-free `listops_data` package.

This name stays an alias of that package (old imports, pickles), resolved only when it is imported: importing
`toolbox_core` does not import `listops_data` (tests/packaging/test_import_graph.py draws this one upward edge).
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("listops_data")
