"""admin_torch under adversarial use: bad omegas, bad batches, bad profile files, 0.1.0 calls.

Each refusal is a ValueError/TypeError naming the argument, and leaves the model as it was.
"""

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import admin_torch
from admin_torch import (OmegaResidual, apply_omegas, as_module, calculate_init, load_profile, make_stack,
                         output_change, profile_omegas, save_profile)
from admin_torch.profiling import omega_residuals
from peers import require_peer


def omegas_of(model):
    return [m.omega.detach().clone() for _, m in omega_residuals(model)]


@pytest.fixture
def stack():
    return make_stack("admin", depth=3, dim=8, seed=0)


def test_vector_omega_refuses_another_width():
    res = OmegaResidual(2.0, as_parameter=True, embed_dim=8)
    with pytest.raises(ValueError, match="last dimension embed_dim=8"):
        res(torch.randn(3, 4), torch.randn(3, 4))
    one = OmegaResidual(2.0, as_parameter=True, embed_dim=1)
    with pytest.raises(ValueError, match="last dimension embed_dim=1"):
        one(torch.randn(3, 4), torch.randn(3, 4))  # would silently broadcast


def test_integer_activations_are_not_truncated():
    res = as_module(12)  # omega 2.017
    out = res(torch.tensor([1, 2]), torch.tensor([0, 0]))
    assert out.is_floating_point()
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0]) * calculate_init(12))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), torch.tensor([1.0, float("nan")]), "2"])
def test_set_omega_refuses_non_finite_and_keeps_omega(value):
    res = OmegaResidual(2.0, as_parameter=True, embed_dim=2)
    with pytest.raises((ValueError, TypeError)):
        res.set_omega_(value)
    assert torch.equal(res.omega.detach(), torch.full((2,), 2.0))


def test_apply_omegas_validates_everything_first(stack):
    before = omegas_of(stack)
    names = [n for n, _ in omega_residuals(stack)]
    for bad in ({names[0]: 1.5, names[1]: float("nan")}, {names[0]: 1.5, "nope": 2.0}, {names[0]: "x"}, [1.0]):
        with pytest.raises((ValueError, TypeError)):
            apply_omegas(stack, bad)
        assert all(torch.equal(a, b) for a, b in zip(before, omegas_of(stack)))
    apply_omegas(stack, {names[0]: np.float32(1.5)})
    assert omegas_of(stack)[0].item() == 1.5


def test_profile_from_a_nan_batch_changes_nothing(stack):
    before = omegas_of(stack)
    x = torch.randn(2, 5, 8)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite variance"):
        profile_omegas(stack, lambda: stack(x))
    assert all(torch.equal(a, b) for a, b in zip(before, omegas_of(stack)))


def test_profile_whose_batches_raise_midway_changes_nothing(stack):
    before = omegas_of(stack)
    calls = []

    def run():
        stack(torch.randn(2, 5, 8))  # profiles every residual
        calls.append(1)
        raise RuntimeError("data loader died")
    with pytest.raises(RuntimeError, match="data loader died"):
        profile_omegas(stack, run)
    assert calls and all(torch.equal(a, b) for a, b in zip(before, omegas_of(stack)))
    assert all(m._profile_hook is None for _, m in omega_residuals(stack))


@pytest.mark.parametrize("content, match", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "not an admin_torch profile"),
    ('{"format": "admin_torch.profile", "version": 1, "omegas": [1.0]}', "must be a mapping"),
    ('{"format": "admin_torch.profile", "version": 1, "omegas": {"layers.0": "big"}}', r"omegas\['layers.0'\]"),
    ('{"format": "admin_torch.profile", "version": 1, "omegas": {"layers.0": NaN}}', r"omegas\['layers.0'\]"),
])
def test_load_profile_errors_name_the_file_and_the_entry(tmp_path, content, match):
    path = tmp_path / "profile.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_save_profile_is_atomic_and_refuses_nan(tmp_path):
    path = tmp_path / "p.json"
    save_profile({"a": 1.5}, path)
    with pytest.raises(ValueError, match="omegas\\['b'\\]"):
        save_profile({"a": 2.0, "b": float("nan")}, path)
    assert load_profile(path) == {"a": 1.5} and len(list(tmp_path.iterdir())) == 1
    assert json.loads(path.read_text())["format"] == "admin_torch.profile"


