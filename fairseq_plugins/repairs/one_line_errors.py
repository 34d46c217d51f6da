"""Report a bad plugin flag, unusable data or a refused checkpoint as one line, not a traceback.

fairseq-fixed 0.12.3.1 lets an exception raised while a tool sets up (arguments, task, data, checkpoint)
reach the interpreter, which prints the whole traceback (about 50 lines through fairseq's and hydra's
frames) for what is a one-line user error. `install` chains a ``sys.excepthook`` that prints the types
recorded by [`fairseq_plugins.flags.one_line_errors`][fairseq_plugins.flags.one_line_errors]
([`FlagError`][fairseq_plugins.flags.FlagError]: exit status 2, like argparse;
[`DataError`][fairseq_plugins.flags.DataError] and the checkpoint refusals: 1) as ``<prog>: error: <message>`` and
hands every other exception to the previous hook.
"""

import os
import sys

from .. import flags
from ._wrap import wrap_once

__all__ = ["install"]


def _excepthook(previous):
    def hook(exc_type, exc, tb):
        status = flags.one_line_status(exc_type)
        if status is None:
            return previous(exc_type, exc, tb)
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fairseq"
        sys.stdout.flush()
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        # SystemExit from an excepthook sets the exit status; finally blocks have run and atexit handlers run
        raise SystemExit(status)

    return hook


def install() -> None:
    """Chain the one-line ``sys.excepthook`` (idempotent)."""
    wrap_once(sys, "excepthook", _excepthook)
