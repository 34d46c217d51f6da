"""Where Admin's residuals sit in the transformer layers this library supports: one small description
per layer type, read by [`admin_torch.convert`][admin_torch.convert], [`admin_torch.fold`][admin_torch.fold] and the profiler.

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

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

__all__ = ["Sublayer", "LayerKind", "StackKind", "LAYER_KINDS", "STACK_KINDS", "PRE_LN_MODEL_TYPES",
           "UNSUPPORTED_MODEL_TYPES", "kind_key", "seq2seq_layer_kinds",
           "bert_like_kind", "layer_kind", "stack_kind"]


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


def _bart_like(prefix: str, name: Optional[str] = None, encoder_qkv: Tuple[str, ...] = _QKV,
               encoder_layer: Optional[str] = None, decoder_layer: Optional[str] = None) -> Dict[str, LayerKind]:
    """The two layer classes of a BART-like HuggingFace module (`seq2seq_layer_kinds`)."""
    encoder, decoder = seq2seq_layer_kinds(encoder_qkv)
    if name is None:
        name = prefix.rsplit(".", 1)[-1].replace("modeling_", "").capitalize()
    return {f"{prefix}.{encoder_layer or name + 'EncoderLayer'}": encoder,
            f"{prefix}.{decoder_layer or name + 'DecoderLayer'}": decoder}


def bert_like_kind(qkv: Tuple[str, ...] = ("query", "key", "value"), cross: bool = False,
                   cross_q: str = "query") -> LayerKind:
    """BERT's layer layout (``attention.self`` / ``attention.output``, optional ``crossattention``,
    ``intermediate.dense``, ``output``), whose output modules take the residual as an argument."""
    subs = [Sublayer("attention.output.LayerNorm", tuple(f"attention.self.{q}" for q in qkv),
                     residual_arg="attention.output")]
    if cross:
        subs.append(Sublayer("crossattention.output.LayerNorm", (f"crossattention.self.{cross_q}",),
                             source="attention.output.LayerNorm", residual_arg="crossattention.output"))
    subs.append(Sublayer("output.LayerNorm", ("intermediate.dense",), source=subs[-1].norm, residual_arg="output"))
    return LayerKind(tuple(subs), last_norm="output.LayerNorm", mechanism="hooks",
                     role="decoder" if cross else None)


def _bert_like(prefix: str, name: str) -> Dict[str, LayerKind]:
    return {f"{prefix}.{name}Layer": bert_like_kind()}


#: supported layer types, by `kind_key`
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
    # BERT, RoBERTa and the other BERT-derived families are recognised by structure (layer_kind)
    **_bart_like("transformers.models.bart.modeling_bart"),
    **_bart_like("transformers.models.marian.modeling_marian"),
    **_bart_like("transformers.models.blenderbot_small.modeling_blenderbot_small", "BlenderbotSmall"),
    **_bart_like("transformers.models.led.modeling_led", "LED", encoder_qkv=tuple(
        f"self_attn.longformer_self_attn.{p}{g}" for p in ("query", "key", "value") for g in ("", "_global"))),
    "transformers.models.distilbert.modeling_distilbert.TransformerBlock": LayerKind((
        Sublayer("sa_layer_norm", ("attention.q_lin", "attention.k_lin", "attention.v_lin"), capture="attention"),
        Sublayer("output_layer_norm", ("ffn.lin1",), source="sa_layer_norm"),
    ), last_norm="output_layer_norm", mechanism="hooks"),
    # ALBERT: one omega per residual of each (shared) layer, used at every application (N counts applications)
    "transformers.models.albert.modeling_albert.AlbertLayer": LayerKind((
        Sublayer("attention.LayerNorm", ("attention.query", "attention.key", "attention.value"), capture="attention"),
        Sublayer("full_layer_layer_norm", ("ffn",), source="attention.LayerNorm"),
    ), last_norm="full_layer_layer_norm", mechanism="hooks"),
    "transformers.models.mpnet.modeling_mpnet.MPNetLayer": LayerKind((
        Sublayer("attention.LayerNorm", ("attention.attn.q", "attention.attn.k", "attention.attn.v"),
                 capture="attention.attn"),
        Sublayer("output.LayerNorm", ("intermediate.dense",), source="attention.LayerNorm", residual_arg="output"),
    ), last_norm="output.LayerNorm", mechanism="hooks"),
    # XLNet: one LayerNorm per sublayer serves both streams (h, and the query stream g when target_mapping
    # is given): the attention captures (h, g) and its norm takes them in that order; the feed-forward runs
    # on g, then h, each call capturing its own input
    "transformers.models.xlnet.modeling_xlnet.XLNetLayer": LayerKind((
        Sublayer("rel_attn.layer_norm", tuple(f"rel_attn.{p}[input_first]" for p in "qkv"), capture="rel_attn",
                 capture_args=(0, 1)),
        Sublayer("ff.layer_norm", ("ff.layer_1",), source="rel_attn.layer_norm", capture="ff"),
    ), last_norm="ff.layer_norm", mechanism="hooks"),
    # Funnel: x of the attention is its query (pooled at a block's first layer; keys and values read the
    # unpooled input, the same LayerNorm output)
    "transformers.models.funnel.modeling_funnel.FunnelLayer": LayerKind((
        Sublayer("attention.layer_norm", ("attention.q_head", "attention.k_head", "attention.v_head"),
                 capture="attention"),
        Sublayer("ffn.layer_norm", ("ffn.linear_1",), source="attention.layer_norm", capture="ffn"),
    ), last_norm="ffn.layer_norm", mechanism="hooks"),
}
_FSMT_FOLD = ("the first layer reads token embeddings plus FSMT's sinusoidal position embeddings, which are not "
              "learned and are regenerated unscaled (when a longer input extends the table, and on reload), so "
              "omega cannot be folded into them durably; keep the Admin form (torch.save(model.state_dict()))")
LAYER_KINDS.update({k: dataclasses.replace(v, fold_blocker=_FSMT_FOLD) for k, v in _bart_like(
    "transformers.models.fsmt.modeling_fsmt", encoder_layer="EncoderLayer", decoder_layer="DecoderLayer").items()})
# the drop-in subclasses describe themselves like the classes they replace
LAYER_KINDS["admin_torch.layers.TransformerEncoderLayer"] = LAYER_KINDS["torch.nn.modules.transformer.TransformerEncoderLayer"]
LAYER_KINDS["admin_torch.layers.TransformerDecoderLayer"] = LAYER_KINDS["torch.nn.modules.transformer.TransformerDecoderLayer"]

#: modules that own a stack of supported layers, by `kind_key`
STACK_KINDS: Dict[str, StackKind] = {
    "torch.nn.modules.transformer.TransformerEncoder": StackKind("layers", None),
    "torch.nn.modules.transformer.TransformerDecoder": StackKind("layers", None),
    "transformers.models.bert.modeling_bert.BertModel": StackKind("encoder.layer", "embeddings.LayerNorm"),
    "transformers.models.roberta.modeling_roberta.RobertaModel": StackKind("encoder.layer", "embeddings.LayerNorm"),
    "transformers.models.bart.modeling_bart.BartEncoder": StackKind("layers", "layernorm_embedding"),
    "transformers.models.bart.modeling_bart.BartDecoder": StackKind("layers", "layernorm_embedding"),
    "transformers.models.marian.modeling_marian.MarianEncoder": StackKind("layers", None),
    "transformers.models.marian.modeling_marian.MarianDecoder": StackKind("layers", None),
    "transformers.models.blenderbot_small.modeling_blenderbot_small.BlenderbotSmallEncoder":
        StackKind("layers", "layernorm_embedding"),
    # the decoder normalizes the token embeddings, then adds the (learned) positions
    "transformers.models.blenderbot_small.modeling_blenderbot_small.BlenderbotSmallDecoder":
        StackKind("layers", "layernorm_embedding", inputs=("embed_positions",)),
    "transformers.models.led.modeling_led.LEDEncoder": StackKind("layers", "layernorm_embedding"),
    "transformers.models.led.modeling_led.LEDDecoder": StackKind("layers", "layernorm_embedding"),
    "transformers.models.distilbert.modeling_distilbert.DistilBertModel":
        StackKind("transformer.layer", "embeddings.LayerNorm"),
    "transformers.models.mpnet.modeling_mpnet.MPNetModel": StackKind("encoder.layer", "embeddings.LayerNorm"),
    "transformers.models.fsmt.modeling_fsmt.FSMTEncoder": StackKind("layers", None),
    "transformers.models.fsmt.modeling_fsmt.FSMTDecoder": StackKind("layers", None),
    # the first layer reads dropout(word_embedding(ids)) (stream h) and mask_emb (stream g)
    "transformers.models.xlnet.modeling_xlnet.XLNetModel": StackKind("layer", None,
                                                                     inputs=("word_embedding", "mask_emb")),
}


def _albert_sequence(model) -> List[nn.Module]:
    """AlbertModel's layers in the order ``AlbertTransformer.forward`` applies them."""
    cfg, groups = model.config, model.encoder.albert_layer_groups
    per_group = cfg.num_hidden_layers / cfg.num_hidden_groups
    return [layer for i in range(cfg.num_hidden_layers) for layer in groups[int(i / per_group)].albert_layers]


