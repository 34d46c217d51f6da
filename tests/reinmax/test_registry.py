"""Picking an estimator by name (`reinmax.registry`): `ESTIMATORS`, `estimate` and the checks the layers use at
construction. Dispatch is checked against calling each public function directly with the same generator seed
(forward values and gradients), options against their own effect, refusals by the names and values they give."""

import pytest
import torch

import reinmax
from reinmax import ESTIMATORS, estimate
from reinmax.registry import check_estimator_name, check_estimator_options

NAMES = ["gapped_straight_through", "gumbel_rao", "gumbel_softmax", "reinmax", "straight_through"]
NAME_LIST = r"\['gapped_straight_through', 'gumbel_rao', 'gumbel_softmax', 'reinmax', 'straight_through'\]"
OPTIONS = {"gapped_straight_through": dict(gap=2.0), "gumbel_rao": dict(k=3)}


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def outputs_and_gradient(call, logits):
    """``(y_hard, y_soft, d loss / d logits)`` of ``call(logits)`` for a fixed random loss of both outputs."""
    x = logits.clone().requires_grad_()
    y_hard, y_soft = call(x)
    g = torch.randn(x.shape, generator=seeded(99), dtype=x.dtype)
    ((y_hard * g).sum() + (y_soft * g.flip(-1)).sum()).backward()
    return y_hard.detach(), y_soft.detach(), x.grad


def test_the_registry_holds_the_public_estimators_read_only():
    assert sorted(ESTIMATORS) == NAMES
    for name in NAMES:
        assert ESTIMATORS[name] is getattr(reinmax, name)
    with pytest.raises(TypeError):
        ESTIMATORS["mine"] = reinmax.reinmax
    assert sorted(ESTIMATORS) == NAMES


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dim", [-1, 0])
def test_estimate_is_the_named_function(name, dim):
    logits = torch.randn(5, 4, dtype=torch.float64)
    options = OPTIONS.get(name, {})
    by_name = outputs_and_gradient(lambda x: estimate(name, x, 1.3, dim, seeded(1), **options), logits)
    direct = outputs_and_gradient(lambda x: getattr(reinmax, name)(x, 1.3, dim=dim, generator=seeded(1), **options),
                                  logits)
    for a, b in zip(by_name, direct):
        assert torch.equal(a, b)
    assert torch.equal(by_name[0].sum(dim), torch.ones(4 if dim == 0 else 5, dtype=torch.float64))


@pytest.mark.parametrize("name, option, values", [("gapped_straight_through", "gap", (0.0, 2.0)),
                                                  ("gumbel_rao", "k", (1, 8))])
def test_options_reach_the_estimator(name, option, values):
    """Each option value gives what the function gives with it, and the two values give different gradients."""
    logits = torch.randn(6, 5, dtype=torch.float64) * 2
    grads = []
    for value in values:
        _, _, by_name = outputs_and_gradient(lambda x: estimate(name, x, 0.8, generator=seeded(2), **{option: value}),
                                             logits)
        _, _, direct = outputs_and_gradient(
            lambda x: getattr(reinmax, name)(x, 0.8, generator=seeded(2), **{option: value}), logits)
        assert torch.equal(by_name, direct)
        grads.append(by_name)
    assert not torch.allclose(*grads)


def test_estimate_unknown_name_and_option():
    with pytest.raises(ValueError, match="gumbel_softmax"):
        estimate("rein-max", torch.randn(2, 3), 1.0)
    with pytest.raises(TypeError):
        estimate("reinmax", torch.randn(2, 3), 1.0, gap=1.0)
    assert {"reinmax", "straight_through", "gumbel_softmax", "gapped_straight_through",
            "gumbel_rao"} <= set(ESTIMATORS)


@pytest.mark.parametrize("name, error, shown", [("rein-max", ValueError, "'rein-max'"),
                                                ("ReinMax", ValueError, "'ReinMax'"),
                                                (None, TypeError, r"None \(NoneType\)"), (3, TypeError, r"3 \(int\)")])
def test_an_unknown_name_is_refused_naming_the_accepted_ones(name, error, shown):
    with pytest.raises(error, match=rf"^name must be one of {NAME_LIST}, got {shown}$"):
        estimate(name, torch.randn(2, 3), 1.0)
    with pytest.raises(error, match=rf"^estimator must be one of {NAME_LIST}, got {shown}$"):
        check_estimator_name(name, "estimator")


@pytest.mark.parametrize("name, options", [("reinmax", dict(k=3)), ("straight_through", dict(gap=1.0)),
                                           ("gumbel_rao", dict(gap=1.0)), ("gapped_straight_through", dict(k=2))])
def test_an_option_the_estimator_does_not_take_is_a_type_error(name, options):
    with pytest.raises(TypeError, match=next(iter(options))):
        estimate(name, torch.randn(2, 3), 1.0, **options)
    with pytest.raises(TypeError, match=next(iter(options))):
        check_estimator_options(name, 1.0, options)


@pytest.mark.parametrize("name, tau, options, error, match", [
    ("gumbel_rao", 1.0, dict(k=0), ValueError, "k must be an integer >= 1"),
    ("gumbel_rao", 1.0, dict(k=2.5), TypeError, "k must be an integer >= 1"),
    ("gapped_straight_through", 1.0, dict(gap=-1), ValueError, "gap must be a finite real number >= 0"),
    ("gapped_straight_through", 1.0, dict(gap=float("nan")), ValueError, "gap must be a finite real number >= 0"),
    ("reinmax", 0.0, {}, ValueError, "tau must be a finite real number > 0"),
])
def test_check_estimator_options_refuses_bad_values_now(name, tau, options, error, match):
    with pytest.raises(error, match=match):
        check_estimator_options(name, tau, options)


@pytest.mark.parametrize("name", NAMES)
def test_check_estimator_options_returns_a_copy_and_leaves_the_global_rng_alone(name):
    options = dict(OPTIONS.get(name, {}))
    state = torch.get_rng_state()
    checked = check_estimator_options(name, 1.2, options)
    assert torch.equal(torch.get_rng_state(), state)
    assert checked == options and checked is not options
