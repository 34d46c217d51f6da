"""Folding omega into a plain Post-LN network: the building blocks and the end-to-end equality."""

import pytest
import torch
from torch import nn

from admin_torch import AddResidual, OmegaResidual, fold, fold_into_embedding_, fold_into_linears_, fold_into_norm_, make_stack


def randomize_(model, param):
    """Random non-trivial omegas (scalar or per feature) and LayerNorm affine parameters."""
    with torch.no_grad():
        for r in model.residuals:
            r.set_omega_(torch.rand(r.omega.shape) * 4 + 0.3)
            if param:  # some negative features too: folding is exact for any non-zero omega
                r.omega[0] = -r.omega[0]
        for ln in [model.input_norm, *model.norms]:
            ln.weight.normal_(1.0, 0.5)
            ln.bias.normal_(0.0, 0.5)
        for f in model.sublayers:
            for lin in f.modules():
                if isinstance(lin, nn.Linear):
                    lin.bias.normal_(0.0, 0.1)


@pytest.mark.parametrize("sublayers", ["ffn", "attn_ffn"])
@pytest.mark.parametrize("param", [False, True])
@pytest.mark.parametrize("scale", ["O(logn)", "O(1)"])
def test_fold_equals_admin(sublayers, param, scale):
    model = make_stack("admin", 6, 32, scale=scale, sublayers=sublayers, as_parameter=param, seed=3)
    randomize_(model, param)
    x = torch.randn(3, 9, 32) * 2 + 0.5
    folded = fold(model)
    assert folded.kind == "post_ln"
    assert all(isinstance(r, AddResidual) for r in folded.residuals)
    assert not any(isinstance(m, OmegaResidual) for m in folded.modules())
    assert any(isinstance(m, OmegaResidual) for m in model.modules())  # the original is untouched
    with torch.no_grad():
        diff = (model(x) - folded(x)).abs().max().item()
    assert diff <= 1e-5


def test_fold_is_plain_post_ln():
    # the folded network is make_stack('post_ln') with the folded weights: load them into one
    model = make_stack("admin", 4, 16, seed=0)
    randomize_(model, False)
    folded = fold(model)
    plain = make_stack("post_ln", 4, 16)
    plain.load_state_dict(folded.state_dict())
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert (plain(x) - model(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("omega", [2.5, torch.tensor([0.7]), "vector"])
def test_norm_and_linear_blocks(omega):
    dim = 6
    if omega == "vector":
        omega = torch.rand(dim) * 3 + 0.2
    ln, lin = nn.LayerNorm(dim), nn.Linear(dim, 4)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(5, dim)
    with torch.no_grad():
        ref_norm = ln(x)
        ref_lin = lin(ref_norm)
        fold_into_norm_(ln, omega)
        fold_into_linears_([lin], omega)
        w = torch.as_tensor(omega, dtype=torch.float32)
        torch.testing.assert_close(ln(x), ref_norm * w, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lin(ln(x)), ref_lin, rtol=1e-5, atol=1e-5)


def test_fold_from_residual_module():
    res = OmegaResidual(3.0)
    lin = nn.Linear(4, 2)
    before = lin.weight.detach().clone()
    fold_into_linears_(lin, res)
    torch.testing.assert_close(lin.weight.detach(), before / 3.0)


@pytest.mark.parametrize("vector", [False, True])
def test_embedding_block(vector):
    emb = nn.Embedding(10, 6, padding_idx=0)
    omega = torch.rand(6) + 0.5 if vector else 1.7
    idx = torch.tensor([[0, 3, 9]])
    ref = emb(idx).detach() * torch.as_tensor(omega)
    fold_into_embedding_(emb, omega)
    torch.testing.assert_close(emb(idx).detach(), ref)
    table = torch.randn(10, 6)
    ref = table * torch.as_tensor(omega)
    fold_into_embedding_(table, omega)
    torch.testing.assert_close(table, ref)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: fold_into_norm_(nn.LayerNorm(4), 0.0), ValueError, "non-zero"),
        (lambda: fold_into_norm_(nn.LayerNorm(4), torch.ones(3)), ValueError, "1 or 4"),
        (lambda: fold_into_norm_(nn.LayerNorm(4, elementwise_affine=False), 2.0), TypeError, "affine"),
        (lambda: fold_into_linears_([nn.Linear(4, 2)], "2"), TypeError, "omega"),
        (lambda: fold_into_linears_([nn.ReLU()], 2.0), TypeError, "linears"),
        (lambda: fold_into_embedding_(torch.ones(4), 2.0), TypeError, "embedding"),
        (lambda: fold(make_stack("post_ln", 2, 8)), TypeError, "admin"),
        (lambda: fold(nn.Linear(2, 2)), ValueError, "no Admin layer"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
