"""admin_torch: Admin residual scaling for deep Post-LN transformers (a superset of admin-torch 0.1.0).

* closed-form Admin: [`calculate_init`][admin_torch.calculate_init], [`OmegaResidual`][admin_torch.OmegaResidual], [`as_module`][admin_torch.as_module],
  [`as_buffer`][admin_torch.as_buffer], [`as_parameter`][admin_torch.as_parameter] (the 0.1.0 API, validated, dtype-following);
* DeepNorm: [`deepnorm_init`][admin_torch.deepnorm_init], [`deepnorm_scale_`][admin_torch.deepnorm_scale_], [`DeepNormResidual`][admin_torch.DeepNormResidual];
* profiled Admin: [`profile_omegas`][admin_torch.profile_omegas], [`apply_omegas`][admin_torch.apply_omegas], [`save_profile`][admin_torch.save_profile], [`load_profile`][admin_torch.load_profile];
* the output change against depth: `output_change`, [`make_stack`][admin_torch.make_stack];
* Admin for torch.nn and HuggingFace models: the drop-in [`TransformerEncoderLayer`][admin_torch.TransformerEncoderLayer] /
  [`TransformerDecoderLayer`][admin_torch.TransformerDecoderLayer], [`convert`][admin_torch.convert] (torch.nn and HuggingFace Post-LN families: docs/huggingface.md) and
  [`fold`][admin_torch.fold], driven by the per-layer descriptions of `admin_torch.architectures`
  (`LAYER_KINDS`, [`LayerKind`][admin_torch.LayerKind], [`Sublayer`][admin_torch.Sublayer], [`StackKind`][admin_torch.StackKind]: describing another family);
* HuggingFace save / reload: [`save_pretrained`][admin_torch.save_pretrained] (fold on save, the Admin form alongside),
  [`from_pretrained`][admin_torch.from_pretrained];
* qk-layernorm ([`add_qk_norm`][admin_torch.add_qk_norm], ``make_stack(..., qk_norm=True)``, ``convert(..., qk_norm=True)``):
  LayerNorm on each head's queries and keys (`admin_torch.qk_norm`);
* folding omega into a plain Post-LN network: [`fold`][admin_torch.fold], [`fold_into_norm_`][admin_torch.fold_into_norm_],
  [`fold_into_linears_`][admin_torch.fold_into_linears_], [`fold_into_embedding_`][admin_torch.fold_into_embedding_].

How the package is built, bottom to top: the pure-torch core (`admin_torch.stacks` finds the residual stacks,
`admin_torch.hooks` gives a layer Admin residuals without copying its forward, `admin_torch.fused_sums` makes them
in the layer's own forward where it can prove its sums (no hook), `admin_torch.conversion` and
`admin_torch.folding` convert and fold), the HuggingFace adapter above it (`admin_torch.hf_io`), and
`admin_torch.api`, whose [`convert`][admin_torch.convert] and [`fold`][admin_torch.fold] compose the two
(`admin_torch.adapter` is the seam). Names of earlier releases that are not listed here are found in their
modules (a DeprecationWarning says where).

Importing this package never imports fairseq.
"""

from .api import convert, fold
from .architectures import LAYER_KINDS, LayerKind, StackKind, Sublayer
from .deepnorm import DEEPNORM_SCALED_PROJECTIONS, DeepNormInit, DeepNormResidual, deepnorm_init, deepnorm_scale_
from .folding import fold_into_embedding_, fold_into_linears_, fold_into_norm_
from .hf_io import from_pretrained, save_pretrained
from .layers import TransformerDecoderLayer, TransformerEncoderLayer
from .output_change import output_change, residual_betas
from .profiling import apply_omegas, load_profile, profile_omegas, save_profile
from .qk_norm import QKNorm, QKNormLinear, QKNormMultiheadAttention, add_qk_norm, has_qk_norm, qk_norm_projections_
from .reference_stack import AddResidual, ResidualStack, make_stack
from .residual import OUTPUT_CHANGE_SCALES, OmegaResidual, as_buffer, as_module, as_parameter, calculate_init

__version__ = "0.3.0"

__all__ = [
    # admin-torch 0.1.0 API
    "calculate_init",
    "OmegaResidual",
    "as_module",
    "as_buffer",
    "as_parameter",
    "OUTPUT_CHANGE_SCALES",
    # DeepNorm
    "DeepNormInit",
    "deepnorm_init",
    "deepnorm_scale_",
    "DeepNormResidual",
    "DEEPNORM_SCALED_PROJECTIONS",
    # profiled Admin
    "profile_omegas",
    "apply_omegas",
    "save_profile",
    "load_profile",
    # output change
    "output_change",
    "residual_betas",
    "make_stack",
    "ResidualStack",
    "AddResidual",
    # any model: drop-in layers, convert, fold, and the descriptions that drive them
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "convert",
    "fold",
    "LAYER_KINDS",
    "LayerKind",
    "Sublayer",
    "StackKind",
    # HuggingFace save / reload (fold on save, the Admin form alongside)
    "save_pretrained",
    "from_pretrained",
    # qk-layernorm (Wortsman et al. 2023's remedy for attention-logit growth)
    "QKNorm",
    "QKNormMultiheadAttention",
    "QKNormLinear",
    "add_qk_norm",
    "has_qk_norm",
    "qk_norm_projections_",
    # folding, one module at a time
    "fold_into_norm_",
    "fold_into_linears_",
    "fold_into_embedding_",
]

#: names the root of earlier releases exported that live in their modules only now: ``root name -> (module, name)``
_MOVED = {
    "convert_module_stacks": ("stacks", "admin_stacks"),
    "fold_reference_stack": ("folding", "fold_reference_stack"),
    "REFERENCE_STACK_KINDS": ("reference_stack", "STACK_KINDS"),
    "STACK_KINDS": ("architectures", "STACK_KINDS"),
    "layer_kind": ("architectures", "layer_kind"),
    "stack_kind": ("architectures", "stack_kind"),
    "PRE_LN_MODEL_TYPES": ("hf_architectures", "PRE_LN_MODEL_TYPES"),
    "UNSUPPORTED_MODEL_TYPES": ("hf_architectures", "UNSUPPORTED_MODEL_TYPES"),
    "omega_residuals": ("profiling", "omega_residuals"),
    "fold_stack_": ("folding", "fold_stack_"),
}


def __getattr__(name: str):
    """The names of earlier releases, found where they live now, with a DeprecationWarning: those of ``_MOVED``.
    ``admin_torch.StabilityMonitor`` is gone (the monitor is a feature package above the libraries, which never
    import it): an AttributeError names its home."""
    import importlib
    import warnings

    if name == "StabilityMonitor":
        raise AttributeError("admin_torch.StabilityMonitor moved to the stability_toolbox package, above the "
                             "libraries: from stability_toolbox import StabilityMonitor")
    if name in _MOVED:
        module, attr = _MOVED[name]
        alias = f" as {name}" if attr != name else ""
        warnings.warn(f"admin_torch.{name} is no longer exported by admin_torch: import it from its module "
                      f"(from admin_torch.{module} import {attr}{alias})", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
