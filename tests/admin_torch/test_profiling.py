"""Profiled Admin against a hand computation of Transformer-Clinic's rule."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from admin_torch import OmegaResidual, apply_omegas, load_profile, make_stack, profile_omegas, save_profile


def hand_profile(model, x):
    """Transformer-Clinic's adaptive profiling written out with numpy: v = 1; per sublayer in
    order: omega = v; v = sqrt(np.var(x * omega) + np.var(f(x))), the stream using that omega."""
    omegas = []
    v = 1.0
    with torch.no_grad():
        h = model.input_norm(x)
        for f, ln in zip(model.sublayers, model.norms):
            omega = v
            fx = f(h)
            v = math.sqrt(np.var((h * omega).double().numpy().ravel()) + np.var(fx.double().numpy().ravel()))
            omegas.append(omega)
            h = ln(h * omega + fx)
    return omegas, h


@pytest.mark.parametrize("sublayers", ["ffn", "attn_ffn"])
@pytest.mark.parametrize("param", [False, True])
def test_matches_hand_computation(sublayers, param):
    model = make_stack("admin", 3, 16, sublayers=sublayers, as_parameter=param, seed=1)
    x = torch.randn(4, 7, 16)
    expected, expected_out = hand_profile(model, x)
    out = {}
    omegas = profile_omegas(model, lambda: out.setdefault("y", model(x)))
    names = [f"residuals.{i}" for i in range(len(model.sublayers))]
    assert list(omegas) == names  # call order
    assert [omegas[n] for n in names] == pytest.approx(expected, rel=1e-6)
    assert omegas[names[0]] == 1.0 and all(b > a for a, b in zip(expected, expected[1:]))
    # each omega was set inside the same forward pass: the output is the profiled model's output
    torch.testing.assert_close(out["y"], expected_out, rtol=1e-5, atol=1e-5)
    for n, r in zip(names, model.residuals):
        assert torch.allclose(r.omega, torch.full_like(r.omega, expected[names.index(n)]))
        assert r._profile_hook is None


def test_rule_is_running_sum_of_variances():
    # identity-like f with known variance: f(x) = c * x on a LayerNorm-ed stream, Var f = c^2
    class Scaled(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c
            self.res = OmegaResidual(1.0)
            self.ln = nn.LayerNorm(32, elementwise_affine=False)

        def forward(self, h):
            return self.ln(self.res(h, self.c * h))

    cs = [0.5, 1.0, 2.0, 0.3]
    model = nn.Sequential(*(Scaled(c) for c in cs))
    x = nn.functional.layer_norm(torch.randn(64, 32), (32,))
    omegas = list(profile_omegas(model, lambda: model(x)).values())
    # Var(x * omega) = omega^2 exactly on a LayerNorm-ed stream, so omega_i^2 = 1 + sum_{j<i} c_j^2
    expected = [math.sqrt(1 + sum(c * c for c in cs[:i])) for i in range(len(cs))]
    assert omegas == pytest.approx(expected, rel=1e-4)


def test_separate_chains_and_first_call_only():
    enc, dec = make_stack("admin", 2, 8, sublayers="ffn", seed=0), make_stack("admin", 2, 8, sublayers="ffn", seed=1)
    model = nn.ModuleDict({"encoder": enc, "decoder": dec})
    x = torch.randn(3, 4, 8)

    def run():
        for _ in range(2):  # the second pass must not re-measure
            dec(enc(x))

    omegas = profile_omegas(model, run, chains=[model["encoder"], "decoder"])
    assert list(omegas) == ["encoder.residuals.0", "encoder.residuals.1", "decoder.residuals.0", "decoder.residuals.1"]
    assert omegas["encoder.residuals.0"] == 1.0 and omegas["decoder.residuals.0"] == 1.0
    enc2, dec2 = make_stack("admin", 2, 8, sublayers="ffn", seed=0), make_stack("admin", 2, 8, sublayers="ffn", seed=1)
    exp_enc, h = hand_profile(enc2, x)
    exp_dec, _ = hand_profile(dec2, h)
    assert [omegas[f"encoder.residuals.{i}"] for i in range(2)] == pytest.approx(exp_enc, rel=1e-6)
    assert [omegas[f"decoder.residuals.{i}"] for i in range(2)] == pytest.approx(exp_dec, rel=1e-6)


def test_save_load_apply(tmp_path):
    model = make_stack("admin", 3, 16, seed=2)
    x = torch.randn(2, 5, 16)
    omegas = profile_omegas(model, lambda: model(x))
    save_profile(omegas, tmp_path / "p.json")
    loaded = load_profile(tmp_path / "p.json")
    assert loaded == omegas and list(loaded) == list(omegas)
    fresh = make_stack("admin", 3, 16, seed=2)
    apply_omegas(fresh, loaded)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="OmegaResidual"):
        profile_omegas(nn.Linear(2, 2), lambda: None)
    model = make_stack("admin", 1, 8)
    with pytest.raises(TypeError, match="run_batches"):
        profile_omegas(model, None)
    with pytest.raises(ValueError, match="called none"):
        profile_omegas(model, lambda: None)
    with pytest.raises(ValueError, match="chains"):
        profile_omegas(model, lambda: None, chains=["nothing"])
    with pytest.raises(ValueError, match="omegas"):
        apply_omegas(model, {"nope": 2.0})
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="profile"):
        load_profile(tmp_path / "bad.json")
