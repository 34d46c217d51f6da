"""Admin for models built elsewhere: :func:`convert` a model's Post-LN layers in place, :func:`fold` it back.

Supported (:mod:`admin_torch.architectures` describes each): torch.nn's ``TransformerEncoderLayer`` and
``TransformerDecoderLayer``, and HuggingFace's BERT, RoBERTa, BART and Marian layers. ``convert``
counts N per stack (2 per encoder layer, 3 per decoder layer; a stack is the layer list of an
``nn.TransformerEncoder``, a ``BertModel``, a ``BartEncoder``..., or the layers of one kind under one
parent) and gives every residual ``norm(x + f(x))`` the form ``norm(omega * x + f(x))``.

``fold`` returns a deep copy whose modules are the stock classes again, computing the same
function with no Admin left: each omega moves into whatever produces its sublayer's input (a LayerNorm,
or the stack's embedding) and out of the linear maps that read it.

Example::

    >>> enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 4, 64), 6,
    ...                                   enable_nested_tensor=False)
    >>> convert(enc)                 # 6 layers -> N = 12, omega = calculate_init(12)
    >>> plain = fold(enc, embedding=my_embedding)   # the first layer reads my_embedding's output
"""

import copy
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from stability_toolbox import validation

from . import layers as admin_layers
from .architectures import LAYER_KINDS, STACK_KINDS, LayerKind, kind_key
from .fold import fold_into_embedding_, fold_into_linears_, fold_into_norm_, fold_reference_stack
from .reference_stack import ResidualStack
from .residual import OUTPUT_CHANGE_SCALES, OmegaResidual, as_module

__all__ = ["convert", "fold", "fold_stack_", "admin_stacks"]

Embedding = Union[nn.Module, Sequence[nn.Module], Dict[str, Union[nn.Module, Sequence[nn.Module]]]]


# ---------------------------------------------------------------- finding the stacks

