"""Keep every sentence in fairseq's batches: the last batch that fairseq drops.

fairseq-fixed 0.12.3.1's ``fairseq.data.data_utils.batch_by_size`` drops the last batch when its
size is not a multiple of ``--required-batch-size-multiple`` (default 8):

    if bsz_mult > 1 and len(b[-1]) % bsz_mult != 0:
        b = b[:-1]

so ``fairseq-generate`` silently skips up to 7 test sentences (BLEU on a subset), validation
loss leaves them out, and training never sees them. The batches are formed in order over
``indices``, so what was dropped is exactly the tail of ``indices`` past the kept batches;
`install` wraps ``batch_by_size`` to hand that tail back as one last batch. Every other
batch is unchanged.

Examples:
    >>> from fairseq_plugins.repairs import last_batch
    >>> last_batch.install()   # done by ``--user-dir fairseq_plugins``
"""

import functools
from typing import Callable

import numpy as np

from ._wrap import wrap_once

__all__ = ["install"]


def _keep_tail(batch_by_size: Callable) -> Callable:
    @functools.wraps(batch_by_size)
    def keep_every_sentence(indices, *args, **kwargs):
        batches = batch_by_size(indices, *args, **kwargs)
        fixed_shapes = kwargs.get("fixed_shapes", args[5] if len(args) > 5 else None)
        if fixed_shapes is not None:  # that path never drops
            return batches
        indices = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices), dtype=np.int64)
        kept = sum(len(batch) for batch in batches)
        if kept < len(indices):
            batches = list(batches) + [indices[kept:]]
        return batches

    return keep_every_sentence


def install() -> None:
    """Make ``fairseq.data.data_utils.batch_by_size`` keep the last batch (idempotent)."""
    from fairseq.data import data_utils

    wrap_once(data_utils, "batch_by_size", _keep_tail)
