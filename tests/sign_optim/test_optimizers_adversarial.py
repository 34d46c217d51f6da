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


# ---------------------------------------------------------------- state dicts between rules, retries, aliasing
PATHS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "single": dict(foreach=False, fused=False)}


@pytest.mark.parametrize("source, target", [(AddSign, PowerSign), (PowerSign, AddSign)])
def test_a_state_dict_loads_only_into_its_own_rule(source, target):
    """An AddSign state (alpha 1) in a PowerSign would make it plain SGD (ln 1 = 0): refused, nothing changed;
    the same rule loads it, and an older state dict that does not name its rule still loads."""
    _, saved = trained(source)
    params, opt = trained(target)
    snap = optimizer_snapshot(opt, params)
    with pytest.raises(ValueError, match=rf"state of a '{source.rule}' optimizer.*this is {target.__name__}"):
        opt.load_state_dict(saved.state_dict())
    assert_optimizer_unchanged(snap, opt, params)
    assert saved.state_dict()["sign_rule"] == source.rule
    older = {k: v for k, v in saved.state_dict().items() if k != "sign_rule"}
    _, same = trained(source)
    same.load_state_dict(older)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_refused_step_leaves_scaled_gradients_alone_and_the_retry_divides_once(path):
    """torch's fused-optimizer protocol: grad_scale divides the gradients, but only once the step's checks pass;
    a step refused first (here a state of the wrong shape) and retried after the fix divides them once."""
    params, opt = trained(AddSign, **PATHS[path])
    reference, ref_opt = trained(AddSign, **PATHS[path])
    grads = [torch.randn_like(p) for p in params]
    for p, q, g in zip(params, reference, grads):
        p.grad, q.grad = g * 8.0, g.clone()
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    good = opt.state[params[0]]["exp_avg"]
    opt.state[params[0]]["exp_avg"] = torch.zeros(7)
    with pytest.raises(ValueError, match="exp_avg"):
        opt.step()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g * 8.0)  # not divided by the refused step
    opt.state[params[0]]["exp_avg"] = good
    opt.step()
    ref_opt.step()
    for p, q in zip(params, reference):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("attr, value, error", [
    ("grad_scale", 8.0, TypeError), ("grad_scale", torch.ones(2), TypeError),
    ("grad_scale", torch.tensor(8), TypeError), ("found_inf", 1.0, TypeError), ("found_inf", torch.ones(3), TypeError),
])
def test_gradient_scaler_attributes_of_the_wrong_kind_are_refused(attr, value, error):
    params, opt = trained(AddSign)
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in params]
    setattr(opt, attr, value)
    snap = optimizer_snapshot(opt, params)
    with pytest.raises(error, match=attr):
        opt.step()
    assert_optimizer_unchanged(snap, opt, params)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_a_parameter_listed_twice_in_a_group_is_refused():
    """torch.optim warns that this "will cause an error" in future; here it is one (the paths would differ)."""
    w = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="params: the parameter at position 1 is listed twice"):
        AddSign([w, w])
    opt = AddSign([torch.nn.Parameter(torch.randn(2))])
    with pytest.raises(ValueError, match="listed twice"):
        opt.add_param_group({"params": [w, w]})
    assert len(opt.param_groups) == 1


def _aliased_step(case, cls, path):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = cls(params, lr=0.1, **PATHS[path])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    if case == "gradient is a view of its parameter":
        params[0].grad = params[0].detach().view(12).view(4, 3)
    elif case == "parameter listed twice (group surgery)":
        opt.param_groups[0]["params"].append(params[1])
    elif case == "average is its parameter":
        opt.state[params[1]]["exp_avg"] = params[1].detach()
    elif case == "gradient overlaps another parameter":
        params[1].grad = params[0].detach().view(-1)[:5]
    return params, opt


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", ["gradient is a view of its parameter", "parameter listed twice (group surgery)",
                                  "average is its parameter", "gradient overlaps another parameter"])
