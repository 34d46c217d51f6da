"""Hand the gradient norm of each update that fairseq's trainer computes to the plugins that read it.

fairseq-fixed 0.12.3.1's ``Trainer.train_step`` computes the global gradient norm of every update
(``Trainer.clip_grad_norm``, called whatever ``--clip-norm``: 0 only computes it; the norm before clipping,
after the fp16 unscaling, reduced over the ranks where fairseq reduces it) and keeps it in a local variable until
after the optimizer step: a plugin acting inside that step (the stability guard) cannot read it, and would have
to make a second pass over the gradients. `install` wraps ``fairseq.trainer.Trainer.clip_grad_norm`` once; the
wrapper returns fairseq's value unchanged and first hands it to every reader registered with
`register_norm_reader`, ``reader(trainer, norm)``, in registration order.

    >>> seen = []
    >>> register_norm_reader("demo", lambda trainer, norm: seen.append((trainer, norm))) is not None
    True
    >>> class Trainer:
    ...     def clip_grad_norm(self, clip_norm):
    ...         return 2.5
    >>> wrap_once(Trainer, "clip_grad_norm", _wrap_clip_grad_norm)
    >>> trainer = Trainer()
    >>> trainer.clip_grad_norm(0.0), seen == [(trainer, 2.5)]
    (2.5, True)
    >>> _READERS.pop("demo") is not None
    True
"""

import functools
from typing import Any, Callable, Dict

from ._wrap import wrap_once

__all__ = ["install", "register_norm_reader", "NormReader"]

#: ``reader(trainer, norm)``: called with the value ``Trainer.clip_grad_norm`` returns, before it is returned
NormReader = Callable[[Any, Any], None]

#: key -> reader, in registration order
_READERS: Dict[str, NormReader] = {}


def register_norm_reader(key: str, reader: NormReader) -> NormReader:
    """Hand every gradient norm ``Trainer.clip_grad_norm`` computes to ``reader`` (once per ``key``: a second
    registration is a no-op)."""
    _READERS.setdefault(key, reader)
    return reader


def _wrap_clip_grad_norm(clip_grad_norm: Callable) -> Callable:
    @functools.wraps(clip_grad_norm)
    def clip_grad_norm_read_by_plugins(self, clip_norm):
        norm = clip_grad_norm(self, clip_norm)
        for reader in list(_READERS.values()):
            reader(self, norm)
        return norm

    return clip_grad_norm_read_by_plugins


def install() -> None:
    """Wrap ``fairseq.trainer.Trainer.clip_grad_norm`` (idempotent)."""
    import fairseq.trainer

    wrap_once(fairseq.trainer.Trainer, "clip_grad_norm", _wrap_clip_grad_norm)
