"""Load fairseq checkpoints with torch's safe (``weights_only=True``) unpickler.

fairseq-fixed 0.12.3.1's ``checkpoint_utils.load_checkpoint_to_cpu`` calls ``torch.load`` without
``weights_only``, and torch >= 2.6 then unpickles with ``weights_only=True``: a checkpoint of any fairseq
model fails to load (its ``args`` entry is an ``argparse.Namespace``, not allowlisted), and a truncated or
unsafe file fails with torch's long, unclassified ``UnpicklingError``.

torch's safe unpickler accepts only tensors, plain containers
(dict, OrderedDict, list, ...), numbers, strings and allowlisted classes. A fairseq checkpoint
written by this stack (any model, optimizer, lr scheduler, with or without validation, one or
several ranks) holds exactly one class beyond that: ``argparse.Namespace``, its ``args`` entry.
`install` allowlists that class and nothing else, so

* checkpoints of this stack resume and decode with the safe loader, and
* a checkpoint whose pickle names any other global (``os.system``, ``builtins.eval`` ...) is
  refused with `UnsafeCheckpointError` before anything in it runs, and a truncated or
  corrupted file raises `CorruptCheckpointError`; both name the file.

Ranks > 0 of a distributed run receive the checkpoint from rank 0 through the same unpickler;
[`checkpoint_broadcast`][fairseq_plugins.repairs.checkpoint_broadcast] makes that message loadable.

Nothing here sets ``weights_only=False`` or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``.

Examples:
    >>> from fairseq_plugins.repairs import safe_checkpoint
    >>> safe_checkpoint.install()          # done by ``--user-dir fairseq_plugins``
    >>> all(isinstance(cls, type) for cls in safe_checkpoint.safe_globals())   # what checkpoints may hold
    True

after which ``fairseq.checkpoint_utils.load_checkpoint_to_cpu(path)`` loads with ``weights_only=True``.
"""

import argparse
import functools
import pickle
import zipfile
from typing import Callable, List

import torch

from .. import flags
from ._wrap import wrap_once

__all__ = ["install", "safe_globals", "UnsafeCheckpointError", "CorruptCheckpointError"]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle references a global outside the allowlist; nothing was executed."""


class CorruptCheckpointError(RuntimeError):
    """The checkpoint file is truncated, empty or not a torch checkpoint."""


def safe_globals() -> List[type]:
    """The classes a fairseq checkpoint contains beyond tensors and plain containers."""
    return [argparse.Namespace]


def _unsafe_global(err: Exception) -> str:
    """The line of torch's refusal that names the global (``... GLOBAL posix.system ...``), if any."""
    for line in str(err).splitlines():
        if "GLOBAL" in line:
            return line.strip().split(" was not an allowed")[0]
    return ""


def _is_intact_zip(path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def _guarded(load: Callable) -> Callable:
    """Wrap fairseq's ``load_checkpoint_to_cpu`` so unsafe and corrupt files fail with a clear error."""

    @functools.wraps(load)
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        try:
            return load(path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as err:  # classify, then re-raise anything that is neither unsafe nor corrupt
            unsafe = _unsafe_global(err) if isinstance(err, pickle.UnpicklingError) else ""
            if unsafe:
                raise UnsafeCheckpointError(
                    f"refusing to load checkpoint {path}: its pickle needs a global outside the "
                    f"allowlist of fairseq_plugins.safe_checkpoint ({unsafe}), so loading it could "
                    f"run code. Nothing in it was executed."
                ) from None
            if not _is_intact_zip(path):
                raise CorruptCheckpointError(
                    f"checkpoint {path} is truncated or corrupted (not an intact torch zip "
                    f"archive; {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                ) from None
            raise

    return load_checkpoint_to_cpu


def install() -> None:
    """Allowlist fairseq's checkpoint classes and guard fairseq's checkpoint loader (idempotent)."""
    torch.serialization.add_safe_globals(safe_globals())
    from fairseq import checkpoint_utils

    wrap_once(checkpoint_utils, "load_checkpoint_to_cpu", _guarded)
    # a refusal is printed as one "error:" line instead of a traceback (exit status 1)
    flags.one_line_errors(UnsafeCheckpointError, CorruptCheckpointError, status=1)
