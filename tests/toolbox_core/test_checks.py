"""`toolbox_core.checks`: the argument checks every library shares (`as_int`, `as_real`, `as_bool`, `as_choice`).

What each accepts (Python, NumPy and one-element tensor forms of a number), what it returns (a plain Python
value), and what it refuses -- bool as a number, NaN, infinities, values outside the interval, other types --
with TypeError or ValueError whose message names the argument and what it accepts. The intervals are checked
against a membership test written out here, for open and closed ends, over generated values (hypothesis).
"""

import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from toolbox_core import checks
from toolbox_core.checks import as_bool, as_choice, as_int, as_real


def forms(x):
    """``x`` as a Python number, NumPy scalar and one-element tensors (0-d and (1,)), float64 or int64."""
    if isinstance(x, int):
        return [x, np.int64(x), torch.tensor(x), torch.tensor([x])]
    return [x, np.float64(x), torch.tensor(x, dtype=torch.float64), torch.tensor([x], dtype=torch.float64)]


def outcome(fn, *args, **kwargs):
    """``("ok", value)`` or ``(exception type, message)``."""
    try:
        return "ok", fn(*args, **kwargs)
    except (TypeError, ValueError) as err:
        return type(err), str(err)


# ------------------------------------------------------------------ as_int


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), torch.tensor(3), torch.tensor([3])])
def test_as_int_accepts_every_integer_form(value):
    assert checks.as_int("k", value, minimum=1) == 3


@pytest.mark.parametrize("value", [np.uint8(3), np.int8(3), torch.tensor(3, dtype=torch.int16), np.array([3]),
                                   np.array(3), 3])
def test_as_int_returns_a_python_int(value):
    out = as_int("k", value)
    assert type(out) is int and out == 3


def test_messages_never_contradict_the_value():
    """0.1.0-era bug: 'must be an integer >= 1, got np.int64(2)' -- a NumPy 2 is an integer >= 1."""
    assert as_int("n", np.int64(2), minimum=1) == 2
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got 0$"):
        as_int("n", np.int64(0), minimum=1)
    with pytest.raises(TypeError, match=r"got 2\.0 \(float\)"):
        as_int("n", 2.0, minimum=1)
    assert as_int("n", 2.0, minimum=1, integral_float=True) == 2
    with pytest.raises(ValueError, match="n must be an integer"):
        as_int("n", 2.5, integral_float=True)


@pytest.mark.parametrize("value, error, match", [
    (True, TypeError, r"^n must be an integer >= 1 and <= 5, got True \(bool\)$"),
    (np.bool_(False), TypeError, r"^n must be an integer >= 1 and <= 5, got np\.False_ \(bool\)$"),
    (torch.tensor(True), TypeError,
     r"^n must be an integer >= 1 and <= 5, got a tensor of shape \(\) and dtype torch\.bool$"),
    (3.0, TypeError, r"^n must be an integer >= 1 and <= 5, got 3\.0 \(float\)$"),
    (torch.tensor(3.0), TypeError,
     r"^n must be an integer >= 1 and <= 5, got a tensor of shape \(\) and dtype torch\.float32$"),
    (torch.tensor([1, 2]), TypeError, r"^n must be an integer >= 1 and <= 5, got a tensor of shape \(2,\)"),
    (np.array([[3]]), TypeError, r"^n must be an integer >= 1 and <= 5, got array"),
    ("3", TypeError, r"^n must be an integer >= 1 and <= 5, got '3' \(str\)$"),
    (None, TypeError, r"^n must be an integer >= 1 and <= 5, got None \(NoneType\)$"),
    (0, ValueError, r"^n must be an integer >= 1 and <= 5, got 0$"),
    (6, ValueError, r"^n must be an integer >= 1 and <= 5, got 6$"),
    (np.int64(-7), ValueError, r"^n must be an integer >= 1 and <= 5, got -7$"),
    (torch.tensor([9]), ValueError, r"^n must be an integer >= 1 and <= 5, got 9$"),
])
def test_as_int_refuses_naming_the_argument_and_the_range(value, error, match):
    with pytest.raises(error, match=match):
        as_int("n", value, minimum=1, maximum=5)


@pytest.mark.parametrize("value, expected", [(12.0, 12), (np.float32(4.0), 4), (torch.tensor(2.0), 2), (-0.0, 0)])
def test_integral_float_accepts_whole_floats(value, expected):
    out = as_int("n", value, integral_float=True)
    assert type(out) is int and out == expected