STACK_KINDS["transformers.models.albert.modeling_albert.AlbertModel"] = StackKind(
    "encoder.albert_layer_groups", None, input_linear="encoder.embedding_hidden_mapping_in", sequence=_albert_sequence)


def _funnel_encoder(model) -> List[nn.Module]:
    """FunnelEncoder's layers in the order its forward applies them (each repeated ``block_repeats`` times)."""
    repeats = model.config.block_repeats
    return [layer for b, block in enumerate(model.encoder.blocks) for layer in block for _ in range(repeats[b])]


def _funnel_fold_check(model, omegas) -> Optional[str]:
    """FunnelModel's decoder starts from ``upsample(encoder output) + first_block_hidden``, the output of
    the first block, which fold scales by the omega of the second block's first layer while the encoder
    output takes the decoder's first omega: exact only when those are equal."""
    blocks = model.encoder.blocks
    if len(blocks) < 2 or not len(model.decoder.layers):
        return None
    a, b = omegas(blocks[1][0])[0], omegas(model.decoder.layers[0])[0]
    if a.shape == b.shape and bool((a == b).all()):
        return None
    return ("FunnelModel's decoder adds the first block's output (which fold scales by the first omega of block 1) "
            "to the upsampled encoder output (scaled by the decoder's first omega), and those omegas differ "
            "(trained as_parameter omegas); keep the Admin form (torch.save(model.state_dict()))")


