"""Where the residual stacks of a model are: its supported layers, grouped into stacks, found by their
descriptions (`admin_torch.architectures`).

A stack is the layer list of a module that owns one (an ``nn.TransformerEncoder``, a ``BertModel``, a
``BartEncoder``...: `admin_torch.architectures.STACK_KINDS`), or the supported layers of one type under one
parent. [`convert`][admin_torch.convert] counts N per stack; [`fold`][admin_torch.fold] moves the first omega of
each stack into what produces the stack's input.

Examples:
    >>> model = nn.Transformer(16, 2, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=32, batch_first=True)
    >>> [(prefix, len(layers)) for prefix, _, layers in find_stacks(model)]
    [('encoder.', 2), ('decoder.', 3)]
    >>> admin_stacks(model)   # nothing converted yet
    []
"""

from typing import Dict, List, Optional, Tuple

from torch import nn

from . import layers as admin_layers
from .architectures import LayerKind, StackKind, kind_key, layer_kind, stack_kind
from .residual import OmegaResidual

__all__ = ["resolve", "find_stacks", "as_run", "admin_stacks", "is_converted", "omegas_of"]

#: ``[(stack prefix, StackKind or None, [(layer name, layer, LayerKind)])]``, what `find_stacks` returns
Stacks = List[Tuple[str, Optional[StackKind], List[Tuple[str, nn.Module, LayerKind]]]]


def resolve(module: nn.Module, path: str):
    """The attribute at the dotted ``path`` below ``module`` (a submodule, a parameter or any attribute), as the
    descriptions of `admin_torch.architectures` name them."""
    for part in path.split("."):
        module = getattr(module, part)
    return module


def find_stacks(model: nn.Module, applications: Optional[Dict[int, int]] = None) -> Stacks:
    """``[(stack prefix, StackKind or None, [(layer name, layer, LayerKind)])]`` of every supported layer.

    A stack prefix is the stack's name followed by a dot (``''`` for ``model`` itself); loose layers (outside any
    known stack) are grouped per parent and layer type, without a `StackKind`.

    ``applications``, when given, receives ``id(layer) -> times one forward applies it`` for layers of a
    stack with a ``sequence`` (ALBERT's shared layers); every other layer is applied once.

    A decoder layer whose cross-attention runs only with encoder states (BART's) is described without it
    when ``model`` holds no encoder stack (``BartForCausalLM``): then N and [`fold`][admin_torch.fold] follow the
    sublayers that run.
    """
    names = {id(m): n for n, m in model.named_modules()}
    seen = set()
    stacks = []
    for name, module in model.named_modules():
        kind = stack_kind(module)
        if kind is None:
            continue
        try:
            layer_list = kind.sequence(module) if kind.sequence is not None else resolve(module, kind.layers)
        except AttributeError:
            continue
        if kind.sequence is not None:
            unique = {id(m): m for m in layer_list}  # in first-application order
            if applications is not None:
                for m in layer_list:
                    applications[id(m)] = applications.get(id(m), 0) + 1
            layer_list = list(unique.values())
        layers = [(names[id(m)], m, layer_kind(m)) for m in layer_list if id(m) not in seen]
        layers = [entry for entry in layers if entry[2] is not None]
        if layers:
            prefix = f"{name}." if name else ""
            stacks.append((prefix, kind, layers))
            seen.update(id(m) for _, m, _ in layers)
    # supported layers outside any known stack: one stack per parent and layer type
    loose: Dict[Tuple[str, str], list] = {}
    for name, module in model.named_modules():
        if id(module) in seen:
            continue
        kind = layer_kind(module)
        if kind is not None:
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            loose.setdefault((parent, kind_key(type(module))), []).append((name, module, kind))
    stacks += [(parent + "." if parent else "", None, layers) for (parent, _), layers in loose.items()]
    kinds = iter(as_run([k for _, _, layers in stacks for _, _, k in layers]))
    return [(p, sk, [(n, m, next(kinds)) for n, m, _ in layers]) for p, sk, layers in stacks]


def as_run(kinds: List[LayerKind]) -> List[LayerKind]:
    """The descriptions of one model's layers as they run: where none is an encoder layer, a decoder layer whose
    cross-attention runs only with encoder states (BART's) is described without it (``without_cross``).
    Admin (`find_stacks`) and the stability monitor (`stability_toolbox.sites`) both apply it."""
    if any(k.role == "encoder" for k in kinds):
        return list(kinds)
    return [k.without_cross or k for k in kinds]


def admin_stacks(model: nn.Module) -> List[Tuple[str, Optional[str], List[Tuple[str, nn.Module]]]]:
    """The stacks of converted layers: ``[(stack name, input norm path or None, [(layer name, layer)])]``.

    Only the converted layers of each stack are listed, and only stacks with one."""
    stacks = [(prefix[:-1], prefix + sk.input_norm if sk is not None and sk.input_norm else None,
               [(n, m) for n, m, _ in layers]) for prefix, sk, layers in find_stacks(model)]
    return [(s, norm, [(n, m) for n, m in layers if is_converted(m)]) for s, norm, layers in stacks
            if any(is_converted(m) for _, m in layers)]


def is_converted(layer: nn.Module) -> bool:
    """Whether ``layer`` has Admin residuals: a drop-in [`TransformerEncoderLayer`][admin_torch.TransformerEncoderLayer] /
    [`TransformerDecoderLayer`][admin_torch.TransformerDecoderLayer], or a layer converted with hooks (its
    ``admin_omegas``)."""
    return isinstance(layer, (admin_layers.TransformerEncoderLayer, admin_layers.TransformerDecoderLayer)) \
        or isinstance(getattr(layer, "admin_omegas", None), nn.ModuleList)


def omegas_of(layer: nn.Module) -> List[OmegaResidual]:
    """The [`OmegaResidual`][admin_torch.OmegaResidual] modules of a converted ``layer``, one per sublayer in
    call order."""
    if isinstance(layer, admin_layers.TransformerEncoderLayer):
        return [getattr(layer, n) for n in admin_layers.ENCODER_RESIDUALS]
    if isinstance(layer, admin_layers.TransformerDecoderLayer):
        return [getattr(layer, n) for n in admin_layers.DECODER_RESIDUALS]
    return list(layer.admin_omegas)
