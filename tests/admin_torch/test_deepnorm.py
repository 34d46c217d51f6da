"""DeepNorm constants against the DeepNet formulas written out, the init scaling, the residual module."""

import io

import pytest
import torch
from torch import nn

from admin_torch import DeepNormResidual, deepnorm_init, deepnorm_scale_


@pytest.mark.parametrize("n", [1, 6, 18, 100])
def test_encoder_only(n):
    c = deepnorm_init(num_encoder_layers=n)
    assert c.encoder_alpha == pytest.approx((2 * n) ** 0.25)
    assert c.encoder_beta == pytest.approx((8 * n) ** -0.25)
    assert c.decoder_alpha is None and c.decoder_beta is None


@pytest.mark.parametrize("m", [1, 6, 12, 100])
def test_decoder_only(m):
    c = deepnorm_init(num_decoder_layers=m)
    assert c.decoder_alpha == pytest.approx((2 * m) ** 0.25)
    assert c.decoder_beta == pytest.approx((8 * m) ** -0.25)
    assert c.encoder_alpha is None and c.encoder_beta is None


@pytest.mark.parametrize("n,m", [(6, 6), (18, 18), (60, 12), (100, 100)])
def test_encoder_decoder(n, m):
    c = deepnorm_init(n, m)
    assert c.encoder_alpha == pytest.approx(0.81 * (n ** 4 * m) ** (1 / 16))
    assert c.encoder_beta == pytest.approx(0.87 * (n ** 4 * m) ** (-1 / 16))
    assert c.decoder_alpha == pytest.approx((3 * m) ** 0.25)
    assert c.decoder_beta == pytest.approx((12 * m) ** -0.25)


def test_numbers_6_6():
    # 6L-6L: (6^5)^(1/16) = 6^0.3125 = 1.75090
    c = deepnorm_init(6, 6)
    assert c.encoder_alpha == pytest.approx(1.4179, abs=1e-4)
    assert c.encoder_beta == pytest.approx(0.4969, abs=1e-4)
    assert c.decoder_alpha == pytest.approx(2.0598, abs=1e-4)
    assert c.decoder_beta == pytest.approx(0.3433, abs=1e-4)


def test_frozen():
    c = deepnorm_init(6)
    with pytest.raises(Exception):
        c.encoder_alpha = 1.0


@pytest.mark.parametrize(
    "kwargs,exc",
    [(dict(), ValueError), (dict(num_encoder_layers=-1), ValueError), (dict(num_encoder_layers=2.0), TypeError),
     (dict(num_decoder_layers=True), TypeError)],
)
def test_bad_layers(kwargs, exc):
    with pytest.raises(exc, match="num_"):
        deepnorm_init(**kwargs)


def test_xavier_normal_gain_beta():
    w = torch.empty(512, 256)
    beta = deepnorm_init(12).encoder_beta
    deepnorm_scale_([w], beta)
    expected_std = beta * (2 / (512 + 256)) ** 0.5
    assert w.std().item() == pytest.approx(expected_std, rel=0.02)
    assert abs(w.mean().item()) < 0.05 * expected_std


def test_scale_mode_multiplies():
    fc = nn.Linear(8, 4)
    before = fc.weight.detach().clone()
    deepnorm_scale_([fc], 0.5, mode="scale")
    torch.testing.assert_close(fc.weight.detach(), before * 0.5, rtol=0, atol=0)


@pytest.mark.parametrize("beta,exc", [(0.0, ValueError), (-1.0, ValueError), ("a", TypeError)])
def test_bad_beta(beta, exc):
    with pytest.raises(exc, match="beta"):
        deepnorm_scale_([torch.empty(2, 2)], beta)


def test_bad_mode_and_weights():
    with pytest.raises(ValueError, match="mode"):
        deepnorm_scale_([torch.empty(2, 2)], 0.5, mode="uniform")
    with pytest.raises(TypeError, match="linear_weights"):
        deepnorm_scale_([torch.empty(3)], 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_residual_dtype_and_value(dtype):
    alpha = deepnorm_init(6).encoder_alpha
    res = DeepNormResidual(alpha).to(dtype)
    x, f = torch.randn(3, 4, dtype=dtype), torch.randn(3, 4, dtype=dtype)
    y = res(x, f)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), alpha * x.double() + f.double(), rtol=1e-2, atol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = nn.Linear(4, 4)(torch.randn(2, 4))
        assert DeepNormResidual(alpha)(h, h).dtype == torch.bfloat16


def test_residual_state_dict():
    src, dst = DeepNormResidual(2.5), DeepNormResidual(1.0)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst.load_state_dict(torch.load(buf, weights_only=True))
    assert dst.alpha.item() == 2.5
