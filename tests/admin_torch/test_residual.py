"""The 0.1.0-compatible API: formulas, compatibility with admin-torch 0.1.0, dtypes, state_dict, bad input."""

import inspect
import io
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import admin_torch
from admin_torch import OmegaResidual, as_buffer, as_module, as_parameter, calculate_init
from peers import require_peer

GRID_N = [1, 2, 3, 5, 6, 12, 18, 24, 36, 50, 72, 100, 120, 200, 1000]
SCALES = ["O(n)", "O(logn)", "default", "O(1)"]


def written_out(n: int, scale: str) -> float:
    """The closed forms of REFERENCE section 1, written out separately."""
    if scale in ("O(logn)", "default"):
        return math.sqrt((n + 1) / math.log(n + 1) - 1)
    if scale == "O(1)":
        return math.sqrt(n)
    return 1.0


@pytest.mark.parametrize(
    "n,scale,expected",
    [(12, "O(logn)", 2.017), (12, "O(1)", 3.464), (36, "O(logn)", 3.041), (36, "O(1)", 6.0),
     (200, "O(logn)", 6.075), (200, "O(1)", 14.142), (12, "O(n)", 1.0), (12, "default", 2.017)],
)
def test_anchor_numbers(n, scale, expected):
    assert calculate_init(n, scale) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n", GRID_N)
def test_formula_written_out(n, scale):
    assert calculate_init(n, scale) == pytest.approx(written_out(n, scale), rel=1e-12)


def test_default_is_logn():
    assert calculate_init(24) == calculate_init(24, "O(logn)") == calculate_init(24, "default")
    assert as_module(24).omega.item() == pytest.approx(calculate_init(24, "O(logn)"))


@pytest.fixture(scope="module")
def peer():
    return require_peer("admin_torch")


@pytest.mark.parametrize("fn", ["calculate_init", "as_module", "as_buffer", "as_parameter"])
def test_signatures_match_0_1_0(peer, fn):
    ours = inspect.signature(getattr(admin_torch, fn)).parameters
    theirs = inspect.signature(getattr(peer, fn)).parameters
    assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in theirs.values()]


def test_omega_residual_signature_matches_0_1_0(peer):
    ours = inspect.signature(OmegaResidual.__init__).parameters
    theirs = inspect.signature(peer.OmegaResidual.__init__).parameters
    assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in theirs.values()]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n", GRID_N)
def test_numbers_match_0_1_0(peer, n, scale):
    assert calculate_init(n, scale) == peer.calculate_init(n, scale)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n", [1, 6, 12, 36, 200])
@pytest.mark.parametrize("param", [False, True])
def test_modules_compute_the_same_as_0_1_0(peer, n, scale, param):
    dim = 8
    kw = dict(as_parameter=param, embed_dim=dim if param else None)
    ours, theirs = as_module(n, scale, **kw), peer.as_module(n, scale, **kw)
    assert ours.omega.shape == theirs.omega.shape and ours.omega.dtype == theirs.omega.dtype
    assert isinstance(ours.omega, nn.Parameter) == isinstance(theirs.omega, nn.Parameter) == param
    g = torch.Generator().manual_seed(n)
    for shape in [(dim,), (3, dim), (2, 5, dim)]:
        x, f = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        torch.testing.assert_close(ours(x, f), theirs(x, f), rtol=0, atol=0)
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"omega"}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n", [1, 12, 200])
def test_register_functions_match_0_1_0(peer, n, scale):
    a, b = nn.Module(), nn.Module()
    as_buffer(a, "w", n, scale)
    peer.as_buffer(b, "w", n, scale)
    as_parameter(a, "p", n, 4, scale)
    peer.as_parameter(b, "p", n, 4, scale)
    assert dict(a.named_buffers()).keys() == dict(b.named_buffers()).keys() == {"w"}
    assert dict(a.named_parameters()).keys() == dict(b.named_parameters()).keys() == {"p"}
    for k in ("w", "p"):
        ta, tb = getattr(a, k), getattr(b, k)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb)


def test_omega_one_reads_loaded_state(peer):
    # 0.1.0 binds forward to x + f_x when omega == 1, so a loaded omega is ignored; ours uses it.
    res = OmegaResidual(1.0)
    res.load_state_dict({"omega": torch.tensor([3.0])})
    x, f = torch.ones(2), torch.zeros(2)
    assert torch.equal(res(x, f), torch.full((2,), 3.0))


@pytest.mark.parametrize("param", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_output_dtype_follows_the_model(dtype, param):
    res = as_module(12, as_parameter=param, embed_dim=6 if param else None).to(dtype)
    assert res.omega.dtype == dtype
    x, f = torch.randn(3, 6, dtype=dtype), torch.randn(3, 6, dtype=dtype)
    y = res(x, f)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), x.double() * calculate_init(12) + f.double(), rtol=1e-2, atol=1e-2)


def test_half_and_bfloat16_methods():
    for method, dtype in (("half", torch.float16), ("bfloat16", torch.bfloat16)):
        res = getattr(as_module(12), method)()
        x = torch.randn(4, dtype=dtype)
        assert res(x, x).dtype == dtype