def test_memory_shared_with_what_a_step_writes_is_refused_on_every_path(cls, path, case):
    """Each path would read and write shared memory in its own order (different answers): every path refuses,
    naming both tensors, and changes nothing."""
    params, opt = _aliased_step(case, cls, path)
    snap = optimizer_snapshot(opt, params)
    grads = [p.grad.clone() for p in params]
    with pytest.raises(ValueError, match=r"in param group 0, the (\w+ )*parameter \d shares memory with the (\w+ )*parameter \d"):
        opt.step()
    assert_optimizer_unchanged(snap, opt, params)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_interleaved_views_of_one_tensor_are_separate_parameters():
    """Two columns of one matrix share a storage but no element: not an overlap, every path steps them."""
    base = torch.randn(6, 2)
    before = base.clone()
    a, b = torch.nn.Parameter(base[:, 0]), torch.nn.Parameter(base[:, 1])
    opt = AddSign([a, b], lr=0.1)  # lr (alpha + sign(g) sign(m)) |g| = 0.2 at the first step
    a.grad, b.grad = torch.ones(6), -torch.ones(6)
    opt.step()
    assert torch.allclose(base, before + torch.tensor([-0.2, 0.2]))


def test_the_base_class_has_no_rule():
    from sign_optim import SignOptimizer

    with pytest.raises(TypeError, match="SignOptimizer gives no rule"):
        SignOptimizer([torch.nn.Parameter(torch.ones(2))], {"lr": 0.1}, None)


class _DeviceFlag(torch.Tensor):
    """A found_inf that fails a test if the step reads it on the host (a host-device sync on an accelerator)."""

    def __bool__(self):
        raise AssertionError("found_inf was read on the host (bool)")

    def item(self):
        raise AssertionError("found_inf was read on the host (item)")

    def tolist(self):
        raise AssertionError("found_inf was read on the host (tolist)")

    def __float__(self):
        raise AssertionError("found_inf was read on the host (float)")


def _flag(value: float) -> torch.Tensor:
    return torch.tensor(value).as_subclass(_DeviceFlag)


@pytest.mark.parametrize("cls", [AddSign, PowerSign])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("scaled", [False, True])
def test_found_inf_skips_on_the_device_without_a_host_read(cls, path, scaled):
    """torch's fused protocol, decided as a tensor: found_inf set changes nothing (parameters, moving averages,
    counters, and the gradients are not unscaled), found_inf 0 is the plain step (against an optimizer without
    the flag); neither reads the flag on the host (bool/item/float raise)."""
    decay = make_internal_decay("linear", 10)
    params, opt = trained(cls, sign_internal_decay=decay, **PATHS[path])
    reference, ref_opt = trained(cls, sign_internal_decay=decay, **PATHS[path])
    grads = [torch.randn_like(p) for p in params]
    for p, q, g in zip(params, reference, grads):
        p.grad, q.grad = g * (8.0 if scaled else 1.0), g.clone()
    if scaled:
        opt.grad_scale = torch.tensor(8.0)
    scaled_grads = [p.grad.clone() for p in params]
    snap = optimizer_snapshot(opt, params)
    opt.found_inf = _flag(1.0)
    opt.step()
    assert_optimizer_unchanged(snap, opt, params)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, scaled_grads))
    opt.found_inf = _flag(0.0)
    opt.step()
    ref_opt.step()
    for p, q in zip(params, reference):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"], rtol=0, atol=0)
        assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"]) == 3.0


@pytest.mark.parametrize("path", list(PATHS))
def test_a_skipped_first_step_leaves_a_fresh_state(path):
    """A first step skipped by found_inf creates the state at step 0 with a zero average: the next step is a fresh
    optimizer's first step, exactly."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, reference):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt, ref_opt = AddSign(params, lr=0.1, **PATHS[path]), AddSign(reference, lr=0.1, **PATHS[path])
    opt.found_inf = _flag(1.0)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, reference))
    opt.found_inf = None
    opt.step()
    ref_opt.step()
    for p, q in zip(params, reference):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        assert float(opt.state[p]["step"]) == 1.0
