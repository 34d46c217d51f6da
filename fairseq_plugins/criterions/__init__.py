"""fairseq criteria of the toolbox (imported by ``fairseq_plugins``)."""

import os

from .._imports import import_all

import_all(__name__, os.path.dirname(__file__))
