"""Let ranks > 0 receive the checkpoint that rank 0 loaded, under torch's safe unpickler.

On resume, fairseq-fixed 0.12.3.1 loads the checkpoint on rank 0 only and sends it to the other ranks with
``fairseq.distributed.utils._broadcast_object_slow``, which pickles with ``torch.save`` and unpickles with
``torch.load``, i.e. with ``weights_only=True`` in torch >= 2.6. Two things in that message are not
checkpoint contents and are refused there, so every multi-rank resume fails on ranks > 0: fairseq's own
``_TensorPlaceholder``, and the omegaconf ``DictConfig`` that ``load_checkpoint_to_cpu`` made of ``cfg``.
`install` wraps ``_broadcast_object_slow`` so that ``_TensorPlaceholder`` is allowed for the duration of the
call only and ``cfg`` travels as a plain dict, rebuilt on arrival exactly as ``load_checkpoint_to_cpu``
builds it. Nothing else is allowlisted (the checkpoint's own classes: the
[`safe_checkpoint`][fairseq_plugins.repairs.safe_checkpoint] repair).
"""

import functools
from typing import Callable

import torch

from ._wrap import wrap_once

__all__ = ["install"]


def _guarded_broadcast(broadcast_slow: Callable) -> Callable:
    """Wrap fairseq's ``_broadcast_object_slow`` (module docstring)."""
    from fairseq.distributed.utils import _TensorPlaceholder
    from omegaconf import OmegaConf

    @functools.wraps(broadcast_slow)
    def _broadcast_object_slow(obj, *args, **kwargs):
        if isinstance(obj, dict) and OmegaConf.is_config(obj.get("cfg")):
            obj = {**obj, "cfg": OmegaConf.to_container(obj["cfg"]), "__cfg_was_omegaconf__": True}
        with torch.serialization.safe_globals([_TensorPlaceholder]):
            obj = broadcast_slow(obj, *args, **kwargs)
        if isinstance(obj, dict) and obj.pop("__cfg_was_omegaconf__", False):
            obj["cfg"] = OmegaConf.create(obj["cfg"], flags={"allow_objects": True})
        return obj

    return _broadcast_object_slow


def install() -> None:
    """Wrap fairseq's ``_broadcast_object_slow`` (idempotent)."""
    from fairseq.distributed import utils as distributed_utils

    wrap_once(distributed_utils, "_broadcast_object_slow", _guarded_broadcast)
