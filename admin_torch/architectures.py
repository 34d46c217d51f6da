"""Where Admin's residuals sit in a transformer layer: the description types and the one registry of them,
read by [`admin_torch.convert`][admin_torch.convert], [`admin_torch.fold`][admin_torch.fold], the profiler and the
stability monitor (`stability_toolbox.sites`).

This module holds the types, torch.nn's descriptions and the registry; each framework's descriptions live
with its adapter and are registered from there: HuggingFace's in `admin_torch.hf_architectures`, fairseq's in
`fairseq_plugins.modules.layer_kinds`. A new family or a new description field touches one file.

A Post-LN sublayer computes ``norm(x + f(x))``. Its description says which LayerNorm ``norm`` is,
where ``x`` comes from (the output of a LayerNorm of the same layer, or the layer's input, which the
previous layer's last LayerNorm, the stack's input LayerNorm or an embedding produced), and which
linear maps read ``x`` (their input columns take ``1 / omega`` when Admin is folded away).

Two ways to put omega in:

* ``"subclass"`` (torch.nn): the layer's class becomes a drop-in subclass whose forward calls
  [`OmegaResidual`][admin_torch.OmegaResidual] modules (`admin_torch.layers`);
* ``"hooks"`` (HuggingFace, whose layer forwards are long): hooks capture ``x`` and turn the sum
  ``s = x + f(x)`` entering ``norm`` into ``omega * x + f(x) = s + (omega - 1) x`` -- the same
  function, so the same training, without copying the library's forward code. The omegas are
  [`OmegaResidual`][admin_torch.OmegaResidual] modules in ``layer.admin_omegas``.

A stack description names the layer list of a module that owns a stack and the LayerNorm that
produces the stack's input (None where an embedding does; [`admin_torch.fold`][admin_torch.fold] then needs
``embedding=``).

Readers are attribute paths; ``"self_attn.in_proj_weight"`` is a packed q/k/v weight (every row
reads ``x``), ``"multihead_attn.in_proj_weight[q]"`` its query rows only (cross-attention: keys and
values read the encoder's output).
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

from torch import nn

__all__ = ["Sublayer", "LayerKind", "StackKind", "LAYER_KINDS", "STACK_KINDS", "kind_key", "seq2seq_layer_kinds",
           "register_layer_kind", "register_recognizer", "layer_kind", "stack_kind", "CONVERTIBLE_MECHANISMS"]


@dataclass(frozen=True)
class Sublayer:
    """One residual sublayer ``norm(x + f(x))`` of a layer.

    Where omega goes in (hooks mechanism), checked in this order:

    * ``residual_arg``: a submodule called as ``module(f_x, x)`` (HuggingFace's ``BertSelfOutput``,
      ``BertOutput``: ``LayerNorm(dropout(dense(h)) + input_tensor)``) -- its second argument (or
      ``input_tensor=``) is multiplied by omega. Stateless, so exact under gradient checkpointing and
      ``torch.compile``.
    * otherwise ``x`` is captured inside the layer's forward and ``s = x + f(x)`` entering ``norm``
      becomes ``s + (omega - 1) x``: ``x`` is the output of the sublayer norm that ran last in this
      layer call (``source`` names it for [`fold`][admin_torch.fold]), or for the first sublayer the first input of
      ``capture`` (a submodule that receives the layer input, e.g. ``"self_attn"``). Without
      ``capture`` the layer's own input is taken by a layer pre-hook, which transformers 5.x
      gradient checkpointing does not replay: give ``capture`` in new descriptions.
    * ``capture`` on a later sublayer: x is the first input of that submodule instead of the output of
      ``source`` (which still names the LayerNorm producing x, for [`fold`][admin_torch.fold]). Needed where a layer
      runs the sublayer once per stream (XLNet's feed-forward on the g and h streams).
    * ``capture_args``: the positional arguments of ``capture`` that are x, one per call of ``norm`` in
      that order; a None argument is skipped (XLNet's two-stream attention: ``(0, 1)``, h then g, through
      one LayerNorm).

    A reader path ending in ``[input_first]`` names a parameter whose *first* dimension is the input
    features (XLNet's ``einsum("ibh,hnd->ibnd", h, q)`` weights of shape ``(d_model, n_head, d_head)``).
    """

    norm: str
    readers: Tuple[str, ...]
    source: Optional[str] = None  # a LayerNorm of the same layer whose output is x; None: the layer's input
    capture: Optional[str] = None  # first sublayer: a submodule whose first input is the layer input x
    residual_arg: Optional[str] = None  # a submodule called as (f_x, x): omega scales its second argument
    capture_args: Tuple[int, ...] = (0,)  # arguments of capture that are x, in the order norm is called


@dataclass(frozen=True)
class LayerKind:
    """A supported Post-LN layer type.

    ``without_cross``: for a decoder layer whose cross-attention only runs when encoder states are
    given, the description used when the converted model holds no encoder (a causal LM such as
    ``BartForCausalLM``): N counts and [`fold`][admin_torch.fold] follow the sublayers that actually run.
    ``role``: ``"encoder"``, ``"decoder"`` or None.
    """

    sublayers: Tuple[Sublayer, ...]
    last_norm: str                  # the layer's output (x of the next layer's first sublayer)
    mechanism: str                  # "subclass" or "hooks"
    admin_class: Optional[str] = None  # subclass mechanism: the admin_torch.layers class
    role: Optional[str] = None
    without_cross: Optional["LayerKind"] = None
    fold_blocker: Optional[str] = None  # why fold cannot be exact for this layer (convert still works)


@dataclass(frozen=True)
class StackKind:
    """A module that owns a stack of layers.

    ``input_norm``: the LayerNorm producing the first layer's input; ``inputs``: modules
    (``nn.Embedding`` / ``nn.Linear``) whose outputs are added to it, or that produce it alone when
    ``input_norm`` is None (then [`fold`][admin_torch.fold] uses them when no ``embedding=`` is given).
    ``input_linear``: an ``nn.Linear`` applied after ``input_norm`` (ELECTRA's ``embeddings_project``):
    it produces the input instead, when present.
    ``sequence``: for a stack whose layers are not one ``nn.ModuleList`` applied once each (ALBERT,
    Funnel), a function ``stack module -> [layer, ...]`` giving the layers in the order one forward
    applies them; a layer shared across depth appears once per application. N counts applications;
    [`fold`][admin_torch.fold] refuses a stack that applies a layer more than once (see `SHARED_LAYER_FOLD`).
    ``inputs`` may also name an ``nn.Parameter`` whose last dimension is the features (XLNet's
    ``mask_emb``, the start of its query stream).
    ``fold_check``: ``(stack module, omegas) -> reason or None``, where ``omegas(layer)`` gives a
    layer's omegas as tensors: why this stack's current omegas cannot be folded exactly (Funnel's
    decoder adds an earlier layer's output to its input), checked by [`fold`][admin_torch.fold] before anything changes.
    """

    layers: str
    input_norm: Optional[str]
    inputs: Tuple[str, ...] = ()
    input_linear: Optional[str] = None
    sequence: Optional[Callable[[nn.Module], List[nn.Module]]] = None
    fold_check: Optional[Callable[[nn.Module, Callable], Optional[str]]] = None


#: why [`admin_torch.fold`][admin_torch.fold] refuses a stack that applies one layer several times (ALBERT's sharing)
SHARED_LAYER_FOLD = (
    "its layers are shared across depth (one layer applied {times} times per forward, as ALBERT does with "
    "num_hidden_groups < num_hidden_layers and Funnel with block_repeats > 1): the shared last LayerNorm produces both the next application's "
    "input, which would have to absorb omega, and the stack's output, which must not, so no stock model with "
    "shared weights computes the Admin function. Train it converted and keep the Admin form "
    "(torch.save(model.state_dict())), or configure no sharing (num_hidden_groups == num_hidden_layers, "
    "block_repeats of 1), which folds exactly")


def kind_key(cls: type) -> str:
    """The key of a class in the tables: ``module.QualifiedName``."""
    return f"{cls.__module__}.{cls.__qualname__}"


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def seq2seq_layer_kinds(encoder_qkv: Tuple[str, ...] = _QKV, mechanism: str = "hooks"
                        ) -> Tuple[LayerKind, LayerKind]:
    """``(encoder layer, decoder layer)`` of fairseq's transformer layout, which BART and its descendants
    copied: ``self_attn`` / ``self_attn_layer_norm``, ``encoder_attn`` / ``encoder_attn_layer_norm``,
    ``fc1`` / ``final_layer_norm``. The decoder's ``without_cross`` is the layout without cross-attention
    (a language model's decoder). ``mechanism="fairseq"``: described for fold only
    (`fairseq_plugins.fold_checkpoint`; fairseq's Admin layers hold their own residual modules)."""
    self_attn = Sublayer("self_attn_layer_norm", encoder_qkv, capture="self_attn")
    encoder = LayerKind((
        self_attn, Sublayer("final_layer_norm", ("fc1",), source="self_attn_layer_norm"),
    ), last_norm="final_layer_norm", mechanism=mechanism, role="encoder")
    dec_self = Sublayer("self_attn_layer_norm", _QKV, capture="self_attn")
    decoder = LayerKind((
        dec_self,
        Sublayer("encoder_attn_layer_norm", ("encoder_attn.q_proj",), source="self_attn_layer_norm"),
        Sublayer("final_layer_norm", ("fc1",), source="encoder_attn_layer_norm"),
    ), last_norm="final_layer_norm", mechanism=mechanism, role="decoder", without_cross=LayerKind((
        dec_self, Sublayer("final_layer_norm", ("fc1",), source="self_attn_layer_norm"),
    ), last_norm="final_layer_norm", mechanism=mechanism, role="decoder"))
    return encoder, decoder


#: the mechanisms [`convert`][admin_torch.convert] can put omega in with; other descriptions (``"fairseq"``:
#: fairseq's own Admin layers hold their residual modules) are read by fold and the monitor only
CONVERTIBLE_MECHANISMS = ("subclass", "hooks")

# ---------------------------------------------------------------- the registry

#: layer types by `kind_key` (exact class): torch.nn's here, each framework's added by its adapter
LAYER_KINDS: Dict[str, LayerKind] = {
    "torch.nn.modules.transformer.TransformerEncoderLayer": LayerKind((
        Sublayer("norm1", ("self_attn.in_proj_weight",)),
        Sublayer("norm2", ("linear1",), source="norm1"),
    ), last_norm="norm2", mechanism="subclass", admin_class="TransformerEncoderLayer"),
    "torch.nn.modules.transformer.TransformerDecoderLayer": LayerKind((
        Sublayer("norm1", ("self_attn.in_proj_weight",)),
        Sublayer("norm2", ("multihead_attn.in_proj_weight[q]",), source="norm1"),
        Sublayer("norm3", ("linear1",), source="norm2"),
    ), last_norm="norm3", mechanism="subclass", admin_class="TransformerDecoderLayer"),
}
# the drop-in subclasses describe themselves like the classes they replace
LAYER_KINDS["admin_torch.layers.TransformerEncoderLayer"] = LAYER_KINDS["torch.nn.modules.transformer.TransformerEncoderLayer"]
LAYER_KINDS["admin_torch.layers.TransformerDecoderLayer"] = LAYER_KINDS["torch.nn.modules.transformer.TransformerDecoderLayer"]

#: modules that own a stack of supported layers, by `kind_key`
STACK_KINDS: Dict[str, StackKind] = {
    "torch.nn.modules.transformer.TransformerEncoder": StackKind("layers", None),
    "torch.nn.modules.transformer.TransformerDecoder": StackKind("layers", None),
}

# layer types described per instance, matched with their subclasses: kind_key -> layer -> LayerKind
_DESCRIBERS: Dict[str, Callable[[nn.Module], Optional[LayerKind]]] = {}
# structural recognition, tried in registration order when no table names the class
_LAYER_RECOGNIZERS: List[Callable[[nn.Module], Optional[LayerKind]]] = []
_STACK_RECOGNIZERS: List[Callable[[nn.Module], Optional[StackKind]]] = []


def register_layer_kind(key: str, describe: Union[LayerKind, Callable[[nn.Module], Optional[LayerKind]]]) -> None:
    """Describe a layer type: ``key`` is ``module.QualifiedName`` of its class (`kind_key`), ``describe`` its
    `LayerKind` or a function ``layer -> LayerKind`` (for layers whose sublayers depend on the instance,
    fairseq's decoder with or without cross-attention). Subclasses match too. Admin, fold and the stability
    monitor all read layers through `layer_kind`, so they see what is registered here.

    Examples:
        >>> class MyLayer(nn.Module): ...
        >>> register_layer_kind(kind_key(MyLayer), LAYER_KINDS[
        ...     "torch.nn.modules.transformer.TransformerEncoderLayer"])
        >>> layer_kind(MyLayer()).last_norm
        'norm2'
        >>> _ = _DESCRIBERS.pop(kind_key(MyLayer))
    """
    if not isinstance(key, str):
        raise TypeError(f"key must be a class key 'module.QualifiedName' (str), got {type(key).__name__}")
    if isinstance(describe, LayerKind):
        kind = describe
        describe = lambda layer: kind  # noqa: E731
    elif not callable(describe):
        raise TypeError(f"describe must be a LayerKind or a callable layer -> LayerKind, got {type(describe).__name__}")
    _DESCRIBERS[key] = describe


def register_recognizer(layer: Optional[Callable[[nn.Module], Optional[LayerKind]]] = None,
                        stack: Optional[Callable[[nn.Module], Optional[StackKind]]] = None) -> None:
    """Add structural recognition: ``layer(module)`` / ``stack(module)`` return a description or None, and are
    asked, in registration order, about modules no table names (HuggingFace's BERT-derived families)."""
    for name, fn, into in (("layer", layer, _LAYER_RECOGNIZERS), ("stack", stack, _STACK_RECOGNIZERS)):
        if fn is not None:
            if not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
            if fn not in into:
                into.append(fn)


def layer_kind(module) -> Optional[LayerKind]:
    """The description of ``module`` as a Post-LN layer, or None: `LAYER_KINDS` (by exact class), then the
    registered describers (`register_layer_kind`, subclasses too), then structural recognition."""
    kind = LAYER_KINDS.get(kind_key(type(module)))
    if kind is not None:
        return kind
    for cls in type(module).__mro__:
        describe = _DESCRIBERS.get(kind_key(cls))
        if describe is not None:
            return describe(module)
    for recognize in _LAYER_RECOGNIZERS:
        kind = recognize(module)
        if kind is not None:
            return kind
    return None


def stack_kind(module) -> Optional[StackKind]:
    """The description of ``module`` as the owner of a stack: `STACK_KINDS` (by class), then structural
    recognition."""
    kind = STACK_KINDS.get(kind_key(type(module)))
    if kind is not None:
        return kind
    for recognize in _STACK_RECOGNIZERS:
        kind = recognize(module)
        if kind is not None:
            return kind
    return None
