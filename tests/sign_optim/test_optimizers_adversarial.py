"""sign_optim under adversarial use: foreign and corrupted state dicts, hyper-parameters changed after
construction, random decay settings. A refused call leaves parameters and state exactly as they were."""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torch_helpers import assert_optimizer_unchanged, optimizer_snapshot
from sign_optim import AddSign, PowerSign, make_internal_decay

OPTIMIZERS = [AddSign, PowerSign]


def trained(cls, shapes=((3, 4), (5,)), steps=2, **kwargs):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = cls(params, lr=1e-2, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_adam_state_dict_is_refused(cls):
    params, opt = trained(cls)
    adam = torch.optim.Adam(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    adam.step()
    snap = optimizer_snapshot(opt, params)
    with pytest.raises(ValueError, match="not a valid .* group|another optimizer"):
        opt.load_state_dict(adam.state_dict())
    assert_optimizer_unchanged(snap, opt, params)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_state_of_other_shapes_or_counts_is_refused(cls):
    params, opt = trained(cls)
    _, other_shapes = trained(cls, shapes=((4, 3), (5,)))
    _, other_count = trained(cls, shapes=((3, 4),))
    snap = optimizer_snapshot(opt, params)
    with pytest.raises(ValueError, match=r"exp_avg of parameter 0 has shape \(4, 3\)"):
        opt.load_state_dict(other_shapes.state_dict())
    with pytest.raises(ValueError, match="parameters"):
        opt.load_state_dict(other_count.state_dict())
    with pytest.raises(TypeError, match="state_dict must be"):
        opt.load_state_dict({"state": {}})
    assert_optimizer_unchanged(snap, opt, params)


@pytest.mark.parametrize("cls", OPTIMIZERS)
@given(key=st.sampled_from(["step", "exp_avg", "extra", "lr", "beta"]), data=st.data())
def test_corrupted_state_dicts_are_refused_and_change_nothing(cls, key, data):
    params, opt = trained(cls)
    snap = optimizer_snapshot(opt, params)
    bad = copy.deepcopy(opt.state_dict())
    if key == "step":
        bad["state"][0]["step"] = data.draw(st.sampled_from([-1, 1.5, "3", None]))
    elif key == "exp_avg":
        bad["state"][0]["exp_avg"] = data.draw(st.sampled_from([torch.zeros(2), None, 0.0]))
    elif key == "extra":
        bad["state"][1]["exp_avg_sq"] = torch.zeros(5)
    else:
        bad["param_groups"][0][key] = data.draw(st.sampled_from([float("nan"), -1.0, "x", 2.0 if key == "beta" else -2.0]))
    with pytest.raises((ValueError, TypeError)):
        opt.load_state_dict(bad)
    assert_optimizer_unchanged(snap, opt, params)


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("key, value", [("lr", float("nan")), ("lr", float("inf")), ("lr", -1.0),
                                        ("beta", 1.0), ("weight_decay", float("nan")), ("alpha", float("nan"))])
def test_bad_hyper_parameter_set_after_construction_refuses_the_step(cls, key, value):
    """A scheduler can write a NaN lr into the param group: the step refuses instead of NaN weights."""
    params, opt = trained(cls)
    snap = optimizer_snapshot(opt, params)
    opt.param_groups[0][key] = value
    for p in params:
        p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match=key):
        opt.step()
    opt.param_groups[0][key] = snap["groups"][0][key]
    assert_optimizer_unchanged(snap, opt, params)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_failed_step_does_not_advance_the_counter(cls):
    """The second group fails its checks after the first passed: neither group is updated."""
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))]
    opt = cls([{"params": [params[0]]}, {"params": [params[1]]}], lr=1e-2)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    snap = optimizer_snapshot(opt, params)
    opt.param_groups[1]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr must be"):
        opt.step()
    opt.param_groups[1]["lr"] = 1e-2
    assert_optimizer_unchanged(snap, opt, params)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_add_param_group_refused_adds_nothing(cls):
    params, opt = trained(cls)
    with pytest.raises(ValueError, match="beta"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "beta": 1.5})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_numpy_hyper_parameters_are_numbers(cls):
    p = torch.nn.Parameter(torch.ones(3))
    opt = cls([p], lr=np.float64(0.1), beta=np.float32(0.5))
    p.grad = torch.ones(3)
    opt.step()
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), torch.ones(3))


@given(kind=st.sampled_from(["none", "linear", "cosine", "restart", "exp", None, 3]),
       T=st.one_of(st.integers(-2, 10 ** 6), st.floats(allow_nan=True)),
       periods=st.one_of(st.none(), st.floats(-1, 10), st.just(float("nan"))),
       zero_after=st.one_of(st.none(), st.floats(-1, 10)))
def test_decay_settings_property(kind, T, periods, zero_after):
    """A decay whose values lie in [0, 1] at every step, or ValueError/TypeError naming the argument."""
    try:
        decay = make_internal_decay(kind, T, periods, zero_after)
    except (ValueError, TypeError) as err:
        assert any(name in str(err) for name in ("kind", "T_max", "num_periods", "zero_after"))
        return
    if decay is None:
        assert kind in ("none", None)
        return
    assert kind != "linear" or (periods is None and zero_after is None)
    for step in (0, 1, T / 2, T, 2 * T, 10 ** 9):
        value = decay(step)
        assert 0.0 <= value <= 1.0 and math.isfinite(value)


def test_linear_decay_refuses_periods():
    with pytest.raises(ValueError, match="num_periods is not accepted by the linear decay"):
        make_internal_decay("linear", 100, num_periods=2)
