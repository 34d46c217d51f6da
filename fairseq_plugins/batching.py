"""The old name of the repair [`fairseq_plugins.repairs.last_batch`][fairseq_plugins.repairs.last_batch] (kept importable)."""

from .repairs.last_batch import install

__all__ = ["install"]
