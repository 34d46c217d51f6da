"""torch.compile(optimizer.step) of AddSign and PowerSign matches the eager step."""

import pytest
import torch

from sign_optim import AddSign, CosineInternalDecay, PowerSign, fused
from torch_helpers import step_alike


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("cls", [AddSign, PowerSign])
@pytest.mark.parametrize("foreach", [False, True])
def test_compiled_step_matches_eager(cls, foreach):
    torch.manual_seed(0)
    shapes = [(4, 3), (7,)]
    eager = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    comp = [torch.nn.Parameter(p.detach().clone()) for p in eager]
    kwargs = dict(lr=1e-2, weight_decay=0.01, sign_internal_decay=CosineInternalDecay(10), foreach=foreach)
    opt_e, opt_c = cls(eager, **kwargs), cls(comp, **kwargs)
    step = torch.compile(opt_c.step, backend="aot_eager")
    step_alike(eager, opt_e.step, comp, step)
    for pe, pc in zip(eager, comp):
        torch.testing.assert_close(pc, pe, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt_c.state[pc]["exp_avg"], opt_e.state[pe]["exp_avg"])


@pytest.mark.skipif(not fused.available("cpu"), reason="the native operators are not built")
@pytest.mark.parametrize("cls", [AddSign, PowerSign])
@pytest.mark.parametrize("decay", [None, CosineInternalDecay(10)])
def test_compiled_fused_step_is_one_operator_node_and_compiles_once(cls, decay):
    """fullgraph=True: the whole step traces (the operator's fake implementation), the graph holds the fused
    operator once for all parameters, and later steps (other decay values) reuse the graph."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    eager = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 3), (7,), (2, 2, 2)]]
    comp = [torch.nn.Parameter(p.detach().clone()) for p in eager]
    opt_e = cls(eager, lr=1e-2, weight_decay=0.01, sign_internal_decay=decay)
    opt_c = cls(comp, lr=1e-2, weight_decay=0.01, sign_internal_decay=decay)
    for p in eager + comp:  # the first step (state creation) runs eagerly, as torch.optim's compiled steps
        p.grad = torch.ones_like(p)
    opt_e.step()
    opt_c.step()
    step = torch.compile(opt_c.step, backend=backend, fullgraph=True)
    step_alike(eager, opt_e.step, comp, step)
    assert len(graphs) == 1
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "fused_sign_" in str(n.target)]
    assert len(calls) == 1
    for pe, pc in zip(eager, comp):
        torch.testing.assert_close(pc, pe, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt_c.state[pc]["step"], opt_e.state[pe]["step"])
