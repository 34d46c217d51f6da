"""Adversarial inputs to admin_torch's public API: each bad argument is a TypeError or ValueError that names it,
raised before anything changes (never a bare AttributeError / RuntimeError / AssertionError from inside torch, a
NaN, or a silently accepted value); and the inputs the checks must let through keep working."""

import copy

import pytest
import torch
from torch import nn

from admin_torch import (AddResidual, DeepNormInit, DeepNormResidual, OmegaResidual, QKNormLinear,
                         QKNormMultiheadAttention, TransformerDecoderLayer, TransformerEncoderLayer, fold_into_norm_,
                         has_qk_norm, make_stack, output_change)
from torch_helpers import raises_naming as _raises

D = 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


RESIDUALS = {
    "omega_buffer": lambda: OmegaResidual(1.5),
    "omega_vector": lambda: OmegaResidual(1.5, as_parameter=True, embed_dim=D),
    "deepnorm": lambda: DeepNormResidual(1.3),
    "add": lambda: AddResidual(),
}
# (method, name of its second argument)
CALLS = [("__call__", "f_x"), ("forward_omega", "f_x"), ("rescale_sum", "s"), ("forward_original", "f_x")]
BAD_OPERANDS = [
    (None, TypeError), ("x", TypeError), (1.5, TypeError), ([1.0] * D, TypeError),
    (torch.ones(2, D, dtype=torch.bool), TypeError), (torch.ones(2, D, dtype=torch.complex64), TypeError),
    (torch.ones(2, D, device="meta"), ValueError), (torch.ones(2, D + 1), ValueError),
]


def _calls(kind):
    return [(m, other) for m, other in CALLS if kind.startswith("omega") or m == "__call__"]


@pytest.mark.parametrize("kind", list(RESIDUALS))
@pytest.mark.parametrize("position", [0, 1])
@pytest.mark.parametrize("bad,exc", BAD_OPERANDS, ids=lambda v: type(v).__name__ if not isinstance(v, torch.Tensor)
                         else f"{v.dtype}-{v.device.type}-{tuple(v.shape)}")
def test_residual_operands_are_checked(kind, position, bad, exc):
    module = RESIDUALS[kind]()
    before = copy.deepcopy(module.state_dict())
    good = torch.randn(2, D)
    for method, other in _calls(kind):
        args = [good, good.clone()]
        args[position] = bad
        name = "x" if position == 0 else other
        _raises(exc, name, getattr(module, method), *args)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("kind", list(RESIDUALS))
def test_residual_valid_inputs_still_work(kind):
    """The checks let through what was valid: broadcasting, integer x (type promotion), float64 gradients."""
    module = RESIDUALS[kind]().double()
    scale = {"omega_buffer": 1.5, "omega_vector": 1.5, "deepnorm": 1.3, "add": 1.0}[kind]
    x = torch.randn(3, 2, D, dtype=torch.float64, requires_grad=True)
    f_x = torch.randn(1, D, dtype=torch.float64, requires_grad=True)  # broadcasts
    torch.testing.assert_close(module(x, f_x), x * scale + f_x)
    assert torch.autograd.gradcheck(lambda a, b: module(a, b), (x, f_x))
    xi = torch.arange(D).view(1, D)
    torch.testing.assert_close(module(xi, torch.zeros(1, D, dtype=torch.float64)), xi * scale, check_dtype=False)


def test_encoder_nested_tensor_fast_path_matches_the_padded_path():
    """torch.nn.TransformerEncoder's default inference path (a padding mask under no_grad turns the batch into a
    nested tensor) was a RuntimeError inside OmegaResidual; it must give the padded path's numbers."""
    layer = TransformerEncoderLayer(D, 2, 16, 0.0, batch_first=True, num_res_layers=4).eval()
    x = torch.randn(3, 5, D)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 1 + [True] * 4])
    with torch.no_grad():
        fast = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()(x, src_key_padding_mask=mask)
        slow = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()(x, src_key_padding_mask=mask)
    keep = ~mask
    torch.testing.assert_close(fast[keep], slow[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [TransformerEncoderLayer, TransformerDecoderLayer])
@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(d_model=True), TypeError, "d_model"),
    (dict(nhead=True), TypeError, "nhead"),
    (dict(nhead=float("nan")), TypeError, "nhead"),
    (dict(nhead=3), ValueError, "nhead"),
    (dict(dim_feedforward=-1), ValueError, "dim_feedforward"),
    (dict(dropout=1.5), ValueError, "dropout"),
    (dict(layer_norm_eps=0.0), ValueError, "layer_norm_eps"),
    (dict(batch_first="yes"), TypeError, "batch_first"),
])
def test_layer_constructor_arguments(cls, kwargs, exc, name):
    args = dict(d_model=D, nhead=2, dim_feedforward=16, num_res_layers=4)
    _raises(exc, name, cls, **{**args, **kwargs})