@pytest.mark.parametrize("value", [2.5, float("nan"), float("inf"), -float("inf"), 1e-300])
def test_integral_float_refuses_the_rest_with_a_value_error(value):
    with pytest.raises(ValueError, match=r"^n must be an integer >= 0, got"):
        as_int("n", value, minimum=0, integral_float=True)


@given(st.integers(-10 ** 20, 10 ** 20), st.one_of(st.none(), st.integers(-50, 50)),
       st.one_of(st.none(), st.integers(-50, 50)))
def test_as_int_range_property(x, minimum, maximum):
    inside = (minimum is None or x >= minimum) and (maximum is None or x <= maximum)
    for value in forms(x) if abs(x) < 2 ** 62 else [x]:
        kind, result = outcome(as_int, "n", value, minimum=minimum, maximum=maximum)
        if inside:
            assert kind == "ok" and result == x and type(result) is int
        else:
            bounds = " and ".join([f">= {minimum}"] * (minimum is not None) + [f"<= {maximum}"] * (maximum is not None))
            assert kind is ValueError and result == f"n must be an integer {bounds}, got {x}"


# ------------------------------------------------------------------ as_real


@pytest.mark.parametrize("value", [2.5, 1.0, np.float32(0.5), torch.tensor(2.5), torch.tensor([2.5]), 7])
def test_as_real_accepts_every_real_form(value):
    assert checks.as_real("x", value) == pytest.approx(float(value))


@pytest.mark.parametrize("value", [7, 2.5, np.float16(0.5), np.int64(3), np.longdouble(0.25), Fraction(1, 4),
                                   torch.tensor(2, dtype=torch.int32), torch.tensor([0.5], dtype=torch.bfloat16),
                                   10 ** 300])
def test_as_real_returns_a_python_float(value):
    out = as_real("x", value)
    assert type(out) is float and out == float(value)


@pytest.mark.parametrize("value, exc", [
    (True, TypeError), ("3", TypeError), (None, TypeError), (torch.ones(2), TypeError),
    (float("nan"), ValueError), (float("inf"), ValueError), (10 ** 400, ValueError), (-1, ValueError),
])
def test_as_real_refuses_with_the_argument_named(value, exc):
    with pytest.raises(exc, match=r"^x must be a finite real number >= 0"):
        checks.as_real("x", value, low=0.0)


@pytest.mark.parametrize("value, match", [
    (np.bool_(True), r"got np\.True_ \(bool\)$"),
    (torch.tensor(True), r"got a tensor of shape \(\) and dtype torch\.bool$"),
    (1 + 0j, r"got \(1\+0j\) \(complex\)$"),
    (torch.tensor(1 + 0j), r"got a tensor of shape \(\) and dtype torch\.complex64$"),
    ([0.5], r"got \[0\.5\] \(list\)$"),
])
def test_as_real_type_errors_describe_the_value(value, match):
    with pytest.raises(TypeError, match=r"^tau must be a finite real number > 0, " + match):
        as_real("tau", value, low=0.0, low_open=True)


@pytest.mark.parametrize("value", [float("nan"), np.float32("nan"), torch.tensor(float("nan"))])
def test_nan_is_refused_even_where_infinities_are_allowed(value):
    with pytest.raises(ValueError, match=r"^x must be a real number, got nan$"):
        as_real("x", value, finite=False)
    assert as_real("x", float("inf"), finite=False) == math.inf
    assert as_real("x", -math.inf, finite=False, high=0.0) == -math.inf


def test_an_integer_too_large_for_a_float_is_a_value_error():
    with pytest.raises(ValueError, match="^x must be a finite real number, got an integer too large for a float$"):
        as_real("x", 10 ** 400)


@given(st.floats(allow_nan=True, allow_infinity=True), st.floats(-10, 10), st.booleans())
def test_as_real_property(x, low, low_open):
    """Either the number itself comes back, or ValueError naming the argument -- nothing else."""
    try:
        out = checks.as_real("arg", x, low=low, low_open=low_open)
    except ValueError as err:
        assert str(err).startswith("arg must be")
        assert x != x or abs(x) == float("inf") or x < low or (low_open and x == low)
    else:
        assert out == x and (out > low or (out == low and not low_open))


def describe_interval(low, high, low_open, high_open):
    """How the message states the accepted interval (REFERENCE of the module docstring: ``> 0``, ``in [0, 1)``)."""
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} "
    if low is None:
        return f" {'<' if high_open else '<='} "
    return f" in {'(' if low_open else '['}"


