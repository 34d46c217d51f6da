"""admin_torch: Admin residual scaling for deep Post-LN transformers (a superset of admin-torch 0.1.0).

* closed-form Admin: [`calculate_init`][admin_torch.calculate_init], [`OmegaResidual`][admin_torch.OmegaResidual], [`as_module`][admin_torch.as_module],
  [`as_buffer`][admin_torch.as_buffer], [`as_parameter`][admin_torch.as_parameter] (the 0.1.0 API, validated, dtype-following);
* DeepNorm: [`deepnorm_init`][admin_torch.deepnorm_init], [`deepnorm_scale_`][admin_torch.deepnorm_scale_], [`DeepNormResidual`][admin_torch.DeepNormResidual];
* profiled Admin: [`profile_omegas`][admin_torch.profile_omegas], [`apply_omegas`][admin_torch.apply_omegas], [`save_profile`][admin_torch.save_profile], [`load_profile`][admin_torch.load_profile];
* the output change against depth: `output_change`, [`make_stack`][admin_torch.make_stack];
* Admin for torch.nn and HuggingFace models: the drop-in [`TransformerEncoderLayer`][admin_torch.TransformerEncoderLayer] /
  [`TransformerDecoderLayer`][admin_torch.TransformerDecoderLayer], [`convert`][admin_torch.convert] (torch.nn and HuggingFace Post-LN families: docs/huggingface.md) and
  [`fold`][admin_torch.fold], driven by the per-layer descriptions of `admin_torch.architectures`;
* qk-layernorm ([`add_qk_norm`][admin_torch.add_qk_norm], ``make_stack(..., qk_norm=True)``, ``convert(..., qk_norm=True)``):
  LayerNorm on each head's queries and keys (`admin_torch.qk_norm`);
* folding omega into a plain Post-LN network: [`fold`][admin_torch.fold], [`fold_into_norm_`][admin_torch.fold_into_norm_],
  [`fold_into_linears_`][admin_torch.fold_into_linears_], [`fold_into_embedding_`][admin_torch.fold_into_embedding_].

Importing this package never imports fairseq.
"""

from .deepnorm import DEEPNORM_SCALED_PROJECTIONS, DeepNormInit, DeepNormResidual, deepnorm_init, deepnorm_scale_
from .architectures import LAYER_KINDS, PRE_LN_MODEL_TYPES, STACK_KINDS, UNSUPPORTED_MODEL_TYPES, LayerKind, StackKind, Sublayer, layer_kind, stack_kind
from .conversion import admin_stacks as convert_module_stacks
from .conversion import convert, fold, fold_stack_
from .hf_io import from_pretrained, save_pretrained
from .folding import fold_into_embedding_, fold_into_linears_, fold_into_norm_, fold_reference_stack
from .layers import TransformerDecoderLayer, TransformerEncoderLayer
from .output_change import output_change, residual_betas
from .qk_norm import QKNorm, QKNormLinear, QKNormMultiheadAttention, add_qk_norm, has_qk_norm, qk_norm_projections_
from .profiling import apply_omegas, load_profile, omega_residuals, profile_omegas, save_profile
# make_stack's kinds under their own name: STACK_KINDS is the architectures' mapping, beside LAYER_KINDS
from .reference_stack import STACK_KINDS as REFERENCE_STACK_KINDS
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
    "omega_residuals",
    # output change
    "output_change",
    "residual_betas",
    "make_stack",
    "ResidualStack",
    "AddResidual",
    "REFERENCE_STACK_KINDS",
    # any model: drop-in layers, convert, fold
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "convert",
    "convert_module_stacks",
    "fold_stack_",
    "LAYER_KINDS",
    "STACK_KINDS",
    "LayerKind",
    "StackKind",
    "Sublayer",
    "layer_kind",
    "stack_kind",
    "PRE_LN_MODEL_TYPES",
    "UNSUPPORTED_MODEL_TYPES",
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
    # folding
    "fold",
    "fold_reference_stack",
    "fold_into_norm_",
    "fold_into_linears_",
    "fold_into_embedding_",
]


def __getattr__(name: str):
    """``admin_torch.StabilityMonitor``, the name of earlier releases: the monitor is a feature package above the
    libraries (``stability_toolbox``), so it is found there on first use, with a DeprecationWarning."""
    if name == "StabilityMonitor":
        import importlib
        import warnings

        warnings.warn("admin_torch.StabilityMonitor moved: import it from stability_toolbox "
                      "(from stability_toolbox import StabilityMonitor)", DeprecationWarning, stacklevel=2)
        return importlib.import_module("stability_toolbox").StabilityMonitor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
