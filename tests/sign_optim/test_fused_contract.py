"""The fused operator's contract (sign_optim.fused, docs/sign_optim.md): autograd (version counters, grad mode),
aliasing, devices, a finite coefficient table, torch.lerp's moving average, and torch's intra-op threads.

Each refusal is a ValueError/TypeError naming the argument, raised before any tensor changes; the references are
torch's own conventions (what an in-place torch op, torch.lerp and torch.optim do with the same input)."""

import pytest
import torch

from sign_optim import AddSign, PowerSign, fused

pytestmark = pytest.mark.skipif(not fused.available(torch.device("cpu")),
                                reason=f"the C kernel is not built: {fused.unavailable_reason(torch.device('cpu'))}")

PATHS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "single": dict(foreach=False, fused=False)}


def table(lr=0.1, alpha=1.0, decay=1.0, rows=1):
    return fused.kernel_coefficients([(alpha, decay, 0.0)] * rows, lr=lr, weight_decay=0.0)


def args(n=5, count=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ([torch.randn(n, generator=gen) for _ in range(count)], [torch.randn(n, generator=gen) for _ in range(count)],
            [torch.randn(n, generator=gen) for _ in range(count)], [torch.zeros(()) for _ in range(count)])


def snapshot(*lists):
    return [[t.detach().clone() for t in ts] for ts in lists]


def assert_same(before, *lists):
    for old, ts in zip(before, lists):
        for a, b in zip(old, ts):
            if a.device.type != "meta":
                assert torch.equal(a, b.detach())


# ------------------------------------------------------------------ autograd
def test_the_operator_bumps_the_version_of_every_tensor_it_writes():
    p, g, m, s = args()
    before = [t._version for t in (*p, *g, *m, *s)]
    fused.fused_sign_(p, g, m, s, table(), beta=0.9, maximize=False)
    after = [t._version for t in (*p, *g, *m, *s)]
    assert after[0] > before[0] and after[2] > before[2] and after[3] > before[3]  # p, m, step written
    assert after[1] == before[1]  # the gradient is only read


@pytest.mark.parametrize("cls", [AddSign, PowerSign])
@pytest.mark.parametrize("path", list(PATHS))
def test_backward_through_weights_saved_before_a_step_raises_on_every_path(cls, path):
    """torch.optim.Adam makes a backward through a graph that saved the weights raise after its step (the version
    counter): every path here does the same, the fused one included, at its first step and its later ones."""
    for steps in (1, 2):
        w = torch.nn.Parameter(torch.randn(4))
        opt = cls([w], lr=0.1, **PATHS[path])
        for _ in range(steps - 1):
            w.grad = torch.randn(4)
            opt.step()
        loss = (w * torch.randn(4, requires_grad=True)).sum()  # saves w
        w.grad = torch.randn(4)
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    for foreach in (False, True):  # the reference convention (torch 2.13's CPU fused Adam does not bump them)
        adam_w = torch.nn.Parameter(torch.randn(4))
        adam = torch.optim.Adam([adam_w], foreach=foreach)
        loss = (adam_w * torch.randn(4, requires_grad=True)).sum()
        adam_w.grad = torch.randn(4)
        adam.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_grad_mode_with_a_tensor_that_requires_grad_is_refused_and_changes_nothing():
    p, g, m, s = args()
    w = torch.nn.Parameter(p[0])
    before = snapshot([w], g, m, s)
    with pytest.raises(ValueError, match=r"params\[0\] requires grad while grad mode is on"):
        fused.fused_sign_([w], g, m, s, table(), beta=0.9, maximize=False)
    assert_same(before, [w], g, m, s)
    with torch.no_grad():  # as optimizer.step() calls it
        fused.fused_sign_([w], g, m, s, table(), beta=0.9, maximize=False)
    assert not torch.equal(w.detach(), before[0][0])


def test_inference_tensors_are_written_only_inside_inference_mode():
    with torch.inference_mode():
        p, g, m, s = args()
    before = snapshot(p, g, m, s)
    with pytest.raises(ValueError, match=r"params\[0\] is an inference tensor"):
        fused.fused_sign_(p, g, m, s, table(), beta=0.9, maximize=False)
    assert_same(before, p, g, m, s)
    with torch.inference_mode():
        fused.fused_sign_(p, g, m, s, table(), beta=0.9, maximize=False)
    assert float(s[0]) == 1


# ------------------------------------------------------------------ aliasing
def _aliased(case):
    p, g, m, s = args(n=8, count=2)
    if case == "average is its parameter":
        m[0] = p[0]
    elif case == "gradient is its parameter":
        g[1] = p[1]
    elif case == "gradient is a view of its parameter":
        g[0] = p[0].view(2, 4).view(8)
    elif case == "gradient overlaps another parameter":
        base = torch.randn(12)
        p[0], g[1] = base[:8], base[4:]
    elif case == "parameter listed twice":
        p[1] = p[0]
    elif case == "step counter shared":
        s[1] = s[0]
    return p, g, m, s


@pytest.mark.parametrize("case", ["average is its parameter", "gradient is its parameter",
                                  "gradient is a view of its parameter", "gradient overlaps another parameter",
                                  "parameter listed twice", "step counter shared"])
def test_memory_shared_with_a_written_tensor_is_refused_and_changes_nothing(case):
    p, g, m, s = _aliased(case)
    before = snapshot(p, g, m, s)
    with pytest.raises(ValueError, match=r"\w+\[\d\] shares memory with \w+\[\d\]"):
        fused.fused_sign_(p, g, m, s, table(rows=2), beta=0.9, maximize=False)
    assert_same(before, p, g, m, s)


def test_gradients_may_share_memory_with_each_other():
    """Gradients are only read: two parameters with one gradient tensor get the same update as with copies."""
    p, g, m, s = args(count=2)
    g[1] = g[0]
    q, h, n, t = [x.clone() for x in p], [g[0].clone(), g[0].clone()], [x.clone() for x in m], [x.clone() for x in s]
    fused.fused_sign_(p, g, m, s, table(rows=2), beta=0.9, maximize=False)
    fused.fused_sign_(q, h, n, t, table(rows=2), beta=0.9, maximize=False)
    for a, b in zip(p + m, q + n):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ devices and the table
@pytest.mark.parametrize("where", ["params", "grads", "exp_avgs"])
def test_a_meta_tensor_among_cpu_tensors_is_refused_and_changes_nothing(where):
    """The dispatcher sends a call holding any meta tensor to the Meta kernel: it refuses the mix instead of
    returning without doing anything."""
    p, g, m, s = args(count=2)
    {"params": p, "grads": g, "exp_avgs": m}[where][1] = torch.zeros(5, device="meta")
    before = snapshot(p, g, m, s)
    with pytest.raises(ValueError, match=rf"{where}\[1\] is on meta"):
        fused.fused_sign_(p, g, m, s, table(rows=2), beta=0.9, maximize=False)
    assert_same(before, p, g, m, s)


def test_an_all_meta_call_changes_nothing_and_is_checked():
    p, g, m = ([torch.zeros(5, device="meta")] for _ in range(3))
    fused.fused_sign_(p, g, m, [torch.zeros(())], table(), beta=0.9, maximize=False)
    with pytest.raises(ValueError, match="its gradient 8"):
        fused.fused_sign_(p, [torch.zeros(8, device="meta")], m, [torch.zeros(())], table(), beta=0.9, maximize=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("column", [0, 1, 2, 3])
def test_a_non_finite_coefficient_is_refused_and_changes_nothing(bad, column):
    p, g, m, s = args(count=2)
    coefficients = table(rows=2)
    coefficients[1, column] = bad
    before = snapshot(p, g, m, s)
    with pytest.raises(ValueError, match="coefficients must be finite.*row 1"):
        fused.fused_sign_(p, g, m, s, coefficients, beta=0.9, maximize=False)
    assert_same(before, p, g, m, s)


@pytest.mark.parametrize("beta", [-0.1, 1.0, float("nan")])
def test_beta_outside_0_1_is_refused(beta):
    p, g, m, s = args()
    before = snapshot(p, g, m, s)
    with pytest.raises(ValueError, match="beta must be in"):
        fused.fused_sign_(p, g, m, s, table(), beta=beta, maximize=False)
    assert_same(before, p, g, m, s)


# ------------------------------------------------------------------ the moving average is torch.lerp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.7, 0.9, 0.999])
def test_moving_average_is_torch_lerp_on_both_sides_of_weight_one_half(dtype, beta):
    """torch.lerp switches formula at weight 0.5 (so weight 1, beta 0, gives the gradient exactly): the operator's
    average is torch.lerp's to 1 ulp at every beta, exactly m = g at beta 0 even after a huge average."""
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(4099, generator=gen).to(dtype)
    g = torch.randn(4099, generator=gen).to(dtype)
    avg_dtype = fused.state_dtype(dtype)
    m = (torch.randn(4099, generator=gen) * 1e6).to(avg_dtype)
    want = torch.lerp(m, g.to(avg_dtype), 1.0 - beta)
    fused.fused_sign_([p], [g], [m], [torch.zeros(())], table(), beta=beta, maximize=False)
    if beta == 0.0:
        assert torch.equal(m, g.to(avg_dtype))
    diff = (m.double() - want.double()).abs()
    assert (diff <= torch.finfo(avg_dtype).eps * want.double().abs().clamp(min=1e-3)).all()


@pytest.mark.parametrize("cls", [AddSign, PowerSign])
@pytest.mark.parametrize("path", list(PATHS))
def test_beta_zero_makes_the_average_the_gradient_on_every_path(cls, path):
    w = torch.nn.Parameter(torch.randn(300))
    opt = cls([w], lr=1e-3, beta=0.0, **PATHS[path])
    for scale in (1e7, 1.0):  # a huge gradient first, then a small one: m must be the small one exactly
        w.grad = torch.randn(300) * scale
        opt.step()
    assert torch.equal(opt.state[w]["exp_avg"], w.grad)


# ------------------------------------------------------------------ threads
@pytest.mark.parametrize("threads", [1, 2])
def test_the_operator_runs_on_torchs_intra_op_thread_count(threads):
    """The operator's block scheduler uses torch.set_num_threads's count (1 on every count when the extension is
    built without OpenMP: at::parallel_for is then serial)."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert fused.parallel_probe(64) == threads
        assert fused.parallel_probe(1) == 1  # one block: no parallel region
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------ torch's gradient-scaler flag
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_found_inf_set_writes_nothing_and_zero_is_the_plain_step(dtype):
    """``found_inf`` non-zero (gradients with inf and NaN, as a GradScaler's overflow leaves them): the operator
    writes no parameter, average or counter; ``found_inf`` 0 is the call without the flag, bit for bit."""
    params, grads, avgs, steps = args(n=40, count=3)
    params = [p.to(dtype) for p in params]
    grads = [g.to(dtype) for g in grads]
    grads[1][3], grads[2][0] = float("inf"), float("nan")
    before = snapshot(params, avgs, steps)
    fused.fused_sign_(params, grads, avgs, steps, table(), beta=0.9, maximize=False, found_inf=torch.ones(()))
    assert_same(before, params, avgs, steps)
    grads[1][3], grads[2][0] = 0.5, -0.25
    plain = snapshot(params, avgs, steps)
    fused.fused_sign_(params, grads, avgs, steps, table(), beta=0.9, maximize=False, found_inf=torch.zeros(1))
    ref_p, ref_m, ref_s = plain
    fused.fused_sign_(ref_p, grads, ref_m, ref_s, table(), beta=0.9, maximize=False)
    assert_same([ref_p, ref_m, ref_s], params, avgs, steps)
    assert all(float(s) == 1.0 for s in steps)


@pytest.mark.parametrize("flag", [torch.ones(2), torch.ones((), device="meta")])
def test_a_found_inf_that_is_not_one_element_on_the_device_is_refused(flag):
    params, grads, avgs, steps = args()
    before = snapshot(params, avgs, steps)
    with pytest.raises(ValueError, match="found_inf"):
        fused.fused_sign_(params, grads, avgs, steps, table(), beta=0.9, maximize=False, found_inf=flag)
    assert_same(before, params, avgs, steps)
