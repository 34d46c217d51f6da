"""sign_optim: AddSign and PowerSign (Bello et al., ICML 2017, arXiv 1709.07417) with internal decays.

Examples:
    >>> import torch, sign_optim
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = sign_optim.PowerSign(model.parameters(), lr=1e-3,
    ...                            sign_internal_decay=sign_optim.CosineInternalDecay(1000))
"""

import torch as _torch

from . import functional, fused
from .addsign import AddSign
from .decays import (
    DECAY_KINDS,
    CosineInternalDecay,
    InternalDecay,
    LinearInternalDecay,
    RestartCosineInternalDecay,
    internal_decay_from_state_dict,
    make_internal_decay,
)
from .powersign import PowerSign
from .sign_optimizer import SignOptimizer

# The decays hold numbers only: checkpoints that contain one load with torch.load(weights_only=True).
# (ZeroRedundancyOptimizer copies the constructor's keyword arguments into its param groups, so its
# consolidated state dict holds the decay object itself.)
_torch.serialization.add_safe_globals([LinearInternalDecay, CosineInternalDecay, RestartCosineInternalDecay])


def _warn_without_kernel() -> None:
    """One warning at import when the optional C kernel was not built: what it costs and how to get it."""
    import importlib.util
    import warnings

    if importlib.util.find_spec("sign_optim._C") is None:
        warnings.warn("sign_optim: the fused CPU operator (sign_optim/csrc/fused_sign.cpp) is not built, so AddSign "
                      "and PowerSign step CPU parameters with torch's foreach ops, 2-7x slower "
                      "(benchmarks/bench_sign_optim.py; CUDA parameters are unaffected); reinstall beside torch with "
                      "a C++ compiler (pip install --no-build-isolation . or make install) to build it",
                      RuntimeWarning, stacklevel=2)


_warn_without_kernel()

__all__ = [
    "functional",
    "fused",
    "AddSign",
    "PowerSign",
    "SignOptimizer",
    "InternalDecay",
    "LinearInternalDecay",
    "CosineInternalDecay",
    "RestartCosineInternalDecay",
    "DECAY_KINDS",
    "make_internal_decay",
    "internal_decay_from_state_dict",
]
