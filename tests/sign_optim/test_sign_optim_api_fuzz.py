"""sign_optim's public API under adversarial arguments (each found by a fuzz of every public callable): a bad value
is a TypeError or ValueError naming the argument, never an AttributeError, a RuntimeError from deep inside torch, a
NaN or a silent cast; a refused load changes nothing."""

import copy
import math

import pytest
import torch

from torch_helpers import assert_optimizer_unchanged, optimizer_snapshot
from sign_optim import (AddSign, CosineInternalDecay, LinearInternalDecay, PowerSign, RestartCosineInternalDecay,
                        functional, fused)

OPTIMIZERS = [AddSign, PowerSign]
DECAYS = [LinearInternalDecay, CosineInternalDecay, RestartCosineInternalDecay]
META = torch.zeros((), device="meta")


def trained(cls):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = cls(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return params, opt


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("name", ["lr", "beta", "alpha", "weight_decay"])
def test_meta_tensor_hyper_parameter_is_a_type_error(cls, name):
    """A meta tensor holds no number: refused by name (was torch's RuntimeError from ``.item()``)."""
    with pytest.raises(TypeError, match=f"^{name} must be .*meta"):
        cls([torch.nn.Parameter(torch.randn(2))], **{name: META})


def _tampered(state_dict, avg):
    bad = copy.deepcopy(state_dict)
    bad["state"][0]["exp_avg"] = avg
    return bad


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("avg", [
    torch.randn(3, 4, dtype=torch.complex64),        # the load cast it silently to real (imaginary part lost)
    torch.ones(3, 4, dtype=torch.int64),             # another optimizer's, cast silently
    torch.randn(3, 4, device="meta"),                # NotImplementedError at the load
    torch.randn(3, 4).to_sparse(),                   # accepted, then NotImplementedError inside the step
], ids=["complex", "int64", "meta", "sparse"])
def test_load_state_dict_refuses_an_exp_avg_without_real_dense_data(cls, avg):
    params, opt = trained(cls)
    bad = _tampered(opt.state_dict(), avg)
    snap = optimizer_snapshot(opt, params)
    with pytest.raises(ValueError, match="exp_avg"):
        opt.load_state_dict(bad)
    assert_optimizer_unchanged(snap, opt, params)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_load_state_dict_refuses_a_state_that_is_not_a_dict(cls):
    params, opt = trained(cls)
    bad = opt.state_dict()
    bad["state"] = list(bad["state"].values())
    snap = optimizer_snapshot(opt, params)
    with pytest.raises(TypeError, match=r"state_dict\['state'\] must be a dict"):
        opt.load_state_dict(bad)
    assert_optimizer_unchanged(snap, opt, params)


@pytest.mark.parametrize("decay_cls", DECAYS)
@pytest.mark.parametrize("step", [None, 3, 2.0, [1.0], torch.ones(2), torch.tensor(1 + 1j), torch.tensor(True)],
                         ids=["None", "int", "float", "list", "two", "complex", "bool"])
def test_tensor_value_takes_a_one_element_real_tensor(decay_cls, step):
    with pytest.raises(TypeError, match="^step must be a 1-element real tensor"):
        decay_cls(10).tensor_value(step)


@pytest.mark.parametrize("decay_cls", DECAYS)
def test_tensor_value_agrees_with_the_call(decay_cls):
    decay = decay_cls(10)
    for step in (0, 3, 10, 25):
        assert float(decay.tensor_value(torch.tensor(float(step)))) == pytest.approx(decay(step), abs=1e-12)


@pytest.mark.parametrize("decay_cls", DECAYS)
@pytest.mark.parametrize("step, error", [(float("nan"), ValueError), (-1.0, ValueError), (11.0, ValueError),
                                         ("x", TypeError), (None, TypeError)])
def test_value_checks_its_step(decay_cls, step, error):
    """``value`` is the formula on [0, T_max]: NaN (it returned NaN), a negative or a too large step is refused."""
    with pytest.raises(error, match="^step must be"):
        decay_cls(10).value(step)


@pytest.mark.parametrize("decay_cls", DECAYS)
@pytest.mark.parametrize("state", [None, "linear", 3, [("kind", "linear")]])
def test_decay_load_state_dict_of_a_non_dict_is_a_type_error(decay_cls, state):
    decay = decay_cls(10)
    with pytest.raises(TypeError, match="^state_dict must be a dict"):
        decay.load_state_dict(state)
    assert decay == decay_cls(10)


@pytest.mark.parametrize("rule", [functional.addsign_coefficients, functional.powersign_coefficients])
@pytest.mark.parametrize("arg", ["alpha", "decay"])
@pytest.mark.parametrize("value, error", [(float("nan"), ValueError), (float("inf"), ValueError), ("x", TypeError),
                                          (None, TypeError), (True, TypeError)])
def test_coefficients_refuse_what_is_not_a_finite_number(rule, arg, value, error):
    """They returned NaN or inf coefficients (or, for a string, a bare error from float())."""
    args = {"alpha": 2.0, "decay": 0.5, arg: value}
    with pytest.raises(error, match=f"^{arg} must be"):
        rule(args["alpha"], args["decay"])


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_powersign_coefficients_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match="^alpha must be"):  # was math's "math domain error", naming nothing
        functional.powersign_coefficients(alpha, 1.0)


