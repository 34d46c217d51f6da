"""fairseq optimizers (imported by ``fairseq_plugins/__init__.py``: fairseq does not auto-import them) of the toolbox."""

import os

from .._imports import import_all

import_all(__name__, os.path.dirname(__file__))