def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _stacks(model: nn.Module) -> List[Tuple[str, Optional[str], List[Tuple[str, nn.Module]]]]:
    """``[(stack name, input norm path or None, [(layer name, layer)])]`` of every supported layer."""
    names = {id(m): n for n, m in model.named_modules()}
    seen = set()
    stacks = []
    for name, module in model.named_modules():
        kind = STACK_KINDS.get(kind_key(type(module)))
        if kind is None:
            continue
        layer_list = _get(module, kind.layers)
        layers = [(names[id(m)], m) for m in layer_list if kind_key(type(m)) in LAYER_KINDS]
        if layers:
            prefix = f"{name}." if name else ""
            stacks.append((name, prefix + kind.input_norm if kind.input_norm else None, layers))
            seen.update(id(m) for _, m in layers)
    # supported layers outside any known stack: one stack per parent and layer type
    loose: Dict[Tuple[str, str], List[Tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        key = kind_key(type(module))
        if key in LAYER_KINDS and id(module) not in seen:
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            loose.setdefault((parent, key), []).append((name, module))
    stacks += [(parent, None, layers) for (parent, _), layers in loose.items()]
    return stacks


def admin_stacks(model: nn.Module):
    """The stacks of converted layers: ``[(stack name, input norm path or None, [(layer name, layer)])]``."""
    return [(s, norm, [(n, m) for n, m in layers if _is_converted(m)]) for s, norm, layers in _stacks(model)
            if any(_is_converted(m) for _, m in layers)]


def _is_converted(layer: nn.Module) -> bool:
    return isinstance(layer, (admin_layers.TransformerEncoderLayer, admin_layers.TransformerDecoderLayer)) \
        or isinstance(getattr(layer, "admin_omegas", None), nn.ModuleList)


def _omegas_of(layer: nn.Module) -> List[OmegaResidual]:
    if isinstance(layer, admin_layers.TransformerEncoderLayer):
        return [getattr(layer, n) for n in admin_layers.ENCODER_RESIDUALS]
    if isinstance(layer, admin_layers.TransformerDecoderLayer):
        return [getattr(layer, n) for n in admin_layers.DECODER_RESIDUALS]
    return list(layer.admin_omegas)


# ---------------------------------------------------------------- the hooks (HuggingFace layers)

class _Slot:
    """Holds ``x`` of one sublayer from its capture to the LayerNorm that uses it."""

    __slots__ = ("x",)

    def __init__(self):
        self.x: Optional[Tensor] = None


class _CaptureInput:
    """Forward pre-hook of a layer: its input (first positional argument, or ``hidden_states``) is x."""

    def __init__(self, slot: _Slot):
        self.slot = slot

    def __call__(self, module, args, kwargs):
        self.slot.x = args[0] if args else kwargs.get("hidden_states")


class _CaptureOutput:
    """Forward hook of a LayerNorm: its output is x of the next sublayer."""

    def __init__(self, slot: _Slot):
        self.slot = slot

    def __call__(self, module, args, output):
        self.slot.x = output


class _Admin:
    """Forward pre-hook of a sublayer's LayerNorm: its input ``s = x + f(x)`` becomes ``omega * x + f(x)``."""

    def __init__(self, slot: _Slot, omega: OmegaResidual):
        self.slot, self.omega = slot, omega

    def __call__(self, module, args):
        x = self.slot.x
        self.slot.x = None  # not kept alive beyond the layer
        if x is None:
            return None
        s = args[0]
        return (self.omega(x, s - x),) + tuple(args[1:])


_HOOK_TYPES = (_CaptureInput, _CaptureOutput, _Admin)


def _install_hooks(layer: nn.Module, kind: LayerKind, omegas: Sequence[OmegaResidual]) -> None:
    captured: Dict[Optional[str], _Slot] = {}
    for sub, omega in zip(kind.sublayers, omegas):
        slot = _Slot()
        if sub.source is None:
            layer.register_forward_pre_hook(_CaptureInput(slot), with_kwargs=True)
        else:
            _get(layer, sub.source).register_forward_hook(_CaptureOutput(slot))
        _get(layer, sub.norm).register_forward_pre_hook(_Admin(slot, omega))
        captured[sub.source] = slot


def _remove_hooks(module: nn.Module) -> None:
    for m in module.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, _HOOK_TYPES)]:
                del hooks[key]
                m._forward_pre_hooks_with_kwargs.pop(key, None)
                m._forward_hooks_with_kwargs.pop(key, None)


# ---------------------------------------------------------------- convert

def _check_post_ln(name: str, layer: nn.Module) -> None:
    if getattr(layer, "norm_first", False):
        raise ValueError(f"{name} is a Pre-LN layer (norm_first=True); Admin is for Post-LN layers only")


