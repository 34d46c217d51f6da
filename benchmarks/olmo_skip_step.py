"""OLMo-core's real ``SkipStepAdamW`` (ai2-olmo-core 3.0.0), loaded from its wheel without installing the package.

``pip install ai2-olmo-core==3.0.0`` cannot go into this project's environment: it requires ``cached-path``,
whose every release requires ``huggingface-hub < 2.0``, and the project pins ``huggingface-hub==2.4.0``
(transformers needs it). The optimizer itself needs none of that: its two source files
(``olmo_core/optim/skip_step_optimizer.py`` and ``olmo_core/optim/adamw.py``) import torch and four small
helpers. `load` executes those two files, unmodified, from the wheel unpacked in a directory, with the four
helpers given their one-process meaning (``get_local_tensor``: a DTensor's shard, else the tensor;
``move_to_device``: ``tensor.to(device)``; ``get_default_device``: the CPU; ``DType``/``OptimConfig``: unused
bases of the config classes). Fetch the wheel (``pip download`` reads the registry, installs nothing)::

    .venv/bin/pip download --no-deps ai2-olmo-core==3.0.0 -d work/wheels
    python -c "import zipfile; zipfile.ZipFile('work/wheels/ai2_olmo_core-3.0.0-py3-none-any.whl').extractall('work/wheels/olmo_core')"
"""

import importlib
import sys
import types
from pathlib import Path
from typing import Generic, TypeVar

import torch

__all__ = ["load"]


def _module(name: str, path=None, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    if path is not None:
        m.__path__ = [str(path)]
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def load(unpacked: str):
    """The class ``olmo_core.optim.adamw.SkipStepAdamW`` from the wheel unpacked in ``unpacked``."""
    root = Path(unpacked) / "olmo_core"
    if not (root / "optim" / "adamw.py").is_file():
        raise FileNotFoundError(f"{unpacked}: no olmo_core/optim/adamw.py (unpack ai2_olmo_core-3.0.0's wheel there)")
    if "olmo_core.optim.adamw" in sys.modules:
        return sys.modules["olmo_core.optim.adamw"].SkipStepAdamW

    def get_local_tensor(x):
        return x.to_local() if type(x).__name__ == "DTensor" else x

    opt = TypeVar("opt")

    class OptimConfig(Generic[opt]):
        @classmethod
        def register(cls, name):  # the config registry: not used here
            return lambda c: c

    class DType:
        pass

    _module("olmo_core", root)
    _module("olmo_core.utils", move_to_device=lambda o, device, non_blocking=None: o.to(device),
            get_default_device=lambda: torch.device("cpu"))
    _module("olmo_core.config", DType=DType)
    _module("olmo_core.distributed", root / "distributed")
    _module("olmo_core.distributed.utils", get_local_tensor=get_local_tensor)
    _module("olmo_core.optim", root / "optim")  # its __init__ (every optimizer, models, configs) is not run
    _module("olmo_core.optim.config", OptimConfig=OptimConfig)
    return importlib.import_module("olmo_core.optim.adamw").SkipStepAdamW
