"""The argument and data checks every estimator and layer of reinmax shares (`reinmax._checks`), on their own:
what each accepts and returns, and the error (type and message) for everything else. (Named test__checks.py
after the module: tests/toolbox_core/test_checks.py tests the ground package's checks.)"""

import re

import numpy as np
import pytest
import torch

from reinmax._checks import (NON_FINITE_MESSAGE, check_generator, check_hard, check_logits, check_probabilities,
                             check_tau, one_hot, work_dtype)
from toolbox_core.validation import data_checks


@pytest.mark.parametrize("tau", [1.3, 2, np.float32(0.5), np.int64(3), torch.tensor(0.7), torch.tensor([1.5]), 1e-300])
def test_check_tau_accepts_positive_numbers_as_floats(tau):
    out = check_tau(tau)
    assert type(out) is float and out == pytest.approx(float(tau))


@pytest.mark.parametrize("tau, error", [(0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), (True, TypeError), ("1", TypeError),
                                        (None, TypeError), (torch.ones(2), TypeError)])
def test_check_tau_refuses_naming_tau(tau, error):
    with pytest.raises(error, match=r"^tau must be a finite real number > 0, got "):
        check_tau(tau)


@pytest.mark.parametrize("shape, dim, expected", [((5,), -1, 0), ((2, 3), -1, 1), ((2, 3), 0, 0), ((2, 3, 4), -2, 1),
                                                  ((2, 3, 4), np.int64(2), 2), ((0, 3), 1, 1)])
def test_check_logits_gives_the_non_negative_dim(shape, dim, expected):
    out = check_logits(torch.zeros(shape), dim)
    assert type(out) is int and out == expected


@pytest.mark.parametrize("logits, dim, error, match", [
    ([0.0, 1.0], -1, TypeError, "^logits must be a floating-point torch.Tensor, got list"),
    (torch.ones(3, dtype=torch.int64), -1, TypeError,
     "^logits must be a floating-point tensor .* got dtype torch.int64"),
    (torch.ones(3, dtype=torch.bool), -1, TypeError, "got dtype torch.bool"),
    (torch.tensor(1.0), -1, ValueError, "^logits must have at least one dimension"),
    (torch.ones(2, 0), -1, ValueError, r"^logits must have at least one category along dim=1, got shape \(2, 0\)"),
    (torch.ones(2, 3), 2, ValueError, "^dim must be an integer >= -2 and <= 1, got 2"),
    (torch.ones(2, 3), -3, ValueError, "^dim must be an integer >= -2 and <= 1, got -3"),
    (torch.ones(2, 3), 1.0, TypeError, "^dim must be an integer"),
    (torch.ones(2, 3), None, TypeError, "^dim must be an integer"),
])
def test_check_logits_refuses(logits, dim, error, match):
    with pytest.raises(error, match=match):
        check_logits(logits, dim)


def test_check_generator():
    logits = torch.zeros(2, 3)
    check_generator(None, logits)
    check_generator(torch.Generator(), logits)
    with pytest.raises(TypeError, match="^generator must be a torch.Generator or None, got int"):
        check_generator(0, logits)
    with pytest.raises(ValueError, match=r"^generator must live on the logits' device type \(meta\), got a generator "
                                         "on cpu"):
        check_generator(torch.Generator(), torch.zeros(2, 3, device="meta"))


def test_check_probabilities_is_a_data_check():
    check_probabilities(torch.tensor([1.0, 0.5]))
    check_probabilities(torch.tensor([float("inf")]))  # only NaN (softmax of NaN, +inf or all -inf) is refused
    with pytest.raises(ValueError, match=f"^{re.escape(NON_FINITE_MESSAGE)}$"):
        check_probabilities(torch.tensor([1.0, float("nan")]))
    with data_checks(False):
        check_probabilities(torch.tensor([float("nan")]))


@pytest.mark.parametrize("hard", [True, False, 0, 1, np.bool_(True)])
def test_check_hard_accepts_booleans(hard):
    assert check_hard(hard) is None


@pytest.mark.parametrize("hard", ["yes", 2, None, 1.0])
def test_check_hard_refuses_the_rest(hard):
    with pytest.raises(TypeError, match="^hard must be True or False"):
        check_hard(hard)


@pytest.mark.parametrize("dtype, expected", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                             (torch.float16, torch.float32), (torch.bfloat16, torch.float32)])
def test_work_dtype(dtype, expected):
    assert work_dtype(dtype) == expected


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_one_hot_along_any_dim(dim):
    like = torch.randn(4, 5, 6, dtype=torch.float64).transpose(0, 2)  # (6, 5, 4), non-contiguous
    idx_shape = [1 if i == dim else s for i, s in enumerate(like.shape)]
    idx = torch.randint(like.shape[dim], idx_shape)
    before = like.clone()
    out = one_hot(idx, like, dim)
    assert out.shape == like.shape and out.dtype == like.dtype and out.is_contiguous()
    assert torch.equal(out.sum(dim), torch.ones(out.sum(dim).shape, dtype=torch.float64))
    assert torch.equal(out.argmax(dim, keepdim=True), idx)
    assert torch.equal(like, before)  # out of place
