"""fairseq tasks (auto-imported by ``--user-dir``) of the toolbox."""

import os

from .._imports import import_all

import_all(__name__, os.path.dirname(__file__))
