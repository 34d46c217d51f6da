"""fairseq's distributed back-ends with the toolbox, on CPU and CUDA: the flag checks.

* **Checks** (before any data loads, one line naming the flag, exit 2): ``--ddp-backend fully_sharded`` is
  fairscale's FullyShardedDataParallel, which fairseq runs on CUDA only; on the CPU (``--cpu`` or no CUDA
  device) it is refused, naming the back-ends that work there. ``fully_sharded`` and ``--zero-sharding os``
  need fairscale (``make install`` builds it); without it the line says so.
* **Repairs** (installed by ``import fairseq_plugins``): ``--ddp-backend c10d`` / ``pytorch_ddp`` wrap a CPU
  model ([`fairseq_plugins.repairs.cpu_ddp`][fairseq_plugins.repairs.cpu_ddp]), and the world of ``torchrun`` /
  ``torch.distributed.launch`` is taken as the launcher gives it
  ([`fairseq_plugins.repairs.launcher_env`][fairseq_plugins.repairs.launcher_env]).

Measured here (2 gloo CPU ranks, tests/fairseq_plugins/test_distributed_backends.py): ``c10d``,
``pytorch_ddp``, ``no_c10d`` and ``legacy_ddp`` train Admin (profiled), the sign optimizers and MoE;
``--zero-sharding os`` trains under ``legacy_ddp``.
"""

import importlib.util

import torch

from .flags import FlagError, flag_check
from .repairs.cpu_ddp import CpuAwareDistributedDataParallel

__all__ = ["CPU_BACKENDS", "check_distributed_backend", "CpuAwareDistributedDataParallel"]

#: the ``--ddp-backend`` values that train on the CPU
CPU_BACKENDS = ("c10d", "pytorch_ddp", "no_c10d", "legacy_ddp")


def _has_fairscale() -> bool:
    return importlib.util.find_spec("fairscale") is not None


@flag_check
def check_distributed_backend(args) -> None:
    """``--ddp-backend`` and ``--zero-sharding`` of a parsed command line (module docstring)."""
    backend = getattr(args, "ddp_backend", None)
    on_cpu = bool(getattr(args, "cpu", False)) or not torch.cuda.is_available()
    if backend == "fully_sharded":
        if on_cpu:
            raise FlagError("--ddp-backend fully_sharded: fairseq's fully sharded back-end (fairscale's "
                            "FullyShardedDataParallel) runs on CUDA only; on the CPU use one of "
                            f"{', '.join(CPU_BACKENDS)}")
        if not _has_fairscale():
            raise FlagError("--ddp-backend fully_sharded needs fairscale (make install builds it: "
                            "BUILD_CUDA_EXTENSIONS=0 pip install --no-build-isolation fairscale==0.4.13)")
    if getattr(args, "zero_sharding", "none") == "os" and not _has_fairscale():
        raise FlagError("--zero-sharding os needs fairscale (make install builds it: "
                        "BUILD_CUDA_EXTENSIONS=0 pip install --no-build-isolation fairscale==0.4.13)")
