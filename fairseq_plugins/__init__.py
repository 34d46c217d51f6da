"""fairseq plugins of the toolbox: ``fairseq-train --user-dir fairseq_plugins ...``.

Importing this package (which ``--user-dir`` does) does two things, once per process.

It installs the repairs of fairseq and torch behaviour listed in `REPAIRS`, in that order: one module
each under ``fairseq_plugins/repairs``, whose docstring says what fairseq or torch does wrong. Nothing
else in the package patches anything, at import or later.

Then it registers (as fairseq plugins do: each module only registers and subclasses):

* models   (``fairseq_plugins/models``): ``transformer_admin`` and its architectures, ``transformer_lm_admin``
  and its architectures, ``listops_tree``; their layers live in ``fairseq_plugins/modules``
* tasks    (``fairseq_plugins/tasks``):  ``listops`` (its pure-Python data code: the `listops_data` package)
* criteria (``fairseq_plugins/criterions``): ``cross_entropy_moe``, ``label_smoothed_cross_entropy_moe``
  (the stock ones plus the balance loss of ``--moe-experts``, `fairseq_plugins.moe_ffn`), ``cross_entropy_zloss``,
  ``label_smoothed_cross_entropy_zloss``, ``listops_cross_entropy``
* optimizers (``fairseq_plugins/optim``): ``addsign``, ``powersign``
* the training-loop flags ``--stability-monitor DIR`` (`fairseq_plugins.monitor`) and ``--stability-guard``
  (`fairseq_plugins.guard`): each registers its flags and its step wrapper into the generic repairs
  ``training_flags`` and ``train_step``, which carry the flags on fairseq's configuration and run the wrappers
  around ``Trainer.train_step`` (the monitor's outermost: it is imported first); the guard also reads each
  update's gradient norm from ``Trainer.clip_grad_norm`` (the repair ``grad_norm``)

and the checks of their flags (`fairseq_plugins.flags`): a bad plugin flag ends a tool with one line
naming the flag (exit 2), before any data is loaded. The algorithms live in ``admin_torch``, ``reinmax``,
``sign_optim`` and ``stability_toolbox``; this package only adapts them to fairseq.

The directory works as ``--user-dir`` from the repository root (``--user-dir fairseq_plugins``)
and, once installed, by absolute path:

    fairseq-train --user-dir "$(python -c 'import fairseq_plugins, os; print(os.path.dirname(fairseq_plugins.__file__))')" ...
"""

from . import repairs  # the repair modules only: importing them patches nothing

REPAIRS = (
    repairs.fairscale_warnings,    # fairscale 0.4.13's two FutureWarnings on every tool's stderr
    repairs.one_line_errors,       # a bad flag, unusable data, a refused checkpoint: one line, not a traceback
    repairs.safe_checkpoint,       # fairseq checkpoints load with torch's weights_only=True unpickler
    repairs.checkpoint_broadcast,  # ranks > 0 receive rank 0's checkpoint under that unpickler
    repairs.last_batch,            # batch_by_size keeps the last batch that fairseq drops
    repairs.cpu_ddp,               # --ddp-backend c10d / pytorch_ddp wrap a CPU model
    repairs.launcher_env,          # torchrun's world taken as the launcher gives it
    repairs.flag_checks,           # the plugins' flag checks run once, on the parsed command line
    repairs.training_flags,        # fairseq-train's parser gets the features' flags, carried on cfg.common
    repairs.train_step,            # the features' step wrappers run around Trainer.train_step
    repairs.grad_norm,             # the features read the gradient norm Trainer.clip_grad_norm computes
)
"""Every process-wide repair of fairseq / torch behaviour, one module each (`fairseq_plugins.repairs`), installed in
this order by ``import fairseq_plugins``; each ``install()`` is idempotent. The warnings filter comes first: it must
precede the first import of fairseq."""

for _repair in REPAIRS:
    _repair.install()

# fairseq auto-imports models/ and tasks/ of a --user-dir; optimizers and criteria must be imported here.
# Importing models/ and tasks/ here as well makes `import fairseq_plugins` alone enough. The flag checks run
# in this order (the first failing one is reported).
from . import distributed  # noqa: E402,F401  (the --ddp-backend checks)
from . import criterions, models, moe_ffn, optim, tasks  # noqa: E402,F401  (registrations)
from . import monitor  # noqa: E402,F401  (--stability-monitor: its flags, checks and step wrapper, registered)
from . import guard  # noqa: E402,F401  (--stability-guard: the same, its wrapper inside the monitor's)

__all__ = ["REPAIRS", "criterions", "distributed", "flags", "guard", "models", "modules", "moe_ffn", "monitor",
           "optim", "repairs", "tasks"]
