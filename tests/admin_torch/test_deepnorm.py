"""DeepNorm constants against hand-evaluated DeepNet anchors, the init scaling, the residual module."""

import io

import pytest
import torch
from torch import nn

from admin_torch import DeepNormResidual, deepnorm_init, deepnorm_scale_


# Anchors: DeepNet's constants evaluated by hand, not by the formula (e.g. N = 18: (2N)^(1/4) = sqrt(6),
# (8N)^(-1/4) = 1/sqrt(12); 12L decoder of 60L-12L: (3M)^(1/4) = sqrt(6), (12M)^(-1/4) = 1/sqrt(12)).
@pytest.mark.parametrize("n,alpha,beta", [(1, 1.1892, 0.5946), (6, 1.8612, 0.3799), (18, 2.4495, 0.2887),
                                          (100, 3.7606, 0.1880)])
def test_encoder_only(n, alpha, beta):
    c = deepnorm_init(num_encoder_layers=n)
    assert (c.encoder_alpha, c.encoder_beta) == pytest.approx((alpha, beta), abs=1e-4)
    assert c.decoder_alpha is None and c.decoder_beta is None


@pytest.mark.parametrize("m,alpha,beta", [(1, 1.1892, 0.5946), (6, 1.8612, 0.3799), (18, 2.4495, 0.2887),
                                          (100, 3.7606, 0.1880)])
def test_decoder_only(m, alpha, beta):
    c = deepnorm_init(num_decoder_layers=m)
    assert (c.decoder_alpha, c.decoder_beta) == pytest.approx((alpha, beta), abs=1e-4)
    assert c.encoder_alpha is None and c.encoder_beta is None


@pytest.mark.parametrize("n,m,anchors", [(18, 18, (1.9987, 0.3526, 2.7108, 0.2608)),
                                         (60, 12, (2.6331, 0.2676, 2.4495, 0.2887)),
                                         (100, 100, (3.4157, 0.2063, 4.1618, 0.1699))])
def test_encoder_decoder(n, m, anchors):
    c = deepnorm_init(n, m)
    assert (c.encoder_alpha, c.encoder_beta, c.decoder_alpha, c.decoder_beta) == pytest.approx(anchors, abs=1e-4)


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
