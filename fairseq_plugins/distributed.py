"""fairseq's distributed back-ends with the toolbox, on CPU and CUDA: one repair and one set of flag checks.

* **Repair** (`install`): fairseq wraps the model for ``--ddp-backend c10d`` / ``pytorch_ddp`` (its
  default) as ``DistributedDataParallel(model, device_ids=[args.device_id], ...)``, which PyTorch refuses for a
  model on the CPU ("device_ids ... must be None for CPU modules"). The wrapper class fairseq uses is replaced
  by a subclass that passes ``device_ids=None, output_device=None`` when the module's parameters are on the
  CPU, and changes nothing on CUDA.
* **Repair** (`install`): under ``torchrun`` / ``torch.distributed.launch`` (one or several nodes) fairseq
  takes the world from the launcher only when ``--distributed-world-size`` is also given (otherwise every
  process trains alone, silently), and then sets ``device_id = rank % torch.cuda.device_count()``, a division
  by zero on a CPU machine and the wrong GPU on a node whose ranks do not start at 0. The launcher's
  ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` are taken as they are (``env://`` init, device = local rank).
* **Checks** (before any data loads, one line naming the flag, exit 2): ``--ddp-backend fully_sharded`` is
  fairscale's FullyShardedDataParallel, which fairseq runs on CUDA only; on the CPU (``--cpu`` or no CUDA
  device) it is refused, naming the back-ends that work there. ``fully_sharded`` and ``--zero-sharding os``
  need fairscale (``make install`` builds it); without it the line says so.

Measured here (2 gloo CPU ranks, tests/fairseq_plugins/test_distributed_backends.py): ``c10d``,
``pytorch_ddp``, ``no_c10d`` and ``legacy_ddp`` train Admin (profiled), the sign optimizers and MoE;
``--zero-sharding os`` trains under ``legacy_ddp``.
"""

import importlib.util
import os

import torch

from .flags import FlagError, flag_check

__all__ = ["install", "CpuAwareDistributedDataParallel"]

CPU_BACKENDS = ("c10d", "pytorch_ddp", "no_c10d", "legacy_ddp")


def _cpu_aware(ddp_class: type) -> type:
    class CpuAwareDistributedDataParallel(ddp_class):
        """torch's DistributedDataParallel that takes fairseq's ``device_ids`` only for a module on a GPU."""

        _cpu_aware = True

        def __init__(self, module, device_ids=None, output_device=None, *args, **kwargs):
            if all(p.device.type == "cpu" for p in module.parameters()):
                device_ids = output_device = None
            super().__init__(module, device_ids, output_device, *args, **kwargs)

    return CpuAwareDistributedDataParallel


CpuAwareDistributedDataParallel = _cpu_aware(torch.nn.parallel.DistributedDataParallel)


LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


def _launcher_aware(infer_init_method):
    def infer_from_launcher(cfg, force_distributed=False):
        """fairseq's ``infer_init_method``, with torchrun's world taken as torchrun gives it (module docstring)."""
        if (cfg.distributed_init_method is None and not getattr(cfg, "tpu", False)
                and all(k in os.environ for k in LAUNCHER_ENV) and int(os.environ["WORLD_SIZE"]) > 1):
            cfg.distributed_init_method = "env://"
            cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
            cfg.distributed_rank = int(os.environ["RANK"])
            cfg.device_id = int(os.environ.get("LOCAL_RANK", 0))
            cfg.distributed_no_spawn = True  # the launcher made the processes
            if torch.cuda.is_available() and cfg.device_id < torch.cuda.device_count():
                torch.cuda.set_device(cfg.device_id)
            return None
        return infer_init_method(cfg, force_distributed)

    infer_from_launcher._launcher_aware = True
    return infer_from_launcher


def install() -> None:
    """Point fairseq's c10d/pytorch_ddp wrapper at `CpuAwareDistributedDataParallel` and its init-method
    inference at the launcher-aware one (idempotent)."""
    from fairseq.distributed import utils as distributed_utils
    from fairseq.models import distributed_fairseq_model

    if not getattr(distributed_fairseq_model.DistributedDataParallel, "_cpu_aware", False):
        distributed_fairseq_model.DistributedDataParallel = CpuAwareDistributedDataParallel
    if not getattr(distributed_utils.infer_init_method, "_launcher_aware", False):
        distributed_utils.infer_init_method = _launcher_aware(distributed_utils.infer_init_method)


def _has_fairscale() -> bool:
    return importlib.util.find_spec("fairscale") is not None


@flag_check
def check_distributed_backend(args) -> None:
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
