"""Profiled Admin: set each sublayer's omega from one forward pass on real data.

The original two-stage Admin (Transformer-Clinic, ``--init-type adaptive-profiling``) runs one
forward pass in which every residual sublayer, at the moment it is called, takes the current
running value of its stack as omega and then updates it:

    v = 1                                         # per stack (encoder, decoder: separate chains)
    for each residual sublayer i, in call order:
        omega_i = v                               # set before the sublayer's output is formed
        v = sqrt(Var[x_i * omega_i] + Var[f_i(x_i)])

where ``Var`` is the population variance (ddof 0) over ALL elements of the tensor (batch, time,
features, padding included), exactly as ``np.var(t.view(-1))`` in Transformer-Clinic. Because
``x_i`` is a LayerNorm output (variance ~1), ``Var[x_i * omega_i] ~ omega_i^2`` and the rule is
``omega_i^2 ~ 1 + sum_{j<i} Var[f_j(x_j)]``. The omega of sublayer i depends on the outputs of
the sublayers before it computed WITH their already-set omegas, so each omega is written into
its module as soon as it is measured, inside the same forward pass.

Transformer-Clinic profiles in training mode (dropout on, f includes its dropout);
[`profile_omegas`][admin_torch.profile_omegas] uses whatever mode the model is in.
"""

import json
import math
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from toolbox_core import validation
from toolbox_core.files import atomic_write, check_output_path

from .residual import OmegaResidual

__all__ = ["profile_omegas", "apply_omegas", "save_profile", "load_profile", "omega_residuals"]

_PROFILE_FORMAT = "admin_torch.profile"


def omega_residuals(model: nn.Module) -> List[Tuple[str, OmegaResidual]]:
    """The ``(name, module)`` pairs of every [`OmegaResidual`][admin_torch.OmegaResidual] in ``model``, in registration order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, OmegaResidual)]


def _chain_of(names: Sequence[str], model: nn.Module, chains) -> Dict[str, int]:
    """Map each residual name to the index of its chain (stack)."""
    if chains is None:
        return {n: 0 for n in names}
    module_names = {id(m): n for n, m in model.named_modules()}
    prefixes = []
    for c in chains:
        if isinstance(c, str):
            prefixes.append(c)
        elif isinstance(c, nn.Module):
            if id(c) not in module_names:
                raise ValueError("chains: a module given is not a submodule of model")
            prefixes.append(module_names[id(c)])
        else:
            raise TypeError(f"chains must hold submodule names (str) or nn.Module objects, got {type(c).__name__}")
    out = {}
    for n in names:
        for k, p in enumerate(prefixes):
            if p == "" or n == p or n.startswith(p + "."):
                out[n] = k
                break
        else:
            raise ValueError(f"chains: residual {n!r} is in none of the chains {prefixes!r}")
    return out


def _pop_var(t: Tensor) -> float:
    return t.detach().double().var(unbiased=False).item() if t.numel() > 0 else 0.0


def profile_omegas(
    model: nn.Module,
    run_batches: Callable[[], None],
    *,
    chains: Optional[Iterable[Union[str, nn.Module]]] = None,
) -> Dict[str, float]:
    """Run ``run_batches()`` once under ``torch.no_grad()`` with every [`OmegaResidual`][admin_torch.OmegaResidual] of
    ``model`` in profiling mode, set each omega by Transformer-Clinic's rule (module docstring),
    and return ``{module name: omega}`` in order of the first call.

    Only the FIRST call of each residual is measured; later calls (a second batch, incremental
    decoding) use the omega already set. Vector omegas (``as_parameter``) are filled with the
    scalar value. With ``torch.distributed`` initialized and several ranks, every rank profiles its
    own batches and the omegas are averaged over the ranks (a collective: call it on every rank).

    Works on any model whose residuals are [`OmegaResidual`][admin_torch.OmegaResidual] modules: the reference stack,
    the drop-in layers, models [`admin_torch.convert`][admin_torch.convert] converted (torch.nn, HuggingFace), and
    fairseq's ``transformer_admin``.

    Args:
        model: the model holding the residual modules.
        run_batches: runs the forward pass(es), e.g. ``lambda: model(batch)``.
        chains: the stacks with separate running values, as submodule names or modules, e.g.
            ``[model.encoder, model.decoder]`` (the original profiles encoder and decoder as two
            chains, each starting at 1). Default: one chain for the whole model.

    Examples:
        >>> import os, tempfile
        >>> from admin_torch import make_stack
        >>> model, batch = make_stack('admin', depth=2, dim=8, seed=0), torch.randn(3, 5, 8)
        >>> omegas = profile_omegas(model, lambda: model(batch))
        >>> len(omegas), all(w >= 1 for w in omegas.values())
        (4, True)
        >>> save_profile(omegas, os.path.join(tempfile.mkdtemp(), 'profile.json'))
    """
    residuals = omega_residuals(model)
    if not residuals:
        raise ValueError("model has no OmegaResidual module to profile")
    if not callable(run_batches):
        raise TypeError(f"run_batches must be a callable taking no argument, got {type(run_batches).__name__}")
    name_of = {id(m): n for n, m in residuals}
    chain = _chain_of([n for n, _ in residuals], model, chains)
    running: Dict[int, float] = {}
    omegas: Dict[str, float] = {}

    def hook(module: OmegaResidual, x: Tensor, f_x: Tensor) -> None:
        name = name_of[id(module)]
        if name in omegas:
            return
        k = chain[name]
        omega = running.get(k, 1.0)
        if not math.isfinite(omega):
            raise ValueError(f"profile_omegas measured a non-finite variance before {name!r} (NaN or inf in the "
                             "batch or the model's outputs); no omega was changed")
        module.set_omega_(omega)
        omegas[name] = omega
        var_in = _pop_var(x * module.omega.to(x.dtype))
        var_out = _pop_var(f_x)
        running[k] = math.sqrt(var_in + var_out)

    # a failed profile (an exception in run_batches, a NaN measured) leaves every omega as it was
    before = [m.omega.detach().clone() for _, m in residuals]

    def restore() -> None:
        with torch.no_grad():
            for (_, m), omega in zip(residuals, before):
                m.omega.copy_(omega)

    for _, m in residuals:
        m._profile_hook = hook
    try:
        with torch.no_grad():
            run_batches()
    except BaseException:
        restore()
        raise
    finally:
        for _, m in residuals:
            m._profile_hook = None
    if not omegas:
        raise ValueError("run_batches() called none of the model's OmegaResidual modules")
    measured = omegas
    if not all(math.isfinite(v) for v in running.values()):
        restore()
        raise ValueError("profile_omegas measured a non-finite variance at the last sublayer (NaN or inf in the "
                         "batch or the model's outputs); no omega was changed")
    omegas = _average_over_ranks(omegas, residuals[0][1].omega.device)
    if omegas is not None:
        apply_omegas(model, omegas)
    else:
        omegas = measured
    missing = [n for n, _ in residuals if n not in omegas]
    if missing:
        warnings.warn(f"profile_omegas: {len(missing)} residual module(s) were not called and keep their omega: {missing}")
    return omegas


def _check_omegas(omegas, where: str = "omegas") -> Dict[str, float]:
    """``{name: finite float}``, or TypeError/ValueError naming ``where`` and the bad entry."""
    if not isinstance(omegas, Mapping):
        raise TypeError(f"{where} must be a mapping {{residual module name: omega}}, got {type(omegas).__name__}")
    out = {}
    for name, value in omegas.items():
        if not isinstance(name, str):
            raise TypeError(f"{where}: keys must be residual module names (str), got {name!r}")
        out[name] = validation.as_real(f"{where}[{name!r}]", value)
    return out


def _average_over_ranks(omegas: Dict[str, float], device: torch.device) -> Optional[Dict[str, float]]:
    """With ``torch.distributed`` initialized and several ranks, the mean of every rank's profile (each
    rank profiled its own batch; all must train the same model); None otherwise. Every rank must
    profile the same residuals (the same model), in the same order."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return None
    backend = torch.distributed.get_backend()
    on = device if backend == "nccl" else torch.device("cpu")
    values = torch.tensor(list(omegas.values()), dtype=torch.float64, device=on)
    torch.distributed.all_reduce(values)
    values /= torch.distributed.get_world_size()
    return dict(zip(omegas, values.tolist()))