@given(x=st.floats(allow_nan=True, allow_infinity=True),
       low=st.one_of(st.none(), st.floats(-10, 10)), high=st.one_of(st.none(), st.floats(-10, 10)),
       low_open=st.booleans(), high_open=st.booleans(), finite=st.booleans())
def test_as_real_interval_property(x, low, high, low_open, high_open, finite):
    """Every form of ``x`` gives the same outcome: ``x`` back when it lies in the interval (open or closed at each
    end; infinities only when not ``finite``; never NaN), else ValueError naming the argument and the interval."""
    inside = (not math.isnan(x) and (not finite or math.isfinite(x))
              and (low is None or (x > low if low_open else x >= low))
              and (high is None or (x < high if high_open else x <= high)))
    for value in forms(x):
        kind, result = outcome(as_real, "arg", value, low=low, high=high, low_open=low_open, high_open=high_open,
                               finite=finite)
        if inside:
            assert kind == "ok" and result == x and type(result) is float
        else:
            assert kind is ValueError
            assert result.startswith(f"arg must be a {'finite ' if finite else ''}real number"
                                     f"{describe_interval(low, high, low_open, high_open)}")
            if low is not None and high is not None:
                assert re.search(rf"{']' if not high_open else re.escape(')')}, got ", result)


def test_interval_messages():
    with pytest.raises(ValueError, match=r"^p must be a finite real number in \(0, 1\], got 0\.0$"):
        as_real("p", 0, low=0.0, high=1.0, low_open=True)
    with pytest.raises(ValueError, match=r"^beta must be a finite real number in \[0, 1\), got 1\.0$"):
        as_real("beta", np.float32(1.0), low=0.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match=r"^lr must be a finite real number >= 0, got -0\.1$"):
        as_real("lr", torch.tensor(-0.1, dtype=torch.float64), low=0.0)
    assert as_real("p", 1, low=0.0, high=1.0, low_open=True) == 1.0  # the closed end belongs to the interval


# ------------------------------------------------------------------ as_bool and as_choice


def test_as_bool_and_choice():
    assert checks.as_bool("flag", np.bool_(True)) is True and checks.as_bool("flag", 0) is False
    with pytest.raises(TypeError, match="flag must be True or False"):
        checks.as_bool("flag", 2)
    with pytest.raises(ValueError, match=r"mode must be one of \['a', 'b'\], got 'c'"):
        checks.as_choice("mode", "c", ["a", "b"])


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (np.bool_(False), False), (1, True),
                                             (np.int64(0), False), (torch.tensor(1), True), (torch.tensor([0]), False)])
def test_as_bool_accepts_booleans_and_zero_or_one(value, expected):
    assert as_bool("flag", value) is expected


@pytest.mark.parametrize("value, shown", [(2, r"2 \(int\)"), (-1, r"-1 \(int\)"), (1.0, r"1\.0 \(float\)"),
                                          ("yes", r"'yes' \(str\)"), (None, r"None \(NoneType\)"),
                                          (torch.tensor([1, 0]), r"a tensor of shape \(2,\) and dtype torch\.int64")])
def test_as_bool_refuses_the_rest_with_a_type_error(value, shown):
    with pytest.raises(TypeError, match=rf"^flag must be True or False, got {shown}$"):
        as_bool("flag", value)


def test_as_bool_accepts_a_one_element_bool_tensor():
    assert as_bool("flag", torch.tensor(True)) is True


@pytest.mark.parametrize("choices", [["a", "b"], ("a", "b")])
def test_as_choice_returns_the_value(choices):
    assert as_choice("mode", "b", choices) == "b"


@pytest.mark.parametrize("value, error, shown", [("c", ValueError, "'c'"), ("A", ValueError, "'A'"),
                                                 ("", ValueError, "''"), (1, TypeError, r"1 \(int\)"),
                                                 (None, TypeError, r"None \(NoneType\)"),
                                                 (["a"], TypeError, r"\['a'\] \(list\)")])
def test_as_choice_refuses_naming_the_choices(value, error, shown):
    with pytest.raises(error, match=rf"^mode must be one of \['a', 'b'\], got {shown}$"):
        as_choice("mode", value, ("a", "b"))


def test_the_module_imports_no_torch():
    """The checks look torch up in sys.modules instead of importing it (test_listops_imports.py runs a fresh
    interpreter); here: nothing in the module's namespace is torch."""
    assert "torch" not in vars(checks) and "numpy" not in vars(checks)
