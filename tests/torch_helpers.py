"""Small measurements shared by tests (``tests/`` is on sys.path, see conftest.py).

:func:`saved_bytes` lives in :mod:`benchmarks.memory` (the benchmarks measure with it too); tests may
import from ``benchmarks``, never the other way round.
"""

from benchmarks.memory import saved_bytes

__all__ = ["saved_bytes"]
