"""The monitor and Admin read a layer through one primitive (``admin_torch.hooks.capture_sums``) and one
description, so they see the same sublayers: on every supported family, the monitor's residual sites of the
stock model (read around the norms, ``f = s - x``) equal, one for one and in order, those of the converted
model with every omega at 1 (read from the OmegaResidual modules Admin calls with ``(x, f)``): the same count,
and per site the same branch/sum variance ratio and the same maximum."""

import copy

import pytest
import torch
from torch import nn

import admin_torch
from stability_toolbox.quantities import Recorder
from stability_toolbox.sites import SitePlan

from benchmarks import hf_families as H

FAST = ["bert", "bert_decoder", "bart", "bart_causal", "xlnet_two_stream"]


def _families():
    try:
        import transformers  # noqa: F401
    except ImportError:
        return []
    return [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in H.families()]


def _read(model: nn.Module, inputs) -> tuple:
    """The plan's mechanism and ``[(calls, beta, amax)]`` of every residual site after one forward pass."""
    plan = SitePlan(model)
    handles = []
    plan.arm(Recorder(probe_rows=2), handles)
    try:
        with torch.no_grad():
            model(**inputs) if isinstance(inputs, dict) else model(inputs)
    finally:
        for h in handles:
            h.remove()
    sites = plan.all_sites()
    assert sites and all(s.calls for s in sites), [s.name for s in sites if not s.calls]
    return plan.mechanism("auto"), [(s.calls, float(s.beta_sum / s.calls), float(s.amax)) for s in sites]


def _same_sites(stock: nn.Module, inputs) -> None:
    converted = admin_torch.convert(copy.deepcopy(stock))
    with torch.no_grad():
        for m in converted.modules():
            if isinstance(m, admin_torch.OmegaResidual):
                m.omega.fill_(1.0)  # Admin at omega = 1 is the stock function
    mech_stock, stock_sites = _read(stock, inputs)
    mech_admin, admin_sites = _read(converted, inputs)
    assert (mech_stock, mech_admin) == ("layer descriptions", "residual modules")
    assert len(stock_sites) == len(admin_sites)
    for (calls_s, beta_s, amax_s), (calls_a, beta_a, amax_a) in zip(stock_sites, admin_sites):
        assert calls_s == calls_a
        assert beta_s == pytest.approx(beta_a, rel=1e-4, abs=1e-6)
        assert amax_s == pytest.approx(amax_a, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("family", _families())
def test_the_monitor_sees_the_sublayers_admin_converts_huggingface(family):
    model, inputs, _ = H.build(family)
    _same_sites(model, inputs)


@pytest.mark.parametrize("decoder", [False, True])
def test_the_monitor_sees_the_sublayers_admin_converts_torch_nn(decoder):
    torch.manual_seed(0)
    if decoder:
        layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        stack = nn.TransformerDecoder(layer, 3)
        memory = torch.randn(2, 4, 16)

        class WithMemory(nn.Module):  # the monitor's model takes one input
            def __init__(self):
                super().__init__()
                self.stack = stack

            def forward(self, x):
                return self.stack(x, memory)
        model = WithMemory()
    else:
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 3,
                                      enable_nested_tensor=False)
    _same_sites(model.train(), torch.randn(2, 5, 16))
