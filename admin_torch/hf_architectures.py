"""HuggingFace's Post-LN layers and stacks described for Admin (`admin_torch.architectures`' types), and the
families [`convert`][admin_torch.convert] refuses by ``config.model_type``: the HuggingFace knowledge of
admin_torch, in one file beside its adapter (`admin_torch.hf_io`). Importing it registers the tables and the
structural recognition of BERT-derived layers with the core's registry; transformers itself is never imported
(classes are named by their ``module.QualifiedName``).

Examples:
    >>> from admin_torch.architectures import LAYER_KINDS
    >>> LAYER_KINDS["transformers.models.bart.modeling_bart.BartEncoderLayer"].sublayers[0].norm
    'self_attn_layer_norm'
    >>> "gpt2" in PRE_LN_MODEL_TYPES
    True
"""

import dataclasses
import inspect
from typing import Dict, List, Optional, Tuple

from torch import nn

from .architectures import (_QKV, LAYER_KINDS, STACK_KINDS, LayerKind, StackKind, Sublayer, register_recognizer,
                            seq2seq_layer_kinds)

__all__ = ["HF_LAYER_KINDS", "HF_STACK_KINDS", "PRE_LN_MODEL_TYPES", "UNSUPPORTED_MODEL_TYPES", "bert_like_kind",
           "bert_like_layer", "bert_like_stack", "refusal"]


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


#: HuggingFace layer types, by `admin_torch.architectures.kind_key`
HF_LAYER_KINDS: Dict[str, LayerKind] = {
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
HF_LAYER_KINDS.update({k: dataclasses.replace(v, fold_blocker=_FSMT_FOLD) for k, v in _bart_like(
    "transformers.models.fsmt.modeling_fsmt", encoder_layer="EncoderLayer", decoder_layer="DecoderLayer").items()})

#: HuggingFace modules that own a stack, by `admin_torch.architectures.kind_key`
HF_STACK_KINDS: Dict[str, StackKind] = {
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


HF_STACK_KINDS["transformers.models.albert.modeling_albert.AlbertModel"] = StackKind(
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
HF_STACK_KINDS["transformers.models.funnel.modeling_funnel.FunnelBaseModel"] = StackKind(
    "encoder.blocks", "embeddings.layer_norm", sequence=_funnel_encoder)
HF_STACK_KINDS["transformers.models.funnel.modeling_funnel.FunnelModel"] = StackKind(
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


def bert_like_layer(module) -> Optional[LayerKind]:
    """``module`` as a BERT-like layer (``attention.self`` with query/key/value projections, ``attention.output``
    and ``output`` that compute ``LayerNorm(dense(h) + input_tensor)``, ``intermediate.dense``, optionally
    ``crossattention``), or None. That covers BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, ERNIE, RoFormer,
    BigBird, Longformer, Data2VecText and DeBERTa-v2 without naming them."""
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


def bert_like_stack(module) -> Optional[StackKind]:
    """``module`` as a BERT-like stack owner: ``encoder.layer`` (a list of layers) fed by
    ``embeddings.LayerNorm``, or by ``embeddings_project`` (ELECTRA, RoFormer with
    ``embedding_size != hidden_size``); else None."""
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


def refusal(model: nn.Module) -> Optional[str]:
    """Why [`convert`][admin_torch.convert] refuses ``model``'s family (by ``config.model_type``), or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in UNSUPPORTED_MODEL_TYPES:
        return (f"{type(model).__name__} (model_type {model_type!r}) is not supported by admin_torch.convert: "
                f"{UNSUPPORTED_MODEL_TYPES[model_type]}. Nothing was changed.")
    if model_type in PRE_LN_MODEL_TYPES:
        return (f"{type(model).__name__} (model_type {model_type!r}) is a Pre-LN model (x + f(LN(x))); Admin "
                "rescales Post-LN residuals LN(omega * x + f(x)) only, so it does not apply. Nothing was changed.")
    return None


LAYER_KINDS.update(HF_LAYER_KINDS)
STACK_KINDS.update(HF_STACK_KINDS)
register_recognizer(layer=bert_like_layer, stack=bert_like_stack)
