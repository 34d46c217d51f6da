"""Take the world of ``torchrun`` / ``torch.distributed.launch`` as the launcher gives it.

Under a launcher (one or several nodes), fairseq-fixed 0.12.3.1's ``distributed.utils.infer_init_method``
takes the world from the launcher only when ``--distributed-world-size`` is also given (otherwise every
process trains alone, silently), and then sets ``device_id = rank % torch.cuda.device_count()``: a division
by zero on a CPU machine and the wrong GPU on a node whose ranks do not start at 0. `install` wraps
``infer_init_method``: when the launcher's ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE`` (> 1) and ``RANK``
are set and no ``--distributed-init-method`` is given, they are taken as they are (``env://`` init, device =
``LOCAL_RANK``, no spawning); otherwise fairseq's own inference runs.
"""

import os

import torch

from ._wrap import wrap_once

__all__ = ["install", "LAUNCHER_ENV"]

#: the environment variables a launcher sets for every process (all of them are needed)
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

    return infer_from_launcher


def install() -> None:
    """Wrap fairseq's ``distributed.utils.infer_init_method`` (idempotent)."""
    from fairseq.distributed import utils as distributed_utils

    wrap_once(distributed_utils, "infer_init_method", _launcher_aware)
