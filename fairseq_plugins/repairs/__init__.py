"""The process-wide repairs of fairseq and torch behaviour that the plugins need, one module per repair.

Each module says in its docstring what fairseq or torch does wrong and in which version, and has an
idempotent ``install()``. Importing a module here changes nothing: the one place they are installed is
the list [`fairseq_plugins.REPAIRS`][fairseq_plugins.REPAIRS], which ``import fairseq_plugins`` (and so
``--user-dir fairseq_plugins``) installs in order.
"""

from . import (  # noqa: F401  (the modules only: nothing is installed by importing them)
    checkpoint_broadcast,
    cpu_ddp,
    fairscale_warnings,
    flag_checks,
    guard_flags,
    guard_train_step,
    last_batch,
    launcher_env,
    monitor_flags,
    monitor_train_step,
    one_line_errors,
    safe_checkpoint,
)

__all__ = ["checkpoint_broadcast", "cpu_ddp", "fairscale_warnings", "flag_checks", "guard_flags", "guard_train_step",
           "last_batch", "launcher_env", "monitor_flags", "monitor_train_step", "one_line_errors", "safe_checkpoint"]