def convert(model: nn.Module, *, output_change_scale: str = "default", as_parameter: bool = False) -> nn.Module:
    """Turn every supported Post-LN layer of ``model`` into its Admin form, in place; returns ``model``.

    Args:
        model: any module holding supported layers (torch.nn's encoder/decoder layers, HuggingFace
            BERT, RoBERTa, BART, Marian).
        output_change_scale: ``'O(n)'``, ``'O(logn)'``, ``'default'`` or ``'O(1)'`` (:func:`calculate_init`).
        as_parameter: trainable omega vectors of the hidden size.

    Raises:
        ValueError: ``model`` has a Pre-LN layer, or no supported layer that is not converted yet
            (nothing is changed).

    Example::

        >>> from transformers import BertConfig, BertModel
        >>> bert = convert(BertModel(BertConfig(num_hidden_layers=12)))   # N = 24 per the encoder
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    validation.as_choice("output_change_scale", output_change_scale, OUTPUT_CHANGE_SCALES)
    as_parameter = validation.as_bool("as_parameter", as_parameter)
    plan = []
    for _, _, layers in _stacks(model):
        todo = [(n, m) for n, m in layers if not _is_converted(m)]
        for name, layer in todo:
            _check_post_ln(name, layer)
        n_res = sum(len(LAYER_KINDS[kind_key(type(m))].sublayers) for _, m in layers)
        plan += [(layer, n_res) for _, layer in todo]
    if not plan:
        raise ValueError("model has no supported Post-LN layer to convert (torch.nn TransformerEncoderLayer/"
                         "TransformerDecoderLayer, HuggingFace BERT, RoBERTa, BART, Marian), or all are converted")
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False  # its nested-tensor fast path bypasses the layers' residuals
    for layer, n_res in plan:  # every check passed: now change the model
        kind = LAYER_KINDS[kind_key(type(layer))]
        ref = next(layer.parameters())
        hidden = _get(layer, kind.sublayers[0].norm).normalized_shape[0]
        omegas = [as_module(n_res, output_change_scale, as_parameter, hidden).to(device=ref.device)
                  for _ in kind.sublayers]
        if kind.mechanism == "subclass":
            layer.__class__ = getattr(admin_layers, kind.admin_class)
            names = admin_layers.ENCODER_RESIDUALS if len(omegas) == 2 else admin_layers.DECODER_RESIDUALS
            for name, omega in zip(names, omegas):
                setattr(layer, name, omega)
        else:
            layer.admin_omegas = nn.ModuleList(omegas)
            _install_hooks(layer, kind, omegas)
    return model


# ---------------------------------------------------------------- fold

def _readers(layer: nn.Module, paths: Iterable[str]) -> List[Union[nn.Module, Tensor]]:
    out = []
    for path in paths:
        if path.endswith("[q]"):
            mha = _get(layer, path[:-len(".in_proj_weight[q]")])
            out.append(mha.in_proj_weight[: mha.embed_dim] if mha.in_proj_weight is not None else mha.q_proj_weight)
        elif path.endswith("in_proj_weight"):
            mha = _get(layer, path[:-len(".in_proj_weight")])
            out += [mha.in_proj_weight] if mha.in_proj_weight is not None else \
                [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
        else:
            out.append(_get(layer, path))
    return out


def _embedding_for(stack: str, embedding: Optional[Embedding], original: nn.Module, copy_: nn.Module):
    """The modules (in ``copy_``) that produce the input of ``stack``, from the ``embedding=`` argument."""
    if embedding is None:
        return None
    if isinstance(embedding, dict):
        embedding = embedding.get(stack)
        if embedding is None:
            return None
    modules = [embedding] if isinstance(embedding, nn.Module) else list(embedding)
    names = {id(m): n for n, m in original.named_modules()}
    out = []
    for m in modules:
        if not isinstance(m, (nn.Embedding, nn.Linear)):
            raise TypeError(f"embedding must be an nn.Embedding or nn.Linear of model (or a list, or a dict "
                            f"stack name -> those), got {type(m).__name__}")
        if id(m) not in names:
            raise ValueError("embedding: a module given is not a submodule of model")
        out.append(_get(copy_, names[id(m)]) if names[id(m)] else copy_)
    return out


def _untie(module: nn.Module, model: nn.Module) -> None:
    """Give ``module`` its own weight when other modules of ``model`` share it (a tied output projection)."""
    for attr in ("weight", "bias"):
        t = getattr(module, attr, None)
        if not isinstance(t, Tensor):
            continue
        users = [n for n, p in model.named_parameters(remove_duplicate=False) if p is t]
        if len(users) > 1:
            setattr(module, attr, nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))


@torch.no_grad()
def fold(model: nn.Module, *, embedding: Optional[Embedding] = None) -> nn.Module:
    """A deep copy of a converted ``model`` with Admin folded away: stock classes, the same outputs.

    An Admin :class:`~admin_torch.ResidualStack` (``make_stack('admin', ...)``) is folded as before
    (:func:`admin_torch.fold.fold_reference_stack`).

    Args:
        model: a model :func:`convert` was applied to, or a model built from
            :class:`~admin_torch.TransformerEncoderLayer` / :class:`~admin_torch.TransformerDecoderLayer`
            (``model`` is not modified).
        embedding: where a stack's first sublayer reads an input that no LayerNorm of the model
            produces (torch.nn stacks, Marian), the ``nn.Embedding`` / ``nn.Linear`` module(s) whose
            outputs sum to that input -- one module, a list (token and position embeddings), or a dict
            ``{stack name: module(s)}`` for a model with several such stacks. A shared (tied) weight is
            untied in the copy.

    Raises:
        ValueError: nothing converted in ``model``, or an input that needs ``embedding=`` and has none.
    """
    if isinstance(model, ResidualStack):
        if embedding is not None:
            raise ValueError("embedding= is not used for a ResidualStack (its input LayerNorm takes the first omega)")
        return fold_reference_stack(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    stacks = admin_stacks(model)
    if not stacks:
        raise ValueError("model has no Admin layer to fold (apply admin_torch.convert first)")
    folded = copy.deepcopy(model)
    plans = []
    for stack, input_norm, layers in stacks:
        first = None
        if input_norm is not None:
            first = [_get(folded, input_norm)]
        else:
            first = _embedding_for(stack, embedding, model, folded)
            if first is None:
                raise ValueError(
                    f"stack {stack or '(the model)'!r}: its first layer reads an input no LayerNorm of the model "
                    "produces; pass embedding= (the nn.Embedding / nn.Linear module(s) producing it, or a dict "
                    "{stack name: module(s)})")
        plans.append((first, input_norm is not None, [_get(folded, n) for n, _ in layers]))
    for first, first_is_norm, stack_layers in plans:
        entries = [(layer, LAYER_KINDS[kind_key(type(layer))], _omegas_of(layer)) for layer in stack_layers]
        fold_stack_(entries, first, first_is_norm, model=folded)
    for _, _, stack_layers in plans:
        for layer in stack_layers:
            _strip(layer)
    return folded


@torch.no_grad()
def fold_stack_(entries: Sequence[Tuple[nn.Module, LayerKind, Sequence]], first: Sequence[nn.Module],
                first_is_norm: bool, model: Optional[nn.Module] = None) -> None:
    """Move every omega of one stack into what produces its sublayer's input, in place.

    The algorithm behind :func:`fold`, for any stack described by :class:`LayerKind` (fairseq's layers
    use it too). Each omega multiplies the LayerNorm (or, for the stack's first sublayer, the input
    LayerNorm or the embedding modules) that produces its sublayer's input ``x``, and divides the input
    columns of the linear maps that read ``x``.

    Args:
        entries: ``(layer, kind, omegas)`` per layer in stack order: ``layer`` holds the LayerNorms and
            linear maps named by ``kind`` (changed in place), ``omegas`` one per sublayer (numbers,
            tensors or :class:`OmegaResidual` modules, possibly of another copy of the model).
        first: what produces the first layer's input: ``[LayerNorm]`` when ``first_is_norm``, else the
            ``nn.Embedding`` / ``nn.Linear`` modules whose outputs sum to it.
        model: the model holding ``first``; an embedding weight shared with other modules of it (a
            tied output projection) is untied before it is scaled.
    """
    prev_last = None
    for layer, kind, omegas in entries:
        if len(omegas) != len(kind.sublayers):
            raise ValueError(f"{type(layer).__name__}: {len(omegas)} omegas for {len(kind.sublayers)} sublayers")
        for sub, omega in zip(kind.sublayers, omegas):
            fold_into_linears_(_readers(layer, sub.readers), omega)
            if sub.source is not None:
                fold_into_norm_(_get(layer, sub.source), omega)
            elif prev_last is not None:
                fold_into_norm_(prev_last, omega)
            elif first_is_norm:
                fold_into_norm_(first[0], omega)
            else:
                for emb in first:
                    if model is not None:
                        _untie(emb, model)
                    fold_into_embedding_(emb, omega)
        prev_last = _get(layer, kind.last_norm)


def _strip(layer: nn.Module) -> None:
    """Back to the stock class: no omegas, no hooks."""
    if isinstance(layer, admin_layers.TransformerEncoderLayer):
        names, stock = admin_layers.ENCODER_RESIDUALS, nn.TransformerEncoderLayer
    elif isinstance(layer, admin_layers.TransformerDecoderLayer):
        names, stock = admin_layers.DECODER_RESIDUALS, nn.TransformerDecoderLayer
    else:
        _remove_hooks(layer)
        del layer.admin_omegas
        return
    for name in names:
        delattr(layer, name)
    layer.__class__ = stock
