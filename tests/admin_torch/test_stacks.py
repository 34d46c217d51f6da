"""admin_torch.stacks: where a model's residual stacks are (torch.nn models here; the HuggingFace families are
covered through convert and fold in test_convert.py and test_huggingface.py)."""

import pytest
import torch
from torch import nn

from admin_torch import OmegaResidual, TransformerEncoderLayer, convert
from admin_torch.architectures import STACK_KINDS, StackKind, kind_key
from admin_torch.stacks import admin_stacks, find_stacks, is_converted, omegas_of, resolve


def encoder(layers=2):
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), layers,
                                 enable_nested_tensor=False)


def test_stacks_of_a_transformer_are_its_encoder_and_decoder_in_order():
    model = nn.Transformer(16, 2, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=32, batch_first=True)
    stacks = find_stacks(model)
    assert [(prefix, len(layers)) for prefix, _, layers in stacks] == [("encoder.", 2), ("decoder.", 3)]
    assert [kind for _, kind, _ in stacks] == [STACK_KINDS[kind_key(nn.TransformerEncoder)],
                                              STACK_KINDS[kind_key(nn.TransformerDecoder)]]
    names = [name for _, _, layers in stacks for name, _, _ in layers]
    assert names == ["encoder.layers.0", "encoder.layers.1", "decoder.layers.0", "decoder.layers.1", "decoder.layers.2"]
    # the decoder layers keep their cross-attention sublayer: the model holds an encoder
    assert [len(k.sublayers) for _, _, layers in stacks for _, _, k in layers] == [2, 2, 3, 3, 3]


def test_an_owner_is_the_model_itself_and_loose_layers_group_per_parent_and_type():
    assert [(p, len(layers)) for p, _, layers in find_stacks(encoder(3))] == [("", 3)]

    class Loose(nn.Module):  # supported layers outside any known stack owner
        def __init__(self):
            super().__init__()
            self.a = nn.ModuleList([nn.TransformerEncoderLayer(16, 2, 32) for _ in range(2)])
            self.b = nn.TransformerEncoderLayer(16, 2, 32)
            self.c = nn.TransformerDecoderLayer(16, 2, 32)

    stacks = find_stacks(Loose())
    assert [(p, kind, [n for n, _, _ in layers]) for p, kind, layers in stacks] == [
        ("a.", None, ["a.0", "a.1"]), ("", None, ["b"]), ("", None, ["c"])]


def test_a_sequence_counts_applications_of_shared_layers(monkeypatch):
    class Shared(nn.Module):  # one layer applied three times, then another once
        def __init__(self):
            super().__init__()
            self.one, self.two = nn.TransformerEncoderLayer(16, 2, 32), nn.TransformerEncoderLayer(16, 2, 32)

    monkeypatch.setitem(STACK_KINDS, kind_key(Shared),
                        StackKind("unused", None, sequence=lambda m: [m.one, m.one, m.one, m.two]))
    model, applications = Shared(), {}
    stacks = find_stacks(model, applications)
    assert [(p, [n for n, _, _ in layers]) for p, _, layers in stacks] == [("", ["one", "two"])]
    assert applications == {id(model.one): 3, id(model.two): 1}


def test_admin_stacks_lists_only_converted_layers_and_the_input_norm():
    model = nn.Transformer(16, 2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32, batch_first=True)
    assert admin_stacks(model) == []
    convert(model.encoder)
    stacks = admin_stacks(model)
    assert [(s, norm, [n for n, _ in layers]) for s, norm, layers in stacks] == [
        ("encoder", None, ["encoder.layers.0", "encoder.layers.1"])]


def test_is_converted_and_omegas_of_both_mechanisms():
    stock = nn.TransformerEncoderLayer(16, 2, 32)
    assert not is_converted(stock)
    layer = TransformerEncoderLayer(16, 2, 32, num_res_layers=4)
    assert is_converted(layer) and omegas_of(layer) == [layer.omega_sa, layer.omega_ff]
    hooked = nn.Module()
    hooked.admin_omegas = nn.ModuleList([OmegaResidual(2.0), OmegaResidual(3.0)])
    assert is_converted(hooked) and omegas_of(hooked) == list(hooked.admin_omegas)


def test_resolve_follows_a_dotted_path_to_modules_and_parameters():
    model = encoder()
    assert resolve(model, "layers.1.norm1") is model.layers[1].norm1
    assert resolve(model, "layers.0.self_attn.in_proj_weight") is model.layers[0].self_attn.in_proj_weight
    with pytest.raises(AttributeError):
        resolve(model, "layers.0.missing")
    assert torch.is_tensor(resolve(model, "layers.0.linear1.weight"))
