"""Fixtures the monitor's tests share: a tiny seeded Pre-LN stack and a quiet monitor log (feeding it updates of
a chosen gradient RMS: `torch_helpers.feed_grads`)."""

import logging

import pytest
import torch

from admin_torch import make_stack


@pytest.fixture
def model():
    """A 2-layer Pre-LN stack (d=8, 2 heads), seeded: the model the per-update rules' tests feed gradients to (a
    test module may define its own ``model``, which then takes precedence)."""
    torch.manual_seed(0)
    return make_stack("pre_ln", depth=2, dim=8, heads=2, seed=0)


@pytest.fixture
def quiet_log():
    """The monitor's warnings logged at ERROR only while the test runs (the rules' tests fire them on purpose)."""
    logging.getLogger("stability_toolbox").setLevel(logging.ERROR)
    yield
    logging.getLogger("stability_toolbox").setLevel(logging.NOTSET)
