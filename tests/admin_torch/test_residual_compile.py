"""Admin residuals and the reference stack compile with torch.compile(fullgraph=True), same outputs."""

import pytest
import torch

import admin_torch
from admin_torch.reference_stack import STACK_KINDS


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("make", [
    lambda: admin_torch.as_module(12),
    lambda: admin_torch.as_module(12, as_parameter=True, embed_dim=8),
    lambda: admin_torch.DeepNormResidual(admin_torch.deepnorm_init(6).encoder_alpha),
])
def test_residuals_compile_fully(make):
    res = make()
    x, fx = torch.randn(3, 5, 8, requires_grad=True), torch.randn(3, 5, 8)
    out = torch.compile(res, fullgraph=True, backend="aot_eager")(x, fx)
    torch.testing.assert_close(out, res(x, fx))
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("kind", STACK_KINDS)
def test_reference_stacks_compile_fully(kind):
    model = admin_torch.make_stack(kind, depth=2, dim=8, seed=0).eval()
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), model(x))