#: Funnel: the encoder and its decoder (FunnelModel) are one residual stream, one stack for N
STACK_KINDS["transformers.models.funnel.modeling_funnel.FunnelBaseModel"] = StackKind(
    "encoder.blocks", "embeddings.layer_norm", sequence=_funnel_encoder)
STACK_KINDS["transformers.models.funnel.modeling_funnel.FunnelModel"] = StackKind(
    "encoder.blocks", "embeddings.layer_norm", sequence=lambda m: _funnel_encoder(m) + list(m.decoder.layers),
    fold_check=_funnel_fold_check)


# ---------------------------------------------------------------- recognising structure

def _is_residual_output(module) -> bool:
    """``module`` computes ``LayerNorm(dropout(dense(hidden_states)) + input_tensor)`` as BERT's
    ``BertSelfOutput`` / ``BertOutput`` do: a ``dense`` Linear, a ``LayerNorm`` and a forward whose
    first two parameters are ``hidden_states, input_tensor`` (Pre-LN variants, such as Megatron-BERT's
    ``(hidden_states, residual)`` without a LayerNorm, do not match)."""
    if not isinstance(getattr(module, "dense", None), nn.Linear) or \
            not isinstance(getattr(module, "LayerNorm", None), nn.LayerNorm):
        return False
    try:
        params = list(inspect.signature(type(module).forward).parameters)[1:3]
    except (TypeError, ValueError):
        return False
    return params == ["hidden_states", "input_tensor"]


def _qkv(self_attn) -> Optional[Tuple[str, ...]]:
    """The projections of a BERT-like self-attention module that read the layer input."""
    for names in (("query", "key", "value"), ("query_proj", "key_proj", "value_proj")):
        if all(isinstance(getattr(self_attn, n, None), nn.Linear) for n in names):
            # Longformer's global attention projections read the same input
            extra = tuple(f"{n}_global" for n in names if isinstance(getattr(self_attn, f"{n}_global", None), nn.Linear))
            return names + extra
    return None