@pytest.mark.parametrize("param", [False, True])
def test_autocast_keeps_activation_dtype(param):
    lin = nn.Linear(6, 6)
    res = as_module(12, as_parameter=param, embed_dim=6 if param else None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(torch.randn(2, 6))  # bfloat16 under autocast
        assert h.dtype == torch.bfloat16
        assert res(h, h).dtype == torch.bfloat16  # 0.1.0's float32 buffer would promote to float32
        if param:
            res(h, h).float().sum().backward()
            assert res.omega.grad is not None and res.omega.grad.dtype == torch.float32


@pytest.mark.cuda
def test_cuda_follows_model():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    res = as_module(12).cuda().half()
    x = torch.randn(4, 8, device="cuda", dtype=torch.half)
    y = res(x, x)
    assert y.device.type == "cuda" and y.dtype == torch.half
    with torch.autocast("cuda", dtype=torch.float16):
        h = nn.Linear(8, 8).cuda()(torch.randn(2, 8, device="cuda"))
        assert as_module(12).cuda()(h, h).dtype == torch.float16


@pytest.mark.parametrize("param", [False, True])
def test_state_dict_round_trip(param):
    kw = dict(as_parameter=param, embed_dim=5 if param else None)
    src = as_module(36, "O(1)", **kw)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = as_module(6, **kw)
    dst.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(dst.omega, src.omega)
    x = torch.randn(2, 5)
    assert torch.equal(dst(x, x), src(x, x))


BAD_CALLS = [
    (lambda: calculate_init(12, "O(n^2)"), ValueError, "output_change_scale"),
    (lambda: calculate_init(12, 1), TypeError, "output_change_scale"),
    (lambda: calculate_init(0), ValueError, "num_res_layers"),
    (lambda: calculate_init(-3), ValueError, "num_res_layers"),
    (lambda: calculate_init(12.5), ValueError, "num_res_layers"),
    (lambda: calculate_init(True), TypeError, "num_res_layers"),
    (lambda: calculate_init("12"), TypeError, "num_res_layers"),
    (lambda: as_module(12, as_parameter=True), ValueError, "embed_dim"),
    (lambda: as_module(12, as_parameter=True, embed_dim=0), ValueError, "embed_dim"),
    (lambda: OmegaResidual(2.0, as_parameter=True), ValueError, "embed_dim"),
    (lambda: OmegaResidual("2"), TypeError, "init_value"),
    (lambda: OmegaResidual(float("nan")), ValueError, "init_value"),
    (lambda: as_buffer(object(), "w", 12), TypeError, "network"),
    (lambda: as_parameter([], "w", 12, 4), TypeError, "network"),
    (lambda: as_buffer(nn.Linear(2, 2), "weight", 12), ValueError, "buffer_name"),
    (lambda: as_parameter(nn.Linear(2, 2), "bias", 12, 2), ValueError, "parameter_name"),
    (lambda: as_parameter(nn.Module(), "w", 12, None), TypeError, "embed_dim"),
    (lambda: as_buffer(nn.Module(), "w", 0), ValueError, "num_res_layers"),
    (lambda: as_buffer(nn.Module(), "w", 12, "O(2)"), ValueError, "O\\(logn\\)"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_existing_name_is_not_overwritten():
    m = nn.Module()
    as_buffer(m, "omega", 12)
    with pytest.raises(ValueError, match="omega"):
        as_parameter(m, "omega", 12, 4)
    assert m.omega.shape == (1,)


def test_import_does_not_import_fairseq():
    code = "import sys, admin_torch; sys.exit(1 if any(k.split('.')[0] == 'fairseq' for k in sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("param", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rescale_sum_is_the_residual_from_the_plain_sum(param, dtype):
    """``rescale_sum(x, x + f)`` = ``x * omega + f`` (written out), with the same gradients (to rounding), in the
    activation dtype; a hook on the module still reads ``(x, f)``."""
    torch.manual_seed(0)
    res = OmegaResidual(1.7, as_parameter=param, embed_dim=8 if param else None)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    f = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 8, dtype=torch.float64)
    out = res.rescale_sum(x.to(dtype), (x + f).to(dtype))
    assert out.dtype == dtype
    expected = x * 1.7 + f
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.double(), expected, **tol)
    grads = torch.autograd.grad((out.double() * w).sum(), [x, f])
    torch.testing.assert_close(grads[0], w * 1.7, **tol)
    torch.testing.assert_close(grads[1], w, **tol)
    seen = []
    res.register_forward_hook(lambda m, args, out: seen.append(args))
    res.rescale_sum(x.detach(), (x + f).detach())
    (hx, hf), = seen
    assert torch.equal(hx, x.detach()) and torch.allclose(hf, f.detach())


def test_rescale_sum_follows_every_change_of_omega():
    """The number rescale_sum reads omega as is read again whenever omega changes (set_omega_, load_state_dict,
    an in-place write, a dtype change): each result equals the written-out x * omega + f with the new omega."""
    res = OmegaResidual(2.0)
    x, f = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)

    def check(omega):
        torch.testing.assert_close(res.rescale_sum(x.to(res.omega.dtype), (x + f).to(res.omega.dtype)).double(),
                                   x * omega + f, rtol=1e-6, atol=1e-6)

    check(2.0)
    res.set_omega_(3.5)
    check(3.5)
    res.load_state_dict({"omega": torch.tensor([0.25])})
    check(0.25)
    with torch.no_grad():
        res.omega.mul_(4)
    check(1.0)
    res.double().set_omega_(1.75)
    check(1.75)
    res.to(torch.bfloat16).set_omega_(1.5)  # half precision: omega - 1 applied as a number
    torch.testing.assert_close(res.rescale_sum(x.bfloat16(), (x + f).bfloat16()).double(), x * 1.5 + f,
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rescale_sum_first_run_under_inference_mode_then_trains(dtype):
    """omega - 1 is kept between calls; made under torch.inference_mode it would be an inference tensor, which
    backward cannot save: a module evaluated before it trains must still back-propagate, d/dx (x omega + f) = omega."""
    res = OmegaResidual(3.0).to(dtype)
    x, f = torch.randn(4, 8, dtype=dtype), torch.randn(4, 8, dtype=dtype)
    with torch.inference_mode():
        res.rescale_sum(x, x + f)
    xg = x.clone().requires_grad_()
    res.rescale_sum(xg, xg + f).sum().backward()
    torch.testing.assert_close(xg.grad, torch.full_like(x, 3.0))


def _fresh_rescale(omega: torch.Tensor, x, s, hooked: bool):
    """rescale_sum of a new module with this omega (and a forward hook if ``hooked``): its first call, which takes
    the checked path (nothing cached yet); the exception type if it raises."""
    fresh = OmegaResidual(1.0).to(omega.dtype)
    fresh.set_omega_(float(omega))
    if hooked:
        fresh.register_forward_hook(lambda m, a, o: None)
    try:
        return fresh.rescale_sum(x, s)
    except (TypeError, ValueError, RuntimeError) as e:
        return type(e)


_OPERANDS = {
    "same shape": lambda: (torch.randn(3, 8), torch.randn(3, 8)),
    "float64": lambda: (torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)),
    "broadcast s": lambda: (torch.randn(3, 8), torch.randn(8)),
    "broadcast x": lambda: (torch.randn(1, 8), torch.randn(3, 8)),
    "mixed dtypes": lambda: (torch.randn(3, 8), torch.randn(3, 8, dtype=torch.float64)),
    "bfloat16": lambda: (torch.randn(3, 8).bfloat16(), torch.randn(3, 8).bfloat16()),
    "integer x": lambda: (torch.arange(24).reshape(3, 8), torch.randn(3, 8)),
    "no broadcast": lambda: (torch.randn(3, 8), torch.randn(4, 8)),
    "parameter x": lambda: (nn.Parameter(torch.randn(3, 8)), torch.randn(3, 8)),
    "bool s": lambda: (torch.randn(3, 8), torch.ones(3, 8, dtype=torch.bool)),
    "meta x": lambda: (torch.randn(3, 8, device="meta"), torch.randn(3, 8)),
}

