"""Admin for models built elsewhere: [`convert`][admin_torch.convert] a model's Post-LN layers in place, [`fold`][admin_torch.fold] it back.

Supported (`admin_torch.architectures` describes each): torch.nn's ``TransformerEncoderLayer`` and
``TransformerDecoderLayer``, and HuggingFace's BERT, RoBERTa, BART and Marian layers. ``convert``
counts N per stack (2 per encoder layer, 3 per decoder layer; a stack is the layer list of an
``nn.TransformerEncoder``, a ``BertModel``, a ``BartEncoder``..., or the layers of one kind under one
parent) and gives every residual ``norm(x + f(x))`` the form ``norm(omega * x + f(x))``.

``fold`` returns a deep copy whose modules are the stock classes again, computing the same
function with no Admin left: each omega moves into whatever produces its sublayer's input (a LayerNorm,
or the stack's embedding) and out of the linear maps that read it.

Both are the pure-torch core (`admin_torch.conversion`, `admin_torch.folding`) with the framework adapters of
`ADAPTERS` (HuggingFace's, `admin_torch.hf_io`: the config record and the save / load glue).

Examples:
    >>> enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 4, 64), 6,
    ...                                   enable_nested_tensor=False)
    >>> enc = convert(enc)           # 6 layers -> N = 12, omega = calculate_init(12)
    >>> type(enc.layers[0]).__name__
    'TransformerEncoderLayer'
    >>> model = torch.nn.Sequential(torch.nn.Embedding(100, 32), enc)   # ... trained, then:
    >>> plain = fold(model, embedding=model[0])   # the first layer reads the embedding's output
    >>> tokens = torch.randint(0, 100, (2, 7))
    >>> torch.allclose(plain.eval()(tokens), model.eval()(tokens), atol=1e-5)
    True
"""

from typing import Optional, Tuple

import torch
from torch import nn

from . import hf_io
from .adapter import Adapter
from .conversion import convert_model
from .folding import Embedding, fold_model

__all__ = ["convert", "fold", "ADAPTERS"]

#: the framework adapters [`convert`][admin_torch.convert] and [`fold`][admin_torch.fold] apply, in this order
ADAPTERS: Tuple[Adapter, ...] = (hf_io.HUGGINGFACE,)


def convert(model: nn.Module, *, output_change_scale: str = "default", as_parameter: bool = False,
            qk_norm: bool = False) -> nn.Module:
    """Turn every supported Post-LN layer of ``model`` into its Admin form, in place; returns ``model``.

    Every residual ``LN(x + f(x))`` becomes ``LN(omega * x + f(x))`` with ``omega = calculate_init(N)``,
    N counted per stack (2 per encoder layer, 3 per decoder layer with cross-attention). Admin is an
    *initialization* for training from scratch: converting a pretrained checkpoint changes the function
    it computes (omega != 1) -- it is not a fine-tuning recipe.

    Args:
        model: any module holding supported layers: torch.nn's encoder/decoder layers; HuggingFace BERT
            and every BERT-like family recognised by structure (RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA,
            ERNIE, RoFormer, BigBird, Longformer, Data2VecText, DeBERTa-v2, BERT decoders with
            cross-attention), BART (incl. ``BartForCausalLM``), Marian, BlenderbotSmall, LED,
            DistilBERT, MPNet, ALBERT (a layer shared across depth keeps one omega per residual, used at
            every application; N counts applications), FSMT (fold refused), XLNet (both attention streams,
            mems), Funnel (encoder and decoder one stack; ``block_repeats`` count as applications);
            anything described in `admin_torch.LAYER_KINDS`.
        output_change_scale: ``'O(n)'``, ``'O(logn)'``, ``'default'`` or ``'O(1)'`` ([`calculate_init`][admin_torch.calculate_init]).
        as_parameter: trainable omega vectors of the hidden size.
        qk_norm: also give every attention module qk-layernorm ([`admin_torch.add_qk_norm`][admin_torch.add_qk_norm]: torch.nn's
            ``MultiheadAttention``; a model with no such module is refused, e.g. HuggingFace families).
            Pre-LN models, which ``convert`` refuses, take [`admin_torch.add_qk_norm`][admin_torch.add_qk_norm] directly.

    A HuggingFace model also gets its settings recorded in ``model.config.admin_torch`` and a
    ``save_pretrained`` that folds on save, or saves the Admin form where no stock model computes its function
    (see `admin_torch.hf_io`, the HuggingFace adapter).

    Raises:
        ValueError: ``model`` is of a Pre-LN family or has a Pre-LN layer; it is of a family in
            `admin_torch.hf_architectures.UNSUPPORTED_MODEL_TYPES`; it has no supported layer that
            is not converted yet; its config says it was saved from an Admin model (load it with
            [`admin_torch.from_pretrained`][admin_torch.from_pretrained]). Nothing is changed then.
    """
    return convert_model(model, output_change_scale=output_change_scale, as_parameter=as_parameter, qk_norm=qk_norm,
                         adapters=ADAPTERS)


def fold(model: nn.Module, *, embedding: Optional[Embedding] = None) -> nn.Module:
    """A deep copy of a converted ``model`` with Admin folded away: stock classes, the same outputs.

    An Admin [`ResidualStack`][admin_torch.ResidualStack] (``make_stack('admin', ...)``) is folded as before
    ([`fold_reference_stack`][admin_torch.folding.fold_reference_stack]).

    Args:
        model: a model [`convert`][admin_torch.convert] was applied to, or a model built from
            [`TransformerEncoderLayer`][admin_torch.TransformerEncoderLayer] / [`TransformerDecoderLayer`][admin_torch.TransformerDecoderLayer]
            (``model`` is not modified).
        embedding: where a stack's first sublayer reads an input that no LayerNorm of the model
            produces (torch.nn stacks, Marian), the ``nn.Embedding`` / ``nn.Linear`` module(s) whose
            outputs sum to that input -- one module, a list (token and position embeddings), or a dict
            ``{stack name: module(s)}`` for a model with several such stacks. A shared (tied) weight is
            untied in the copy. One module feeding several stacks (a shared vocabulary: the same
            ``nn.Embedding`` called for the encoder and the decoder) is scaled once, which is exact when
            those stacks' first omegas are equal, and refused otherwise.

    Raises:
        ValueError: nothing converted in ``model``; an input that needs ``embedding=`` and has none; an
            ``embedding=`` dict key that is not a stack, or an empty list; one embedding module feeding
            stacks whose first omegas differ; a layer whose hooks cannot be removed; a layer whose kind
            cannot be folded exactly (``LayerKind.fold_blocker``: DeBERTa-v2 with ``share_att_key``, FSMT);
            a layer applied several times per forward whose kind has no output projections to divide
            (Funnel's repeated blocks), or whose omegas differ per feature (ALBERT with shared layers and
            trained ``as_parameter`` vectors; with one number per omega it folds, see
            [`SHARED_FOLD_OUTPUTS`][admin_torch.folding.SHARED_FOLD_OUTPUTS]). Nothing is copied or changed then.
    """
    return fold_model(model, embedding=embedding, adapters=ADAPTERS)