@pytest.mark.parametrize("bad,exc", [
    (None, TypeError), ([[1.0] * D], TypeError), (torch.ones(2, 3, D, dtype=torch.int64), TypeError),
    (torch.ones(2, 3, D, dtype=torch.float64), TypeError), (torch.ones(D), ValueError),
    (torch.ones(2, 3, D + 1), ValueError), (torch.ones(2, 3, D, device="meta"), ValueError),
], ids=str)
@pytest.mark.parametrize("which", ["src", "tgt", "memory"])
def test_layer_forward_inputs(bad, exc, which):
    good = torch.randn(4, 2, D)
    if which == "src":
        layer = TransformerEncoderLayer(D, 2, 16, 0.0, num_res_layers=4)
        _raises(exc, "src", layer, bad)
    else:
        layer = TransformerDecoderLayer(D, 2, 16, 0.0, num_res_layers=6)
        args = (bad, good) if which == "tgt" else (good, bad)
        _raises(exc, which, layer, *args)


def test_qk_norm_linear_constructed_directly_normalises_each_head():
    """QKNormLinear(in, out) had no qk_norm (an AttributeError on first call); each head's output is now
    LayerNorm-ed: mean 0 and (population) variance 1 per head, the formula written out."""
    proj = QKNormLinear(D, D, heads=2)
    y = proj(torch.randn(5, D)).view(5, 2, D // 2)
    torch.testing.assert_close(y.mean(-1), torch.zeros(5, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(5, 2), atol=1e-3, rtol=0)
    assert has_qk_norm(nn.Module()) is False


@pytest.mark.parametrize("fn,kwargs,exc,name", [
    (QKNormLinear, dict(in_features=-1, out_features=D), ValueError, "in_features"),
    (QKNormLinear, dict(in_features=D, out_features=True), TypeError, "out_features"),
    (QKNormLinear, dict(in_features=D, out_features=D, heads=3), ValueError, "heads"),
    (QKNormMultiheadAttention, dict(embed_dim=True, num_heads=2), TypeError, "embed_dim"),
    (QKNormMultiheadAttention, dict(embed_dim=D, num_heads=float("inf")), TypeError, "num_heads"),
    (QKNormMultiheadAttention, dict(embed_dim=D, num_heads=3), ValueError, "num_heads"),
    (QKNormMultiheadAttention, dict(embed_dim=D, num_heads=2, dropout="0.1"), TypeError, "dropout"),
    (QKNormMultiheadAttention, dict(embed_dim=D, num_heads=2, batch_first=None), TypeError, "batch_first"),
    (has_qk_norm, dict(module=None), TypeError, "module"),
    (DeepNormInit, dict(encoder_alpha="1", encoder_beta=0.5, decoder_alpha=None, decoder_beta=None), TypeError,
     "encoder_alpha"),
    (DeepNormInit, dict(encoder_alpha=1.0, encoder_beta=float("nan"), decoder_alpha=None, decoder_beta=None),
     ValueError, "encoder_beta"),
    (DeepNormInit, dict(encoder_alpha=None, encoder_beta=None, decoder_alpha=True, decoder_beta=0.5), TypeError,
     "decoder_alpha"),
])
def test_constructor_and_predicate_arguments(fn, kwargs, exc, name):
    _raises(exc, name, fn, **kwargs)


@pytest.mark.parametrize("bad,exc", [
    (torch.ones(D, dtype=torch.complex64), TypeError), (torch.ones(D, dtype=torch.bool), TypeError),
    (torch.ones(D, device="meta"), ValueError),
], ids=str)
def test_omega_tensors_that_are_no_omegas_change_nothing(bad, exc):
    res = OmegaResidual(1.5, as_parameter=True, embed_dim=D)
    _raises(exc, "value", res.set_omega_, bad)
    assert torch.equal(res.omega, torch.full((D,), 1.5))
    norm = nn.LayerNorm(D)
    _raises(exc, "omega", fold_into_norm_, norm, bad)
    assert torch.equal(norm.weight, torch.ones(D)) and torch.equal(norm.bias, torch.zeros(D))


def test_output_change_refuses_a_perturbation_that_overflows():
    stack = make_stack("admin", 2, D, heads=2, seed=0)
    _raises(ValueError, "delta_scale", output_change, stack, torch.randn(2, 3, D), delta_scale=1e30, num_samples=1)


@pytest.mark.parametrize("bad,exc", [
    ([1.0] * D, TypeError), (torch.ones(2, D, dtype=torch.int64), TypeError), (torch.ones(2, D + 1), ValueError),
    (torch.ones(2, D, device="meta"), ValueError), (torch.ones(2, D, dtype=torch.float64), TypeError),
], ids=str)
def test_reference_stack_input(bad, exc):
    _raises(exc, "x", make_stack("post_ln", 2, D, heads=2, seed=0), bad)