def test_output_change_refuses_empty_batch_and_bad_scales(stack):
    with pytest.raises(ValueError, match="empty"):
        output_change(stack, torch.randn(0, 5, 8))
    for scale in (float("inf"), float("nan"), 0, -1e-3):
        with pytest.raises(ValueError, match="delta_scale must be a finite real number > 0"):
            output_change(stack, torch.randn(2, 5, 8), delta_scale=scale)
    assert output_change(stack, torch.randn(2, 5, 8), delta_scale=np.float32(1e-2), num_samples=np.int64(2)) > 0


@given(st.one_of(st.integers(-5, 10 ** 400), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3)),
       st.sampled_from(admin_torch.OUTPUT_CHANGE_SCALES))
def test_calculate_init_property(n, scale):
    """A finite omega >= 1, or ValueError/TypeError naming num_res_layers -- never OverflowError."""
    try:
        omega = calculate_init(n, scale)
    except (ValueError, TypeError) as err:
        assert "num_res_layers" in str(err)
    else:
        assert np.isfinite(omega) and omega >= 1.0




@pytest.mark.parametrize("call", [
    lambda a: a.calculate_init(12),
    lambda a: a.calculate_init(12.0, "O(1)"),
    lambda a: a.calculate_init(np.int64(36), "default"),
    lambda a: a.calculate_init(6, output_change_scale="O(n)"),
    lambda a: a.as_module(12, "default", True, 8).omega,
    lambda a: a.as_module(12, "O(1)").omega,
    lambda a: a.OmegaResidual(2.0, True, 4).omega,
    lambda a: a.OmegaResidual(np.float32(1.5)).omega,
    lambda a: a.as_module(24)(torch.ones(2, 3), torch.ones(2, 3)),
])
def test_every_0_1_0_call_is_accepted_with_its_meaning(call):
    theirs, ours = call(require_peer("admin_torch")), call(admin_torch)
    torch.testing.assert_close(torch.as_tensor(ours, dtype=torch.float32).detach(),
                               torch.as_tensor(theirs, dtype=torch.float32).detach())


def test_0_1_0_as_buffer_and_as_parameter():
    for lib in (require_peer("admin_torch"), admin_torch):
        net = nn.Module()
        lib.as_buffer(net, "w", 12)
        lib.as_parameter(net, "p", 12, 4, "O(1)")
        assert net.w.shape == (1,) and net.p.shape == (4,)


# ---------------------------------------------------------------- make_stack at the edges (issue 21)

@pytest.mark.parametrize("kind", ["admin", "post_ln", "pre_ln", "deepnorm"])
@pytest.mark.parametrize("to_np", [np.int64, np.int32, lambda v: torch.tensor(v)])
def test_make_stack_accepts_numpy_and_tensor_counts(kind, to_np):
    """np.int64(3) is the integer 3: the same weights and outputs as the Python int."""
    ref = make_stack(kind, 3, 16, heads=2, ffn_dim=24, seed=5)
    got = make_stack(kind, to_np(3), to_np(16), heads=to_np(2), ffn_dim=to_np(24), seed=to_np(5))
    assert len(got.sublayers) == len(ref.sublayers) == 6
    assert all(type(v) is int for v in (got.sublayers[1].fc1.out_features, got.sublayers[0].heads))
    for (k, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(ffn_dim=0), ValueError, "ffn_dim must be an integer >= 1, got 0"),
    (dict(ffn_dim=-4), ValueError, "ffn_dim must be an integer >= 1, got -4"),
    (dict(ffn_dim=np.int64(0)), ValueError, "ffn_dim"),
    (dict(ffn_dim=8.0), TypeError, "ffn_dim"),
    (dict(depth=0), ValueError, "depth must be an integer >= 1"),
    (dict(depth=np.int64(-1)), ValueError, "depth"),
    (dict(depth=True), TypeError, "depth"),
    (dict(depth=2.5), TypeError, "depth"),
    (dict(dim=np.float32(8)), TypeError, "dim"),
    (dict(heads=3), ValueError, "heads must divide dim"),
    (dict(kind="postln"), ValueError, "kind must be one of"),
    (dict(sublayers=None), TypeError, "sublayers must be one of"),
    (dict(scale="O(2)"), ValueError, "scale must be one of"),
    (dict(as_parameter="yes"), TypeError, "as_parameter"),
])
def test_make_stack_refuses_bad_arguments_naming_them(kwargs, exc, match):
    args = dict(kind="admin", depth=2, dim=8, heads=2, sublayers="attn_ffn")
    args.update(kwargs)
    state = torch.random.get_rng_state()
    with pytest.raises(exc, match=match):
        make_stack(args.pop("kind"), args.pop("depth"), **args, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is untouched
