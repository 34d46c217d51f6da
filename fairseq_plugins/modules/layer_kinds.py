"""fairseq's Post-LN transformer layers described for admin_torch (`admin_torch.architectures`): where each
residual's input comes from and which linear maps read it. Importing this module registers them with
admin_torch's one registry (`admin_torch.architectures.register_layer_kind`), which
[`admin_torch.fold`][admin_torch.fold]'s stack folding (`fairseq_plugins.fold_checkpoint`) and the stability
monitor (`stability_toolbox.sites`) both read. fairseq itself is not imported: its classes are named by key.

Examples:
    >>> from admin_torch.architectures import layer_kind
    >>> [s.norm for s in DECODER_ONLY_LAYER.sublayers]
    ['self_attn_layer_norm', 'final_layer_norm']
"""

from typing import Optional

from torch import nn

from admin_torch.architectures import LayerKind, register_layer_kind, seq2seq_layer_kinds

__all__ = ["ENCODER_LAYER", "DECODER_LAYER", "DECODER_ONLY_LAYER", "decoder_layer_kind"]

#: fairseq's ``TransformerEncoderLayerBase`` and ``TransformerDecoderLayerBase`` (described for fold and the
#: monitor: fairseq's Admin layers hold their own residual modules, so convert leaves them alone)
ENCODER_LAYER, DECODER_LAYER = seq2seq_layer_kinds(mechanism="fairseq")
#: a decoder layer without cross-attention (a language model's, or --no-cross-attention)
DECODER_ONLY_LAYER = DECODER_LAYER.without_cross


def decoder_layer_kind(layer: nn.Module) -> Optional[LayerKind]:
    """The description of one fairseq decoder layer: with cross-attention when it has one."""
    return DECODER_LAYER if getattr(layer, "encoder_attn", None) is not None else DECODER_ONLY_LAYER


_BASE = "fairseq.modules.transformer_layer."
register_layer_kind(_BASE + "TransformerEncoderLayerBase", ENCODER_LAYER)
register_layer_kind(_BASE + "TransformerDecoderLayerBase", decoder_layer_kind)
