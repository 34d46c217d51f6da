"""`OmegaResidual.rescale_sum`'s cached fast path (`_cached_rescale_weight`) attacked as a user would: an ``s`` on
another device than omega's, a module made under ``torch.inference_mode``, and omega changed in every way a user
can change it, each against the formula written out (``x * omega + (s - x)``) and its gradients."""

import pytest
import torch
from torch import nn

from admin_torch import OmegaResidual


@pytest.fixture
def warm():
    """A module whose cache is made (one call of the common case), and operands on the CPU."""
    torch.manual_seed(0)
    res = OmegaResidual(1.7)
    x = torch.randn(3, 8)
    res.rescale_sum(x, x + 1)
    return res


@pytest.mark.parametrize("shape", [(3, 8), ()], ids=["3x8", "0-d"])
def test_an_s_on_another_device_is_refused_naming_s(warm, shape):
    """x on omega's device, s (same shape and dtype) on another: the fast path used to take it and torch raised
    a RuntimeError from inside addcmul; it is the checked path's ValueError naming s, as before any cache."""
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=r"^s must be on the device of omega"):
        warm.rescale_sum(x, torch.randn(shape, device="meta"))
    with pytest.raises(ValueError, match=r"^s must be on the device of omega"):
        OmegaResidual(1.7).rescale_sum(x, torch.randn(shape, device="meta"))  # no cache: the same refusal


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_module_made_under_inference_mode_rescales(dtype):
    """A module built under inference_mode holds an inference omega, which has no version counter: rescale_sum
    raised RuntimeError ("Inference tensors do not track version counter") where forward worked; now it gives
    x * omega + f_x, inside inference mode and outside it, after set_omega_ too."""
    with torch.inference_mode():
        res = OmegaResidual(2.5).to(dtype)
    x, f = torch.randn(4, 8).to(dtype), torch.randn(4, 8).to(dtype)
    for omega in (2.5, 0.25):
        want = (x.double() * omega + f.double())
        with torch.inference_mode():
            got = res.rescale_sum(x, x + f)
            if omega == 2.5:
                res.set_omega_(0.25)  # in-place on an inference tensor: only inside inference mode
                got_again = res.rescale_sum(x, x + f)
        tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.double(), want, **tol)
        with torch.no_grad():
            torch.testing.assert_close(res.rescale_sum(x, x + f).double(),
                                       (x.double() * res.omega.double() + f.double()), **tol)
    torch.testing.assert_close(got_again.double(), x.double() * 0.25 + f.double(), **tol)


_CHANGES = {
    "set_omega_": lambda res: res.set_omega_(0.5),
    "in-place under no_grad": lambda res: torch.no_grad()(res.omega.mul_)(3.0),
    "in-place under inference_mode": lambda res: torch.inference_mode()(res.omega.mul_)(3.0),
    "load_state_dict": lambda res: res.load_state_dict({"omega": torch.tensor([2.25])}),
    "load_state_dict assign": lambda res: res.load_state_dict({"omega": torch.tensor([2.25])}, assign=True),
    "new buffer": lambda res: setattr(res, "omega", torch.tensor([0.75])),
    "to float64 and back": lambda res: res.double().float(),
    "hook added and removed": lambda res: res.register_forward_hook(lambda m, a, o: None).remove(),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("change", sorted(_CHANGES))
def test_after_omega_changes_the_sum_and_its_gradients_are_the_formulas(warm, change, dtype):
    """After omega is changed (the cache made before it): the value equals x * omega + (s - x) with the omega the
    module holds now, and the gradients are d/ds = 1, d/dx = omega - 1 (finite differences of the formula)."""
    _CHANGES[change](warm)
    omega = float(warm.omega)
    gen = torch.Generator().manual_seed(1)
    # non-contiguous operands too: a transposed x, an s that is a view
    x = torch.randn(8, 3, generator=gen, dtype=dtype).t().requires_grad_()
    s = torch.randn(3, 8, generator=gen, dtype=dtype).requires_grad_()
    for _ in range(2):  # the first call may remake the cache, the second takes it
        out = warm.rescale_sum(x, s)
        torch.testing.assert_close(out, x.detach() * omega + (s.detach() - x.detach()),
                                   rtol=1e-6, atol=1e-6)
        gx, gs = torch.autograd.grad(out, (x, s), torch.ones_like(out))
        torch.testing.assert_close(gx, torch.full_like(gx, omega - 1.0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gs, torch.ones_like(gs))


def test_an_omega_made_a_parameter_is_used(warm):
    """omega assigned an nn.Parameter (it leaves the buffers): the cache is not taken; the new value is used."""
    warm.omega = nn.Parameter(torch.tensor([3.0]))
    x, s = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(warm.rescale_sum(x, s), 3.0 * x + s - x)
    torch.testing.assert_close(warm.rescale_sum(x, s), 3.0 * x + s - x)
