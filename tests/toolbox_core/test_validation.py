"""`toolbox_core.validation`: the data checks of tensors and their global switch (`check_data`,
`set_data_checks`, `data_checks`, `data_checks_enabled`), and the argument checks it re-exports (those
themselves: test_checks.py)."""

import pytest
import torch

from toolbox_core import checks
from toolbox_core import validation as v


@pytest.fixture(autouse=True)
def _checks_on_again():
    """Every test starts and ends with the data checks on (the default)."""
    v.set_data_checks(True)
    yield
    v.set_data_checks(True)


def test_the_argument_checks_are_re_exported():
    for name in ("as_int", "as_real", "as_bool", "as_choice"):
        assert getattr(v, name) is getattr(checks, name) and name in v.__all__


def test_data_checks_switch_and_context():
    bad = torch.tensor(True)
    with pytest.raises(ValueError, match="boom"):
        v.check_data(lambda: bad, "boom")
    with v.data_checks(False):
        assert not v.data_checks_enabled()
        v.check_data(lambda: bad, "boom")  # skipped
    assert v.data_checks_enabled()
    with pytest.raises(TypeError):
        v.set_data_checks("yes")


def test_check_data_raises_the_message_only_when_bad():
    v.check_data(lambda: torch.tensor(False), "never")
    with pytest.raises(ValueError, match=r"^x must be finite \(got NaN\)$"):
        v.check_data(lambda: torch.isnan(torch.tensor([1.0, float("nan")])).any(), "x must be finite (got NaN)")


def test_switched_off_nothing_is_computed():
    """``bad`` is a callable so that a switched-off check costs nothing: it is not even called."""
    calls = []

    def bad():
        calls.append(1)
        return torch.tensor(True)

    v.set_data_checks(False)
    v.check_data(bad, "boom")
    assert calls == [] and not v.data_checks_enabled()
    v.set_data_checks(True)
    with pytest.raises(ValueError):
        v.check_data(bad, "boom")
    assert calls == [1]


@pytest.mark.parametrize("value, expected", [(False, False), (0, False), (True, True), (1, True)])
def test_set_data_checks_takes_booleans(value, expected):
    v.set_data_checks(value)
    assert v.data_checks_enabled() is expected


@pytest.mark.parametrize("value", ["yes", 2, None, 0.0])
def test_set_data_checks_refuses_the_rest_and_keeps_the_setting(value):
    with pytest.raises(TypeError, match="^enabled must be True or False"):
        v.set_data_checks(value)
    assert v.data_checks_enabled()


@pytest.mark.parametrize("outer", [True, False])
def test_the_context_restores_the_previous_setting_even_on_error(outer):
    v.set_data_checks(outer)
    with pytest.raises(RuntimeError):
        with v.data_checks(not outer):
            assert v.data_checks_enabled() is (not outer)
            with v.data_checks(outer):  # nested
                assert v.data_checks_enabled() is outer
            assert v.data_checks_enabled() is (not outer)
            raise RuntimeError("inside")
    assert v.data_checks_enabled() is outer
    with pytest.raises(TypeError):
        with v.data_checks("off"):
            pass
    assert v.data_checks_enabled() is outer


def test_data_checks_are_skipped_under_torch_func():
    def f(x):
        v.check_data(lambda: torch.isnan(x).any(), "nan")
        return x.sum()
    assert torch.func.grad(f)(torch.tensor([float("nan"), 1.0])).tolist() == [1.0, 1.0]


def test_data_checks_are_skipped_under_torch_compile(fresh_dynamo):
    """Traced, a data check would be a graph break (and a host sync on CUDA): it is skipped, eager still checks."""
    seen = []

    def f(x):
        seen.append(v.data_checks_enabled())
        v.check_data(lambda: torch.isnan(x).any(), "nan")
        return x * 2

    x = torch.tensor([float("nan"), 1.0])
    out = torch.compile(f, backend="eager", fullgraph=True)(x)
    assert seen == [False] and torch.isnan(out[0]) and out[1] == 2.0
    with pytest.raises(ValueError, match="nan"):
        f(x)
