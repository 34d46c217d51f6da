"""AddSign and PowerSign as torch's optimizer test suite describes an optimizer: ``OptimizerInfo`` entries.

torch's ``test/test_optim.py`` runs every entry of ``torch.testing._internal.common_optimizers.optim_db`` through
its conventions (per-group hyper-parameters, tensor lr, foreach/fused/capturable parity with the for-loop, state
dict round trips, hooks, meta parameters, errors). :func:`register` appends these entries to ``optim_db``; the
pytest plugin ``tests.sign_optim.torch_suite_plugin`` does it before torch's file is collected, so the suite runs
unchanged against the sign optimizers::

    python tools/run_torch_optim_suite.py /path/to/pytorch/test/test_optim.py

Every input uses the flags the optimizers support (weight decay, maximize, alpha, beta, every internal decay,
tensor lr, capturable); the global flags foreach/fused are added by torch's own helper.
"""

import torch
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
    optim_db,
)

from sign_optim import AddSign, CosineInternalDecay, LinearInternalDecay, PowerSign, RestartCosineInternalDecay


def _inputs(alpha_kwargs):
    def optim_inputs(device, dtype=None):
        inputs = [
            OptimizerInput(params=None, kwargs={}, desc="default"),
            OptimizerInput(params=None, kwargs={"lr": 0.01}, desc="non-default lr"),
            OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="nonzero weight_decay"),
            OptimizerInput(params=None, kwargs={"weight_decay": 0.1, "maximize": True}, desc="maximize"),
            OptimizerInput(params=None, kwargs={"beta": 0.5, **alpha_kwargs}, desc="beta and alpha"),
            OptimizerInput(params=None, kwargs={"sign_internal_decay": LinearInternalDecay(10)}, desc="linear decay"),
            OptimizerInput(params=None, kwargs={"sign_internal_decay": CosineInternalDecay(20, zero_after=0.4)},
                           desc="cosine decay"),
            OptimizerInput(params=None, kwargs={"sign_internal_decay": RestartCosineInternalDecay(12, 3)},
                           desc="restart decay"),
            OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.01)}, desc="tensor lr"),
            OptimizerInput(params=None, kwargs={"capturable": True}, desc="capturable"),
            OptimizerInput(params=None, kwargs={"capturable": True, "weight_decay": 0.1,
                                                "sign_internal_decay": CosineInternalDecay(20)},
                           desc="capturable, decay"),
            OptimizerInput(params=None, kwargs={"capturable": True, "lr": torch.tensor(0.01)},
                           desc="capturable, tensor lr"),
        ]
        return inputs

    return optim_inputs


def _errors(device, dtype):
    errors = get_error_inputs_for_all_optims(device, dtype)
    if torch.device(device).type == "cpu":
        errors += [
            ErrorOptimizerInput(OptimizerInput(params=None, kwargs=dict(beta=1.0), desc="beta in [0, 1)"),
                                error_type=ValueError, error_regex="beta"),
            ErrorOptimizerInput(OptimizerInput(params=None, kwargs=dict(weight_decay=-1.0), desc="weight_decay >= 0"),
                                error_type=ValueError, error_regex="weight_decay"),
            ErrorOptimizerInput(OptimizerInput(params=None, kwargs=dict(sign_internal_decay=3), desc="decay callable"),
                                error_type=TypeError, error_regex="sign_internal_decay"),
        ]
    return errors


ADDSIGN = OptimizerInfo(AddSign, optim_inputs_func=_inputs({"alpha": 2.0}), optim_error_inputs_func=_errors,
                        supported_impls=("foreach", "fused"), has_capturable_arg=True, supports_complex=False,
                        supports_fused_on=("cpu", "cuda"))
POWERSIGN = OptimizerInfo(PowerSign, optim_inputs_func=_inputs({"alpha": 2.0}), optim_error_inputs_func=_errors,
                          supported_impls=("foreach", "fused"), has_capturable_arg=True, supports_complex=False,
                          supports_fused_on=("cpu", "cuda"))
SIGN_OPTIM_INFOS = [ADDSIGN, POWERSIGN]


def register(only_sign_optimizers: bool = True) -> None:
    """Append the entries to torch's ``optim_db`` (once); with ``only_sign_optimizers`` the database holds only
    them, so the suite tests these two optimizers and not torch's own again."""
    if only_sign_optimizers:
        optim_db[:] = [info for info in optim_db if info in SIGN_OPTIM_INFOS]
    for info in SIGN_OPTIM_INFOS:
        if info not in optim_db:
            optim_db.append(info)