def _deberta_blocker(self_attn) -> Optional[str]:
    """DeBERTa's disentangled attention with ``share_att_key`` applies ``key_proj`` / ``query_proj`` to the
    relative position embeddings too, so their columns cannot absorb 1 / omega."""
    if getattr(self_attn, "relative_attention", False) and getattr(self_attn, "share_att_key", False) and \
            any(t in getattr(self_attn, "pos_att_type", ()) for t in ("c2p", "p2c")):
        return ("share_att_key=True: key_proj / query_proj also read the relative position embeddings, so "
                "omega cannot be folded into them exactly")
    return None


def layer_kind(module) -> Optional[LayerKind]:
    """The description of ``module`` as a Post-LN layer, or None.

    `LAYER_KINDS` first (by class), then structure: a BERT-like layer (``attention.self`` with
    query/key/value projections, ``attention.output`` and ``output`` that compute
    ``LayerNorm(dense(h) + input_tensor)``, ``intermediate.dense``, optionally ``crossattention``).
    That covers BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, ERNIE, RoFormer, BigBird, Longformer,
    Data2VecText and DeBERTa-v2 without naming them.
    """
    kind = LAYER_KINDS.get(kind_key(type(module)))
    if kind is not None:
        return kind
    attention = getattr(module, "attention", None)
    intermediate = getattr(module, "intermediate", None)
    if attention is None or intermediate is None or not isinstance(getattr(intermediate, "dense", None), nn.Linear):
        return None
    if not (_is_residual_output(getattr(attention, "output", None)) and
            _is_residual_output(getattr(module, "output", None))):
        return None
    qkv = _qkv(getattr(attention, "self", None))
    if qkv is None:
        return None
    cross = getattr(module, "crossattention", None)
    cross_q = None
    if cross is not None:
        cross_qkv = _qkv(getattr(cross, "self", None))
        if cross_qkv is None or not _is_residual_output(getattr(cross, "output", None)):
            return None
        cross_q = cross_qkv[0]
    kind = bert_like_kind(qkv, cross is not None, cross_q or "query")
    blocker = _deberta_blocker(attention.self)
    if blocker is not None:
        kind = LayerKind(kind.sublayers, kind.last_norm, kind.mechanism, role=kind.role, fold_blocker=blocker)
    return kind


def stack_kind(module) -> Optional[StackKind]:
    """The description of ``module`` as the owner of a stack: `STACK_KINDS` (by class), then
    structure: ``encoder.layer`` (a list of layers) fed by ``embeddings.LayerNorm``, or by
    ``embeddings_project`` (ELECTRA, RoFormer with ``embedding_size != hidden_size``)."""
    kind = STACK_KINDS.get(kind_key(type(module)))
    if kind is not None:
        return kind
    encoder = getattr(module, "encoder", None)
    if not isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        return None
    if not isinstance(getattr(getattr(module, "embeddings", None), "LayerNorm", None), nn.LayerNorm):
        return None
    if getattr(encoder, "conv", None) is not None:  # DeBERTa-v2's conv after the first layer
        return None
    linear = "embeddings_project" if isinstance(getattr(module, "embeddings_project", None), nn.Linear) else None
    return StackKind("encoder.layer", "embeddings.LayerNorm", input_linear=linear)


#: HuggingFace ``model_type`` values of Pre-LN families (residual ``x + f(LN(x))``): convert refuses them
PRE_LN_MODEL_TYPES = frozenset({
    "mbart", "pegasus", "pegasus_x", "m2m_100", "nllb-moe", "megatron-bert", "modernbert", "t5", "mt5", "umt5",
    "longt5", "switch_transformers", "gpt2", "gpt_neo", "gpt_neox", "gptj", "codegen", "llama", "mistral",
    "mixtral", "qwen2", "qwen3", "opt", "bloom", "falcon", "phi", "phi3", "gemma", "gemma2", "gemma3", "xglm",
    "blenderbot", "bigbird_pegasus", "whisper", "biogpt", "olmo", "starcoder2",
})

#: HuggingFace ``model_type`` values of Post-LN families convert refuses, with the reason (none today: the
#: table is where a family whose residuals cannot be described goes)
UNSUPPORTED_MODEL_TYPES: Dict[str, str] = {}
