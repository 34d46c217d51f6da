"""The process-wide repairs of fairseq and torch behaviour that the plugins need, one module per repair.

Each module says in its docstring what fairseq or torch does wrong and in which version, and has an
idempotent ``install()``. Importing a module here changes nothing: the one place they are installed is
the list [`fairseq_plugins.REPAIRS`][fairseq_plugins.REPAIRS], which ``import fairseq_plugins`` (and so
``--user-dir fairseq_plugins``) installs in order.

A repair knows fairseq and torch, never a feature of the plugins: the features (the stability monitor, the
guard) register into the generic repairs' registries (`training_flags.register_arg_adder`,
`train_step.register_step_wrapper`, `grad_norm.register_norm_reader`) when ``fairseq_plugins`` imports them. The modules here import only each
other and `fairseq_plugins.flags` (a test enforces it).
"""

from . import (  # noqa: F401  (the modules only: nothing is installed by importing them)
    checkpoint_broadcast,
    cpu_ddp,
    fairscale_warnings,
    flag_checks,
    grad_norm,
    last_batch,
    launcher_env,
    one_line_errors,
    safe_checkpoint,
    train_step,
    training_flags,
)

__all__ = ["checkpoint_broadcast", "cpu_ddp", "fairscale_warnings", "flag_checks", "grad_norm", "last_batch",
           "launcher_env", "one_line_errors", "safe_checkpoint", "train_step", "training_flags"]