def apply_omegas(model: nn.Module, omegas: Mapping[str, float]) -> None:
    """Fill the omega of each named [`OmegaResidual`][admin_torch.OmegaResidual] of ``model`` with the profiled value.

    Every name and value is checked (finite numbers, existing modules) before any omega changes.
    """
    residuals = dict(omega_residuals(model))
    omegas = _check_omegas(omegas)
    unknown = [n for n in omegas if n not in residuals]
    if unknown:
        raise ValueError(f"omegas: no OmegaResidual named {unknown} in model; it has {sorted(residuals)}")
    for n, v in omegas.items():
        residuals[n].set_omega_(v)


def save_profile(omegas: Mapping[str, float], path: Union[str, Path]) -> None:
    """Write a profile (``{module name: omega}``) as JSON (to a temporary name, then renamed)."""
    omegas = _check_omegas(omegas)
    data = {"format": _PROFILE_FORMAT, "version": 1, "omegas": omegas}
    with atomic_write(check_output_path(path, name="path"), "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1) + "\n")


def load_profile(path: Union[str, Path]) -> Dict[str, float]:
    """Read a profile written by [`save_profile`][admin_torch.save_profile] (order preserved).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not a profile, or a bad entry; the message names the file and the entry.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not an admin_torch profile: invalid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != _PROFILE_FORMAT or "omegas" not in data:
        raise ValueError(f"{path}: not an admin_torch profile (a JSON object with \"format\": "
                         f"\"{_PROFILE_FORMAT}\" and \"omegas\", as written by save_profile)")
    try:
        return _check_omegas(data["omegas"], where=f"{path}: omegas")
    except TypeError as err:
        raise ValueError(str(err)) from None
