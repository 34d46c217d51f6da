"""`stability_toolbox.guard_gradients`: what a guarded step reads of the gradients."""

import math

import pytest
import torch

from stability_toolbox.guard_gradients import OptimizerGradients, check_grad_norm, stamp, unchanged


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(3)])  # 6 gradients: the stamp samples 3
    m(torch.randn(2, 3)).sum().backward()
    return m


CHANGES = {
    "another backward": lambda m: m(torch.randn(2, 3)).sum().backward(),
    "zero_grad to zeros": lambda m: [p.grad.zero_() for p in m.parameters()],
    "zero_grad to None": lambda m: m.zero_grad(set_to_none=True),
    "a clipping": lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3),
    "one unsampled gradient scaled": lambda m: m[0].bias.grad.mul_(2.0),
    "one gradient replaced": lambda m: setattr(m[1].weight, "grad", m[1].weight.grad.clone()),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_the_stamp_sees_every_change_of_the_gradients(model, change):
    gradients = OptimizerGradients(torch.optim.SGD(model.parameters(), lr=0.1))
    seen = stamp(gradients.read()[0])
    assert unchanged(gradients.read()[0], seen)  # read again, untouched: the same gradients
    CHANGES[change](model)
    assert not unchanged(gradients.read()[0], seen)


def test_a_parameter_replaced_inside_its_group_is_read(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gradients = OptimizerGradients(opt)
    assert len(gradients.read()[0]) == 6
    new = torch.nn.Parameter(torch.ones(3))
    new.grad = torch.full((3,), 7.0)
    opt.param_groups[0]["params"][0] = new  # same list, same length
    raw, local, sharded, several_devices = gradients.read()
    assert raw[0] is new.grad and local is raw and not sharded and not several_devices


@pytest.mark.parametrize("value, want", [(0.0, 0.0), (2.5, 2.5), (10**400, math.inf), (float("nan"), math.nan),
                                         (torch.tensor([3.0]), 3.0), (torch.tensor(1.5, dtype=torch.bfloat16), 1.5)])
def test_a_handed_norm_is_a_float64_copy(value, want):
    got = check_grad_norm(value)
    assert got.dtype == torch.float64 and got.shape == ()
    assert (math.isnan(got.item()) and math.isnan(want)) or got.item() == want
    if isinstance(value, torch.Tensor):
        value.fill_(99.0)
        assert got.item() == want  # the value as handed


@pytest.mark.parametrize("value, error", [(-1.0, ValueError), (torch.tensor(-0.5), ValueError), (True, TypeError),
                                          ("1", TypeError), (torch.tensor([1, 2]), TypeError),
                                          (torch.tensor([1.0, 2.0]), ValueError),
                                          (torch.empty((), device="meta"), ValueError)])
def test_a_bad_norm_is_refused_by_name(value, error):
    with pytest.raises(error, match="grad_norm"):
        check_grad_norm(value)
