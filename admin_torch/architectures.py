"""Where Admin's residuals sit in the transformer layers this library supports: one small description
per layer type, read by :func:`admin_torch.convert`, :func:`admin_torch.fold` and the profiler.

A Post-LN sublayer computes ``norm(x + f(x))``. Its description says which LayerNorm ``norm`` is,
where ``x`` comes from (the output of a LayerNorm of the same layer, or the layer's input, which the
previous layer's last LayerNorm, the stack's input LayerNorm or an embedding produced), and which
linear maps read ``x`` (their input columns take ``1 / omega`` when Admin is folded away).

Two ways to put omega in:

* ``"subclass"`` (torch.nn): the layer's class becomes a drop-in subclass whose forward calls
  :class:`~admin_torch.OmegaResidual` modules (:mod:`admin_torch.layers`);
* ``"hooks"`` (HuggingFace, whose layer forwards are long): hooks capture ``x`` and turn the sum
  ``s = x + f(x)`` entering ``norm`` into ``omega * x + f(x) = s + (omega - 1) x`` -- the same
  function, so the same training, without copying the library's forward code. The omegas are
  :class:`~admin_torch.OmegaResidual` modules in ``layer.admin_omegas``.

A stack description names the layer list of a module that owns a stack and the LayerNorm that
produces the stack's input (None where an embedding does; :func:`admin_torch.fold` then needs
``embedding=``).

Readers are attribute paths; ``"self_attn.in_proj_weight"`` is a packed q/k/v weight (every row
reads ``x``), ``"multihead_attn.in_proj_weight[q]"`` its query rows only (cross-attention: keys and
values read the encoder's output).
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["Sublayer", "LayerKind", "StackKind", "LAYER_KINDS", "STACK_KINDS", "kind_key"]


@dataclass(frozen=True)
class Sublayer:
    """One residual sublayer ``norm(x + f(x))`` of a layer."""

    norm: str
    readers: Tuple[str, ...]
    source: Optional[str] = None  # a LayerNorm of the same layer whose output is x; None: the layer's input


@dataclass(frozen=True)
class LayerKind:
    """A supported Post-LN layer type."""

    sublayers: Tuple[Sublayer, ...]
    last_norm: str                  # the layer's output (x of the next layer's first sublayer)
    mechanism: str                  # "subclass" or "hooks"
    admin_class: Optional[str] = None  # subclass mechanism: the admin_torch.layers class


@dataclass(frozen=True)
class StackKind:
    """A module that owns a stack of layers."""

    layers: str
    input_norm: Optional[str]


def kind_key(cls: type) -> str:
    """The key of a class in the tables: ``module.QualifiedName``."""
    return f"{cls.__module__}.{cls.__qualname__}"


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _bart_like(prefix: str) -> Dict[str, LayerKind]:
    encoder = LayerKind((
        Sublayer("self_attn_layer_norm", _QKV),
        Sublayer("final_layer_norm", ("fc1",), source="self_attn_layer_norm"),
    ), last_norm="final_layer_norm", mechanism="hooks")
    decoder = LayerKind((
        Sublayer("self_attn_layer_norm", _QKV),
        Sublayer("encoder_attn_layer_norm", ("encoder_attn.q_proj",), source="self_attn_layer_norm"),
        Sublayer("final_layer_norm", ("fc1",), source="encoder_attn_layer_norm"),
    ), last_norm="final_layer_norm", mechanism="hooks")
    name = prefix.rsplit(".", 1)[-1].replace("modeling_", "").capitalize()
    return {f"{prefix}.{name}EncoderLayer": encoder, f"{prefix}.{name}DecoderLayer": decoder}


def _bert_like(prefix: str, name: str) -> Dict[str, LayerKind]:
    return {f"{prefix}.{name}Layer": LayerKind((
        Sublayer("attention.output.LayerNorm",
                 ("attention.self.query", "attention.self.key", "attention.self.value")),
        Sublayer("output.LayerNorm", ("intermediate.dense",), source="attention.output.LayerNorm"),
    ), last_norm="output.LayerNorm", mechanism="hooks")}


#: supported layer types, by :func:`kind_key`
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
    **_bert_like("transformers.models.bert.modeling_bert", "Bert"),
    **_bert_like("transformers.models.roberta.modeling_roberta", "Roberta"),
    **_bart_like("transformers.models.bart.modeling_bart"),
    **_bart_like("transformers.models.marian.modeling_marian"),
}
# the drop-in subclasses describe themselves like the classes they replace
LAYER_KINDS["admin_torch.layers.TransformerEncoderLayer"] = LAYER_KINDS["torch.nn.modules.transformer.TransformerEncoderLayer"]
LAYER_KINDS["admin_torch.layers.TransformerDecoderLayer"] = LAYER_KINDS["torch.nn.modules.transformer.TransformerDecoderLayer"]

#: modules that own a stack of supported layers, by :func:`kind_key`
STACK_KINDS: Dict[str, StackKind] = {
    "torch.nn.modules.transformer.TransformerEncoder": StackKind("layers", None),
    "torch.nn.modules.transformer.TransformerDecoder": StackKind("layers", None),
    "transformers.models.bert.modeling_bert.BertModel": StackKind("encoder.layer", "embeddings.LayerNorm"),
    "transformers.models.roberta.modeling_roberta.RobertaModel": StackKind("encoder.layer", "embeddings.LayerNorm"),
    "transformers.models.bart.modeling_bart.BartEncoder": StackKind("layers", "layernorm_embedding"),
    "transformers.models.bart.modeling_bart.BartDecoder": StackKind("layers", "layernorm_embedding"),
    "transformers.models.marian.modeling_marian.MarianEncoder": StackKind("layers", None),
    "transformers.models.marian.modeling_marian.MarianDecoder": StackKind("layers", None),
}
