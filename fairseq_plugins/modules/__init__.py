"""Layers and model mixins of the plugin models (fairseq's ``modules``): the fairseq side of the libraries' algorithms.

Not auto-imported by fairseq (only ``models/`` and ``tasks/`` of a ``--user-dir`` are); the models import
what they use.
"""
