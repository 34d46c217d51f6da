"""The shared argument checks and file writing of every library (stability_toolbox)."""

import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import stability_toolbox
from toolbox_core import validation as v
from toolbox_core.files import atomic_write, check_output_path


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), torch.tensor(3), torch.tensor([3])])
def test_as_int_accepts_every_integer_form(value):
    assert v.as_int("k", value, minimum=1) == 3


@pytest.mark.parametrize("value", [2.5, 1.0, np.float32(0.5), torch.tensor(2.5), torch.tensor([2.5]), 7])
def test_as_real_accepts_every_real_form(value):
    assert v.as_real("x", value) == pytest.approx(float(value))


@pytest.mark.parametrize("value, exc", [
    (True, TypeError), ("3", TypeError), (None, TypeError), (torch.ones(2), TypeError),
    (float("nan"), ValueError), (float("inf"), ValueError), (10 ** 400, ValueError), (-1, ValueError),
])
def test_as_real_refuses_with_the_argument_named(value, exc):
    with pytest.raises(exc, match=r"^x must be a finite real number >= 0"):
        v.as_real("x", value, low=0.0)


def test_messages_never_contradict_the_value():
    """0.1.0-era bug: 'must be an integer >= 1, got np.int64(2)' -- a NumPy 2 is an integer >= 1."""
    assert v.as_int("n", np.int64(2), minimum=1) == 2
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got 0$"):
        v.as_int("n", np.int64(0), minimum=1)
    with pytest.raises(TypeError, match=r"got 2\.0 \(float\)"):
        v.as_int("n", 2.0, minimum=1)
    assert v.as_int("n", 2.0, minimum=1, integral_float=True) == 2
    with pytest.raises(ValueError, match="n must be an integer"):
        v.as_int("n", 2.5, integral_float=True)


@given(st.floats(allow_nan=True, allow_infinity=True), st.floats(-10, 10), st.booleans())
def test_as_real_property(x, low, low_open):
    """Either the number itself comes back, or ValueError naming the argument -- nothing else."""
    try:
        out = v.as_real("arg", x, low=low, low_open=low_open)
    except ValueError as err:
        assert str(err).startswith("arg must be")
        assert x != x or abs(x) == float("inf") or x < low or (low_open and x == low)
    else:
        assert out == x and (out > low or (out == low and not low_open))


def test_as_bool_and_choice():
    assert v.as_bool("flag", np.bool_(True)) is True and v.as_bool("flag", 0) is False
    with pytest.raises(TypeError, match="flag must be True or False"):
        v.as_bool("flag", 2)
    with pytest.raises(ValueError, match=r"mode must be one of \['a', 'b'\], got 'c'"):
        v.as_choice("mode", "c", ["a", "b"])


def test_data_checks_switch_and_context():
    bad = torch.tensor(True)
    with pytest.raises(ValueError, match="boom"):
        v.check_data(lambda: bad, "boom")
    with stability_toolbox.data_checks(False):
        assert not stability_toolbox.data_checks_enabled()
        v.check_data(lambda: bad, "boom")  # skipped
    assert stability_toolbox.data_checks_enabled()
    with pytest.raises(TypeError):
        stability_toolbox.set_data_checks("yes")


def test_data_checks_are_skipped_under_torch_func():
    def f(x):
        v.check_data(lambda: torch.isnan(x).any(), "nan")
        return x.sum()
    assert torch.func.grad(f)(torch.tensor([float("nan"), 1.0])).tolist() == [1.0, 1.0]


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    with atomic_write(target) as f:
        f.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["f.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600


def test_check_output_path(tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes(b"x")
    with pytest.raises(ValueError, match="is the input"):
        check_output_path(src, [src])
    with pytest.raises(ValueError, match="is the input"):
        check_output_path(tmp_path / "." / "in.pt", [src])
    with pytest.raises(ValueError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "out.pt", [src])
    with pytest.raises(ValueError, match="is a directory"):
        check_output_path(tmp_path, [src])
    assert check_output_path(tmp_path / "out.pt", [src]) == tmp_path / "out.pt"
