"""torch.compile(optimizer.step) of AddSign and PowerSign matches the eager step."""

import pytest
import torch

from sign_optim import AddSign, CosineInternalDecay, PowerSign


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


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
    for _ in range(4):
        for pe, pc in zip(eager, comp):
            g = torch.randn_like(pe)
            pe.grad, pc.grad = g, g.clone()
        opt_e.step()
        step()
    for pe, pc in zip(eager, comp):
        torch.testing.assert_close(pc, pe, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt_c.state[pc]["exp_avg"], opt_e.state[pe]["exp_avg"])