_CHANGES = {
    "none": lambda res: None,
    "set_omega_": lambda res: res.set_omega_(0.5),
    "in-place write": lambda res: torch.no_grad()(res.omega.mul_)(3.0),  # (through .data: no version bump, unseen)
    "load_state_dict": lambda res: res.load_state_dict({"omega": torch.tensor([2.25])}),
    "new buffer": lambda res: setattr(res, "omega", torch.tensor([0.75])),
    "double": lambda res: res.double(),
    "forward hook": lambda res: res.register_forward_hook(lambda m, a, o: None),
}


@pytest.mark.parametrize("change", sorted(_CHANGES))
@pytest.mark.parametrize("operands", sorted(_OPERANDS))
def test_rescale_sum_after_its_cache_is_made_equals_a_fresh_modules(operands, change):
    """The common case is decided on a cache made by an earlier call (`_cached_rescale_weight`): after any change
    of omega or of the module, and for any operands, a call gives what a new module's first call (the checked
    path) gives, bit for bit, or raises the same kind of error; a hook added after the cache still sees the
    call (x, f_x)."""
    torch.manual_seed(0)
    res = OmegaResidual(1.7)
    warm = torch.randn(3, 8)
    res.rescale_sum(warm, warm + 1)  # the cache is made
    _CHANGES[change](res)
    seen = []
    if change == "forward hook":
        res._forward_hooks.clear()
        res.register_forward_hook(lambda m, a, o: seen.append(a))
    x, s = _OPERANDS[operands]()
    want = _fresh_rescale(res.omega.detach(), x, s, hooked=change == "forward hook")
    for _ in range(2):  # the second call: the cache made again (or kept) by the first
        if isinstance(want, type):
            with pytest.raises(want):
                res.rescale_sum(x, s)
            continue
        got = res.rescale_sum(x, s)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want) if got.device.type != "meta" else True
    if change == "forward hook" and not isinstance(want, type):
        assert len(seen) == 2 and torch.equal(seen[0][0], x)
