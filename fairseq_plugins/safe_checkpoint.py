"""The old name of the repair [`fairseq_plugins.repairs.safe_checkpoint`][fairseq_plugins.repairs.safe_checkpoint] (kept
importable: recipes and tests import it).

Examples:
    >>> from fairseq_plugins import safe_checkpoint
    >>> safe_checkpoint.install()          # done by ``--user-dir fairseq_plugins``
    >>> all(isinstance(cls, type) for cls in safe_checkpoint.safe_globals())   # what checkpoints may hold
    True
"""

from .repairs import checkpoint_broadcast
from .repairs import safe_checkpoint as _repair
from .repairs.safe_checkpoint import CorruptCheckpointError, UnsafeCheckpointError, safe_globals

__all__ = ["install", "safe_globals", "UnsafeCheckpointError", "CorruptCheckpointError"]


def install() -> None:
    """Install the two checkpoint repairs, safe loading and the rank-0 broadcast, as this module did (idempotent)."""
    _repair.install()
    checkpoint_broadcast.install()
