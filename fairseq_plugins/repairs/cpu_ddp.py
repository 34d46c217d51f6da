"""Let fairseq's default ``--ddp-backend`` (``c10d`` / ``pytorch_ddp``) wrap a model on the CPU.

fairseq-fixed 0.12.3.1 wraps the model for ``--ddp-backend c10d`` / ``pytorch_ddp`` (its default) as
``DistributedDataParallel(model, device_ids=[args.device_id], ...)``, which torch refuses for a model on the
CPU ("device_ids ... must be None for CPU modules"), so a multi-rank CPU run (gloo) fails unless the user
knows to pick ``no_c10d`` or ``legacy_ddp``. `install` points the wrapper class fairseq uses
(``fairseq.models.distributed_fairseq_model.DistributedDataParallel``) at
`CpuAwareDistributedDataParallel`, a subclass that passes ``device_ids=None, output_device=None`` when the
module's parameters are on the CPU and changes nothing on CUDA.
"""

import torch

from ._wrap import wrap_once

__all__ = ["install", "CpuAwareDistributedDataParallel"]


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


def _use_cpu_aware(ddp_class: type) -> type:
    return CpuAwareDistributedDataParallel


def install() -> None:
    """Point fairseq's c10d/pytorch_ddp wrapper at `CpuAwareDistributedDataParallel` (idempotent)."""
    from fairseq.models import distributed_fairseq_model

    wrap_once(distributed_fairseq_model, "DistributedDataParallel", _use_cpu_aware)