@pytest.mark.parametrize("decay", [1000.0, 1e308])
def test_powersign_overflow_is_a_value_error_and_an_overflow_error(decay):
    """Beyond float64's range (exp(1000)): still the documented OverflowError, now also the contract's ValueError;
    ``decay * ln(alpha) = inf`` no longer gives ``(1, inf, nan)``."""
    with pytest.raises(ValueError, match="overflows"):
        functional.powersign_coefficients(math.e, decay)
    with pytest.raises(OverflowError):
        functional.powersign_coefficients(math.e, decay)


def _update(**changes):
    p, g, m = torch.ones(3), torch.tensor([1.0, -1.0, 2.0]), torch.zeros(3)
    args = dict(lr=0.1, beta=0.9, weight_decay=0.0, maximize=False, foreach=False)
    args.update(changes)
    functional.sign_update([p], [g], [m], [functional.addsign_coefficients(1.0, 1.0)], **args)
    return p, m


@pytest.mark.parametrize("name, value, error", [
    ("lr", float("nan"), ValueError), ("lr", -1.0, ValueError), ("lr", "x", TypeError), ("lr", META, TypeError),
    ("beta", 1.0, ValueError), ("beta", float("nan"), ValueError), ("beta", None, TypeError),
    ("weight_decay", -1.0, ValueError), ("weight_decay", float("inf"), ValueError),
    ("maximize", "yes", TypeError), ("maximize", None, TypeError),
    ("foreach", "x", TypeError), ("fused", 1, TypeError), ("capturable", "x", TypeError),
    ("found_inf", 0, TypeError), ("found_inf", torch.empty(0), TypeError), ("found_inf", META, TypeError),
    ("chunk_numel", 1.5, TypeError), ("chunk_numel", None, TypeError),
])
def test_sign_update_checks_its_arguments_first(name, value, error):
    """Each was accepted (a NaN or negative lr updated the parameters with it, a truthy string took another route) or
    failed deep inside (AttributeError on found_inf's ``.reshape``): now refused by name, nothing written."""
    p, g, m = torch.ones(3), torch.tensor([1.0, -1.0, 2.0]), torch.zeros(3)
    args = {**dict(lr=0.1, beta=0.9, weight_decay=0.0, maximize=False, foreach=False), name: value}
    with pytest.raises(error, match=f"^{name} must"):
        functional.sign_update([p], [g], [m], [functional.addsign_coefficients(1.0, 1.0)], **args)
    assert torch.equal(p, torch.ones(3)) and torch.equal(m, torch.zeros(3))


@pytest.mark.parametrize("name", ["grads", "avgs", "coefficients"])
def test_sign_update_lists_must_match_params(name):
    lists = dict(params=[torch.ones(3)], grads=[torch.ones(3)], avgs=[torch.zeros(3)],
                 coefficients=[(1.0, 1.0, 0.0)])
    lists[name] = lists[name] * 2
    with pytest.raises(ValueError, match=f"^{name} must have one entry per parameter"):
        functional.sign_update(**lists, lr=0.1, beta=0.9, weight_decay=0.0, maximize=False)
    lists[name] = 5
    with pytest.raises(TypeError, match=f"^{name} must be a list"):
        functional.sign_update(**lists, lr=0.1, beta=0.9, weight_decay=0.0, maximize=False)


def test_sign_update_value_is_unchanged():
    """The checks change no number: the docstring's worked example, by hand (m = 0.1 g, factor 2)."""
    p, _ = _update()
    torch.testing.assert_close(p, torch.tensor([1.0, 1.0, 1.0]) - 0.1 * 2 * torch.tensor([1.0, -1.0, 2.0]))


@pytest.mark.parametrize("params, error", [("x", TypeError), ([1.0], TypeError), (torch.ones(2), TypeError)])
def test_route_takes_a_list_of_tensors(params, error):
    with pytest.raises(error, match="^params must be a list of tensors"):
        functional.route(params)


@pytest.mark.parametrize("flag", ["foreach", "fused", "capturable"])
def test_route_flags_are_bools(flag):
    with pytest.raises(TypeError, match=f"^{flag} must be"):
        functional.route([torch.ones(2)], **{flag: "yes"})


@pytest.mark.parametrize("device, error", [("gpu", ValueError), (-1, ValueError), (None, TypeError),
                                           (1.5, TypeError), (True, TypeError)])
def test_fused_availability_names_a_bad_device(device, error):
    for ask in (fused.available, fused.unavailable_reason):
        with pytest.raises(error, match="^device must be"):
            ask(device)


@pytest.mark.parametrize("blocks, error", [(0, ValueError), (-1, ValueError), (1e30, TypeError), (None, TypeError),
                                           (float("inf"), TypeError)])
def test_parallel_probe_blocks(blocks, error):
    with pytest.raises(error, match="^blocks must be"):
        fused.parallel_probe(blocks)


@pytest.mark.parametrize("name, value, error", [("lr", float("nan"), ValueError), ("lr", "x", TypeError),
                                                ("weight_decay", -1.0, ValueError), ("lr", META, TypeError)])
def test_kernel_coefficients_checks_lr_and_weight_decay(name, value, error):
    args = {**dict(lr=0.1, weight_decay=0.0), name: value}
    with pytest.raises(error, match=f"^{name} must be"):
        fused.kernel_coefficients([(1.0, 1.0, 0.0)], **args)


@pytest.mark.parametrize("dtype", [None, "float32", float])
def test_state_dtype_takes_a_dtype(dtype):
    with pytest.raises(TypeError, match="^dtype must be a torch.dtype"):
        fused.state_dtype(dtype)
