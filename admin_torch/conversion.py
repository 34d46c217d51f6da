"""Converting a model's Post-LN layers to Admin in place: `convert_model`, the pure-torch core of
[`convert`][admin_torch.convert].

It finds the supported layers (`admin_torch.stacks`), counts N per stack, checks everything, and only then
changes the model: a torch.nn layer's class becomes its drop-in Admin subclass (`admin_torch.layers`), any other
layer gets [`OmegaResidual`][admin_torch.OmegaResidual] modules in ``layer.admin_omegas`` and the hooks of
`admin_torch.hooks`. A framework's own steps (HuggingFace's config record and save glue) come from the adapters
it is given (`admin_torch.adapter`); [`convert`][admin_torch.convert] gives it `admin_torch.api.ADAPTERS`.

Examples:
    >>> from admin_torch.residual import calculate_init
    >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64), 6, enable_nested_tensor=False)
    >>> enc = convert_model(enc)     # 6 layers -> N = 12, omega = calculate_init(12)
    >>> round(float(enc.layers[0].omega_sa.omega), 5), round(calculate_init(12), 5)
    (2.01701, 2.01701)
"""

from typing import Dict, Sequence

from torch import nn

from toolbox_core import validation

from . import layers as admin_layers
from .adapter import Adapter
from .architectures import CONVERTIBLE_MECHANISMS
from .hooks import install_hooks
# pickles of models converted by earlier versions name the hook classes here, where they were defined
from .hooks import _Admin, _CaptureInput, _CaptureOutput, _CaptureResidualArg, _ClearSlots, _Slot  # noqa: F401
from .qk_norm import add_qk_norm, plan_qk_norm
from .residual import OUTPUT_CHANGE_SCALES, as_module
from .stacks import find_stacks, is_converted, resolve

__all__ = ["convert_model"]


def _check_post_ln(name: str, layer: nn.Module) -> None:
    if getattr(layer, "norm_first", False):
        raise ValueError(f"{name} is a Pre-LN layer (norm_first=True); Admin is for Post-LN layers only")


def convert_model(model: nn.Module, *, output_change_scale: str = "default", as_parameter: bool = False,
                  qk_norm: bool = False, adapters: Sequence[Adapter] = ()) -> nn.Module:
    """The core of [`convert`][admin_torch.convert]: the same, with ``adapters`` in place of
    `admin_torch.api.ADAPTERS` (none: pure torch, no framework's steps).

    In this order: the arguments are checked, then each adapter's
    [`check_family`][admin_torch.adapter.Adapter.check_family] (a Pre-LN family), then the model (a Pre-LN layer,
    nothing left to convert), then each adapter's [`check_convertible`][admin_torch.adapter.Adapter.check_convertible], then the
    qk-layernorm check; every check passed, the layers are converted (and given qk-layernorm), then each
    adapter's [`after_convert`][admin_torch.adapter.Adapter.after_convert] runs. A refusal leaves ``model`` as
    it was.

    Args:
        model: as for [`convert`][admin_torch.convert].
        output_change_scale: as for [`convert`][admin_torch.convert].
        as_parameter: as for [`convert`][admin_torch.convert].
        qk_norm: as for [`convert`][admin_torch.convert].
        adapters: the framework adapters whose steps run, in this order.

    Returns:
        ``model``, converted in place.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    validation.as_choice("output_change_scale", output_change_scale, OUTPUT_CHANGE_SCALES)
    as_parameter = validation.as_bool("as_parameter", as_parameter)
    qk_norm = validation.as_bool("qk_norm", qk_norm)
    for adapter in adapters:
        adapter.check_family(model)
    plan = []
    applications: Dict[int, int] = {}
    for _, _, layers in find_stacks(model, applications):
        todo = [(n, m, k) for n, m, k in layers if not is_converted(m) and k.mechanism in CONVERTIBLE_MECHANISMS]
        for name, layer, _ in todo:
            _check_post_ln(name, layer)
        # N counts residuals along the depth: a layer shared across depth (ALBERT) counts once per application
        n_res = sum(len(k.sublayers) * applications.get(id(m), 1) for _, m, k in layers)
        plan += [(layer, kind, n_res) for _, layer, kind in todo]
    if not plan:
        raise ValueError("model has no supported Post-LN layer to convert (torch.nn TransformerEncoderLayer/"
                         "TransformerDecoderLayer, HuggingFace BERT-like, BART, Marian, BlenderbotSmall, LED, "
                         "FSMT, DistilBERT, MPNet, ALBERT, XLNet, Funnel; describe others in "
                         "admin_torch.LAYER_KINDS), or all are converted")
    for adapter in adapters:
        adapter.check_convertible(model)
    if qk_norm:
        plan_qk_norm(model)  # refuses (nothing changed) where qk-layernorm cannot be added
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False  # its nested-tensor fast path bypasses the layers' residuals
    for layer, kind, n_res in plan:  # every check passed: now change the model
        ref = next(layer.parameters())
        hidden = resolve(layer, kind.sublayers[0].norm).normalized_shape[0]
        omegas = [as_module(n_res, output_change_scale, as_parameter, hidden).to(device=ref.device)
                  for _ in kind.sublayers]
        if kind.mechanism == "subclass":
            layer.__class__ = getattr(admin_layers, kind.admin_class)
            names = admin_layers.ENCODER_RESIDUALS if len(omegas) == 2 else admin_layers.DECODER_RESIDUALS
            for name, omega in zip(names, omegas):
                setattr(layer, name, omega)
        else:
            layer.admin_omegas = nn.ModuleList(omegas)
            install_hooks(layer, kind, omegas)
    if qk_norm:
        add_qk_norm(model)
    for adapter in adapters:
        adapter.after_convert(model, output_change_scale=output_change_scale, as_parameter=as_parameter)
    return model
