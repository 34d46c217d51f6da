"""`toolbox_core`'s argument checks under adversarial values (each found by a fuzz of the public API): a meta tensor
(no data to read), a device that is not one, a non-tensor where a tensor is compared. Each is a TypeError or
ValueError naming the argument, never torch's RuntimeError or an AttributeError."""

import pytest
import torch

from toolbox_core import checks
from toolbox_core import validation as v

META_VALUES = [torch.zeros((), device="meta"), torch.zeros(1, device="meta"),
               torch.zeros((), dtype=torch.int64, device="meta"), torch.zeros((), dtype=torch.bool, device="meta")]


@pytest.mark.parametrize("check", [checks.as_int, checks.as_real, checks.as_bool])
@pytest.mark.parametrize("value", META_VALUES, ids=["f32", "f32-1", "i64", "bool"])
def test_a_meta_tensor_is_no_number(check, value):
    """Was ``RuntimeError: Tensor.item() cannot be called on meta tensors``."""
    with pytest.raises(TypeError, match=r"^lr must be .*on meta"):
        check("lr", value)


def test_set_data_checks_refuses_a_meta_tensor():
    with pytest.raises(TypeError, match="^enabled must be True or False"):
        v.set_data_checks(torch.zeros((), dtype=torch.bool, device="meta"))
    assert v.data_checks_enabled()


def test_one_element_tensors_still_read():
    assert checks.as_real("lr", torch.tensor([0.5])) == 0.5
    assert checks.as_int("k", torch.tensor(3)) == 3
    assert checks.as_bool("flag", torch.tensor(True)) is True


@pytest.mark.parametrize("value, error", [("gpu", ValueError), ("cuda:x", ValueError), (None, TypeError),
                                          (1.5, TypeError), (True, TypeError), ([0], TypeError)])
def test_as_device_names_the_argument(value, error):
    with pytest.raises(error, match="^device must be a torch.device"):
        v.as_device("device", value)


@pytest.mark.parametrize("value", ["cpu", torch.device("cpu"), "meta"])
def test_as_device_accepts_devices_and_names(value):
    assert v.as_device("device", value) == torch.device(value)


@pytest.mark.parametrize("value", [None, 3.0, [1.0], "x"])
def test_check_device_of_a_non_tensor(value):
    """Was ``AttributeError: ... has no attribute 'device'``."""
    with pytest.raises(TypeError, match="^mask must be a tensor"):
        v.check_device("mask", value, torch.device("cpu"), "logits")
