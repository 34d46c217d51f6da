"""fairseq plugins of the toolbox: ``fairseq-train --user-dir fairseq_plugins ...``.

Importing this package (which ``--user-dir`` does) registers, once per process:

* models   (``fairseq_plugins/models``): ``transformer_admin`` and its architectures, ``listops_tree``
* tasks    (``fairseq_plugins/tasks``):  ``listops`` (its pure-Python data code: `toolbox_core.listops`)
* criteria (``fairseq_plugins/criterions``): ``cross_entropy_moe``, ``label_smoothed_cross_entropy_moe``
  (the stock ones plus the balance loss of ``--moe-experts``, `fairseq_plugins.moe`)
* optimizers: ``addsign``, ``powersign``

makes fairseq checkpoints load with torch's safe ``weights_only=True`` unpickler
(`fairseq_plugins.safe_checkpoint`), and keeps the last batch that fairseq-fixed drops, so
generation and validation see every sentence (`fairseq_plugins.batching`), lets ``--ddp-backend
c10d``/``pytorch_ddp`` (fairseq's default) wrap a CPU model (`fairseq_plugins.distributed`), and ends a tool with one
line naming the flag (exit 2) for a bad plugin flag, before any data is loaded (`fairseq_plugins.flags`). The algorithms live in ``admin_torch``, ``reinmax`` and
``sign_optim``; this package only adapts them to fairseq.

The directory works as ``--user-dir`` from the repository root (``--user-dir fairseq_plugins``)
and, once installed, by absolute path:

    fairseq-train --user-dir "$(python -c 'import fairseq_plugins, os; print(os.path.dirname(fairseq_plugins.__file__))')" ...
"""

import warnings

# fairseq imports fairscale (installed for --zero-sharding os / fully_sharded), whose 0.4.13 decorates with the
# deprecated torch.cuda.amp.custom_fwd/bwd at import: two FutureWarnings on every tool's stderr, about code that
# is neither the user's nor ours
warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.custom_(fwd|bwd)", category=FutureWarning)

from . import batching, distributed, safe_checkpoint  # noqa: E402

safe_checkpoint.install()
batching.install()
distributed.install()

# fairseq auto-imports models/ and tasks/ of a --user-dir; optimizers must be imported here.
# Importing models/ and tasks/ here as well makes `import fairseq_plugins` alone enough.
from . import criterions, models, moe, optim, tasks  # noqa: E402,F401
from . import flags  # noqa: E402

# after the registrations: bad plugin flags end with one line and exit 2, before any data loads
flags.install()
from . import monitor  # noqa: E402,F401  (--stability-monitor DIR: fairseq_plugins/monitor.py)

__all__ = ["batching", "criterions", "distributed", "flags", "models", "moe", "optim", "tasks", "safe_checkpoint"]
