"""The output change ``E ||F(x, W) - F(x, W + delta)||^2`` of a model under a small weight perturbation.

The quantity Admin's analysis is built on: Post-LN's output change grows O(N) with the number of
sublayers N, Admin's O(log N) (``'O(logn)'``) or O(1) (``'O(1)'``), Pre-LN's O(log N).
The Admin paper (Liu et al. 2020, Theorem 3) predicts ``output change ~ C * delta^2 * sum_i beta_i``
with ``beta_i = Var[f_i(x_i)] / Var[residual output i]``, the share of sublayer i in its residual
sum; [`residual_betas`][admin_torch.residual_betas] measures those shares, so the prediction can be checked on any model.
"""

import math
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from toolbox_core import validation

__all__ = ["output_change", "residual_betas"]


def _default_filter(name: str, p: Tensor) -> bool:
    return p.dim() >= 2


@torch.no_grad()
def output_change(
    model: nn.Module,
    inputs: Union[Tensor, Sequence[Tensor]],
    *,
    delta_scale: float = 1e-2,
    num_samples: int = 8,
    seed: int = 0,
    param_filter: Optional[Callable[[str, Tensor], bool]] = None,
) -> float:
    r"""Estimate `E_\delta \|F(x, W) - F(x, W + \delta)\|^2` for any module.

    The perturbation: for every selected parameter tensor ``p`` (by default every floating
    parameter with 2 or more dimensions: the weight matrices; biases, LayerNorm gains and
    omegas are kept), ``delta_p = delta_scale * rms(p) * eps`` with ``eps`` i.i.d. standard
    normal and ``rms(p) = sqrt(mean(p^2))``, i.e. a random relative perturbation of size
    ``delta_scale``. The model runs in eval mode (no dropout) under ``no_grad``; the weights
    are not modified (the perturbed ones are passed with `torch.func.functional_call`).

    The norm is taken over the last (feature) dimension of the output and averaged over all its
    other positions and over ``num_samples`` perturbations, so the result is the expected
    squared change of one output vector. It is proportional to ``delta_scale**2`` for small
    deltas.

    Args:
        model: any module; ``model(*inputs)`` must return a tensor.
        inputs: a tensor or a tuple of positional arguments.
        delta_scale: the relative size of the perturbation.
        num_samples: perturbations averaged.
        seed: seeds the perturbations (the global RNG is not touched).
        param_filter: ``(name, param) -> bool`` choosing the perturbed parameters.

    Examples:
        >>> from admin_torch import make_stack
        >>> model = make_stack('post_ln', depth=6, dim=32, seed=0)
        >>> change = output_change(model, torch.randn(4, 8, 32), num_samples=4)
        >>> change > 0
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    num_samples = validation.as_int("num_samples", num_samples, minimum=1)
    delta_scale = validation.as_real("delta_scale", delta_scale, low=0.0, low_open=True)
    seed = validation.as_int("seed", seed, minimum=0)
    args: Tuple = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    keep = param_filter or _default_filter
    params = dict(model.named_parameters())
    chosen = {n: p for n, p in params.items() if p.is_floating_point() and keep(n, p)}
    if not chosen:
        raise ValueError("param_filter selected no floating parameter to perturb")
    was_training = model.training
    model.eval()
    try:
        base = model(*args)
        if not isinstance(base, Tensor):
            raise TypeError(f"model(*inputs) must return a tensor, got {type(base).__name__}")
        if base.numel() == 0:
            raise ValueError(f"inputs: model(*inputs) returned an empty tensor of shape {tuple(base.shape)} "
                             "(an empty batch?); the output change needs at least one output vector")
        if not bool(torch.isfinite(base).all()):
            raise ValueError("inputs: model(*inputs) returned NaN or inf; the output change is undefined")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        total = 0.0
        for _ in range(num_samples):
            perturbed = {}
            for n, p in chosen.items():
                eps = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
                rms = p.float().pow(2).mean().sqrt()
                perturbed[n] = p + (delta_scale * rms).to(p.dtype) * eps
            out = functional_call(model, perturbed, args, strict=False)
            diff = (out.float() - base.float()).pow(2)
            total += (diff.sum(-1).mean() if diff.dim() > 0 else diff).item()
    finally:
        model.train(was_training)
    if not math.isfinite(total):  # the base output is finite: the perturbation made it overflow (or NaN)
        raise ValueError(f"delta_scale={delta_scale} is too large: the perturbed model's output is not finite "
                         "(NaN or inf); use a small relative perturbation (e.g. 1e-2)")
    return total / num_samples


@torch.no_grad()
def residual_betas(
    model: nn.Module,
    inputs: Union[Tensor, Sequence[Tensor]],
    modules: Optional[Iterable[nn.Module]] = None,
) -> List[float]:
    """``beta_i = Var[f_i] / Var[x_i * scale_i + f_i]`` of each residual module, in call order.

    The residual modules are called as ``module(x, f_x)``; by default every
    [`OmegaResidual`][admin_torch.OmegaResidual], [`DeepNormResidual`][admin_torch.DeepNormResidual] and
    [`AddResidual`][admin_torch.AddResidual] of ``model``. Variances are population
    variances over all elements (float64). One forward pass in eval mode.

    Examples:
        >>> from admin_torch import make_stack
        >>> betas = residual_betas(make_stack('post_ln', 6, 32), torch.randn(2, 5, 32))
        >>> len(betas)
        12
    """
    from .deepnorm import DeepNormResidual
    from .reference_stack import AddResidual
    from .residual import OmegaResidual

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if modules is None:
        modules = [m for m in model.modules() if isinstance(m, (OmegaResidual, DeepNormResidual, AddResidual))]
    modules = list(modules)
    if not modules:
        raise ValueError("modules: model has no residual module (OmegaResidual, DeepNormResidual, AddResidual)")
    betas: List[float] = []

    def hook(_m, inp, out):
        betas.append((inp[1].double().var(unbiased=False) / out.double().var(unbiased=False)).item())

    args: Tuple = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    handles = [m.register_forward_hook(hook) for m in modules]
    was_training = model.training
    model.eval()
    try:
        model(*args)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return betas
