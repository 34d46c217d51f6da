"""z-loss against the written-out formula; zero weight is exactly cross-entropy; F.cross_entropy's contract
(weights, smoothing, reductions) written out per position; padding-only and empty batches; half precision;
finite differences; torch.compile; bad input named; the monitor's log Z."""

import math

import pytest
import torch
import torch.nn.functional as F

from stability_toolbox import StabilityMonitor
from stability_toolbox.z_loss import cross_entropy_with_z_loss, log_z, z_loss


def _written_out(logits, target, weight, ignore_index=-100):
    """mean over kept positions of [-log softmax(l)_y + weight * (log sum_j exp l_j)^2], float64 loops."""
    total, n = 0.0, 0
    for row, y in zip(logits.double().reshape(-1, logits.shape[-1]), target.reshape(-1).tolist()):
        if y == ignore_index:
            continue
        lz = math.log(sum(math.exp(v) for v in row.tolist()))
        total += (lz - row[y].item()) + weight * lz * lz
        n += 1
    return total / n


def test_matches_the_formula_with_ignored_positions():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7) * 3 - 2
    target = torch.randint(0, 7, (3, 5))
    target[0, :2] = -100
    for weight in (1e-4, 0.5):
        got = cross_entropy_with_z_loss(logits, target, z_loss=weight)
        assert got.item() == pytest.approx(_written_out(logits, target, weight), rel=1e-6)
    # sum reduction and the term alone
    got = cross_entropy_with_z_loss(logits, target, z_loss=0.5, reduction="sum")
    assert got.item() == pytest.approx(_written_out(logits, target, 0.5) * 13, rel=1e-6)
    lz = torch.logsumexp(logits.double(), -1)
    assert z_loss(logits, 0.25).item() == pytest.approx((0.25 * lz ** 2).mean().item(), rel=1e-6)
    torch.testing.assert_close(log_z(logits).double(), lz)


def test_zero_weight_changes_nothing():
    torch.manual_seed(1)
    logits = torch.randn(6, 11, requires_grad=True)
    target = torch.randint(0, 11, (6,))
    target[2] = -100
    ce = F.cross_entropy(logits, target, label_smoothing=0.1)
    got = cross_entropy_with_z_loss(logits, target, z_loss=0.0, label_smoothing=0.1)
    assert torch.equal(got, ce)
    g1, = torch.autograd.grad(ce, logits)
    g2, = torch.autograd.grad(got, logits)
    assert torch.equal(g1, g2)


def test_gradient_pulls_log_z_toward_zero():
    logits = torch.full((1, 4), 3.0, requires_grad=True)   # log Z = 3 + log 4 > 0
    z_loss(logits, 1.0).backward()
    lz = 3 + math.log(4)
    torch.testing.assert_close(logits.grad, torch.full((1, 4), 2 * lz * 0.25))   # d/dl lz^2 = 2 lz softmax


def test_bad_arguments_are_named():
    logits, target = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="z_loss"):
        cross_entropy_with_z_loss(logits, target, z_loss=-1e-4)
    with pytest.raises(TypeError, match="target"):
        cross_entropy_with_z_loss(logits, target.float())
    with pytest.raises(TypeError, match="logits"):
        z_loss([1.0, 2.0])
    with pytest.raises(ValueError, match="reduction"):
        z_loss(logits, reduction="max")
    with pytest.raises(ValueError, match="mask"):
        z_loss(logits, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="target"):
        cross_entropy_with_z_loss(logits, torch.tensor([0, 1, 2]))


def test_monitor_records_log_z_on_logging_steps_only(tmp_path):
    from admin_torch import make_stack

    torch.manual_seed(2)
    model = make_stack("pre_ln", 1, 8, heads=2, seed=0)
    mon = StabilityMonitor(model, tmp_path, every=2, rules={}, tensorboard=False, heatmaps=False)
    seen = []
    for step in range(3):
        with mon.step():
            out = model(torch.randn(2, 3, 8))
            logits = torch.randn(2, 3, 5) * (step + 1)
            mon.observe_logits(logits)
            mon.observe_logits(logits + 1.0)   # two calls in a step: pooled
            seen.append(torch.cat([logits, logits + 1.0]).double().logsumexp(-1))
            out.sum().backward()
    with pytest.raises(TypeError, match="logits"):
        mon.observe_logits([1.0])
    mon.close()
    assert [h["step"] for h in mon.history] == [0, 2]
    for h, lz in zip(mon.history, (seen[0], seen[2])):
        assert h["log_z"] == pytest.approx(lz.mean().item(), rel=1e-5)
        assert h["log_z_rms"] == pytest.approx(lz.pow(2).mean().sqrt().item(), rel=1e-5)
    assert mon._log_z is None
    # the step handle: s.logits
    mon2 = StabilityMonitor(model, every=1, rules={})
    logits = torch.randn(3, 4) * 5
    with mon2.step() as s:
        model(torch.randn(2, 3, 8)).sum().backward()
        s.logits = logits
    assert mon2.history[0]["log_z"] == pytest.approx(logits.logsumexp(-1).mean().item(), rel=1e-6)
    mon2.close()


# ---------------------------------------------------------------- F.cross_entropy's contract, padding, precision

C = 6


def _torch_convention(logits, target, coef, weight=None, ignore_index=-100, reduction="mean", eps=0.0):
    """F.cross_entropy's documented loss plus z-loss, written out per position in float64 loops: a kept position
    with target y scores ``(1 - eps) * w_y * -log p_y + eps / C * sum_c w_c * -log p_c``; ``mean`` divides the
    cross-entropy by ``sum w_y`` over kept positions and the z-loss ``coef * logZ^2`` by their count."""
    rows = logits.double().reshape(-1, logits.shape[-1]).tolist()
    w = [1.0] * logits.shape[-1] if weight is None else weight.double().tolist()
    per_ce, per_z, den, count = [], [], 0.0, 0
    for row, y in zip(rows, target.reshape(-1).tolist()):
        if y == ignore_index:
            per_ce.append(0.0)
            per_z.append(0.0)
            continue
        lz = math.log(sum(math.exp(v) for v in row))
        lp = [v - lz for v in row]
        per_ce.append((1 - eps) * w[y] * -lp[y] + eps / len(row) * sum(-wc * lpc for wc, lpc in zip(w, lp)))
        per_z.append(coef * lz * lz)
        den += w[y]
        count += 1
    if reduction == "none":
        return torch.tensor([a + b for a, b in zip(per_ce, per_z)], dtype=torch.float64).reshape(target.shape)
    if reduction == "sum":
        return torch.tensor(sum(per_ce) + sum(per_z), dtype=torch.float64)
    return torch.tensor((sum(per_ce) / den if den else 0.0) + (sum(per_z) / count if count else 0.0),
                        dtype=torch.float64)


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(20)
    logits = torch.randn(3, 4, C, generator=gen) * 2 - 1
    target = torch.randint(0, C, (3, 4), generator=gen)
    target[0, :3] = -100
    target[2, 1] = -100
    return logits, target, torch.rand(C, generator=gen) + 0.2


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_every_reduction_smoothing_and_class_weight_match_the_written_out_loss(batch, reduction, eps, weighted):
    logits, target, w = batch
    w = w if weighted else None
    for coef in (0.0, 0.3):
        got = cross_entropy_with_z_loss(logits, target, z_loss=coef, weight=w, reduction=reduction,
                                        label_smoothing=eps)
        assert got.shape == (target.shape if reduction == "none" else ())
        torch.testing.assert_close(got.double(), _torch_convention(logits, target, coef, w, -100, reduction, eps),
                                   atol=1e-6, rtol=1e-6)
    ref = F.cross_entropy(logits.reshape(-1, C), target.reshape(-1), weight=w, reduction=reduction,
                          label_smoothing=eps)
    assert torch.equal(cross_entropy_with_z_loss(logits, target, z_loss=0.0, weight=w, reduction=reduction,
                                                 label_smoothing=eps), ref.reshape(got.shape))


@pytest.mark.parametrize("shape", [(4, C), (0, C), (2, 0, C)], ids=["all-padding", "empty", "empty-3d"])
@pytest.mark.parametrize("eps, weighted", [(0.0, False), (0.1, False), (0.1, True)])
def test_a_batch_with_nothing_to_score_is_a_zero_loss_with_a_zero_gradient(shape, eps, weighted):
    """F.cross_entropy's mean is NaN there; the documented answer is 0 and a zero gradient (``'sum'`` too)."""
    logits = (torch.randn(shape) * 3).requires_grad_()
    target = torch.full(shape[:-1], 7, dtype=torch.long)  # a custom ignore_index
    w = torch.rand(C) + 0.1 if weighted else None
    if logits.numel():
        assert F.cross_entropy(logits.detach().reshape(-1, C), target.reshape(-1), weight=w, ignore_index=7,
                               label_smoothing=eps).isnan()
    for reduction in ("mean", "sum"):
        for coef in (0.0, 1e-4):
            loss = cross_entropy_with_z_loss(logits, target, z_loss=coef, weight=w, ignore_index=7,
                                             reduction=reduction, label_smoothing=eps)
            assert loss.item() == 0.0
            grad, = torch.autograd.grad(loss, logits)
            assert torch.equal(grad, torch.zeros_like(logits))
    assert z_loss(logits.detach(), mask=target != 7).item() == 0.0
    assert z_loss(logits.detach()[:0]).item() == 0.0


def test_zero_class_weight_on_every_counted_target_is_zero_not_nan():
    logits, target = torch.randn(3, C), torch.tensor([1, 1, -100])
    w = torch.ones(C)
    w[1] = 0.0
    assert F.cross_entropy(logits, target, weight=w).isnan()
    assert cross_entropy_with_z_loss(logits, target, weight=w, z_loss=0.0).item() == 0.0
    torch.testing.assert_close(cross_entropy_with_z_loss(logits, target, weight=w, z_loss=0.5),
                               0.5 * logits[:2].logsumexp(-1).pow(2).mean())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradients_match_finite_differences(batch, reduction):
    logits, target, w = batch
    x = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: cross_entropy_with_z_loss(x, target, z_loss=0.3, weight=w.double(), reduction=reduction,
                                            label_smoothing=0.1), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_scored_in_float32(dtype):
    """Logits around 250: log(Z)^2 ~ 6e4 and a summed loss past float16's range; the loss is float32, the value
    of the float32 logits exactly, and the gradient comes back in the logits' dtype."""
    gen = torch.Generator().manual_seed(21)
    logits = (torch.randn(64, C, generator=gen) + 250).to(dtype).requires_grad_()
    target = torch.randint(0, C, (64,), generator=gen)
    for reduction in ("mean", "sum"):
        loss = cross_entropy_with_z_loss(logits, target, z_loss=1.0, reduction=reduction)
        want = cross_entropy_with_z_loss(logits.detach().float(), target, z_loss=1.0, reduction=reduction)
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.equal(loss, want)
        grad, = torch.autograd.grad(loss, logits)
        assert grad.dtype == dtype
    assert z_loss(logits.detach()).dtype == torch.float32
    assert torch.equal(cross_entropy_with_z_loss(logits.detach(), target, z_loss=0.0),
                       F.cross_entropy(logits.detach().float(), target))


def test_non_contiguous_logits_and_targets(batch):
    logits, target, w = batch
    lt, tt = logits.transpose(0, 1), target.T  # views with other strides
    assert not lt.is_contiguous() and not tt.is_contiguous()
    for reduction in ("mean", "none"):
        got = cross_entropy_with_z_loss(lt, tt, z_loss=0.3, weight=w, reduction=reduction, label_smoothing=0.1)
        want = cross_entropy_with_z_loss(lt.contiguous(), tt.contiguous(), z_loss=0.3, weight=w,
                                         reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(got, want)


def test_compiles_without_graph_breaks(batch):
    logits, target, w = batch
    fn = torch.compile(lambda x, t: cross_entropy_with_z_loss(x, t, z_loss=1e-4, weight=w, label_smoothing=0.1),
                       fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(logits, target),
                               cross_entropy_with_z_loss(logits, target, z_loss=1e-4, weight=w, label_smoothing=0.1))


BAD = [
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be a finite real number in [0, 1]"),
    (dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be a finite real number in [0, 1], got 1.5"),
    (dict(label_smoothing="0.1"), TypeError, "label_smoothing"),
    (dict(target=torch.tensor([0, C])), ValueError, f"target must hold class indices in [0, {C})"),
    (dict(target=torch.tensor([-1, 0])), ValueError, "target must hold class indices"),
    (dict(target=torch.tensor([0, 1]), ignore_index=1.5), TypeError, "ignore_index"),
    (dict(ignore_index=2 ** 70), ValueError, "ignore_index must be an integer >= "),
    (dict(target=torch.tensor([[0, 1]])), ValueError, "target must have shape logits.shape[:-1] = (2,)"),
    (dict(target=torch.tensor([0.0, 1.0])), TypeError, "target"),
    (dict(weight=torch.ones(C + 1)), ValueError, f"weight must have shape ({C},)"),
    (dict(weight=[1.0] * C), TypeError, "weight"),
    (dict(weight=-torch.ones(C)), ValueError, "weight must hold finite class weights >= 0"),
    (dict(weight=torch.full((C,), float("nan"))), ValueError, "weight"),
    (dict(reduction="max"), ValueError, "reduction must be one of ['mean', 'sum', 'none']"),
    (dict(z_loss=float("nan")), ValueError, "z_loss"),
    (dict(logits=torch.randn(2, C).long()), TypeError, "logits must be a floating tensor"),
    (dict(logits=torch.randn(2, 0)), ValueError, "logits"),
]


@pytest.mark.parametrize("kw, error, message", BAD, ids=[" ".join(map(str, b[0])) + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument_and_what_it_accepts(kw, error, message):
    logits = torch.randn(2, C, requires_grad=True)
    call = {"logits": logits, "target": torch.tensor([0, 3]), **kw}
    with pytest.raises(error) as err:
        cross_entropy_with_z_loss(call.pop("logits"), call.pop("target"), **call)
    assert message in str(err.value)
    assert logits.grad is None


def test_z_loss_term_bad_mask_is_named():
    logits = torch.randn(2, 3)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        z_loss(logits, mask=torch.ones(2))
    with pytest.raises(ValueError, match=r"mask must have shape logits.shape\[:-1\] = \(2,\)"):
        z_loss(logits, mask=torch.ones(3, dtype=torch.bool))


# ---------------------------------------------------------------------- adversarial review: dtypes and devices

@pytest.mark.parametrize("dtype, ignore_index, bad", [
    (torch.uint8, -100, 156),   # uint8 reads -100 as 156: 156 was silently ignored instead of refused
    (torch.int8, 300, 44),      # int8 reads 300 as 44: 44 reached F.cross_entropy (a bare IndexError)
    (torch.int16, 70000, 4464),
])
def test_a_narrow_target_dtype_never_wraps_ignore_index(dtype, ignore_index, bad):
    logits = torch.randn(3, C)
    with pytest.raises(ValueError, match=rf"target must hold class indices in \[0, {C}\) or "
                                         rf"ignore_index={ignore_index}"):
        cross_entropy_with_z_loss(logits, torch.tensor([0, bad, 1], dtype=dtype), ignore_index=ignore_index)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_integer_target_dtype_is_the_int64_loss(batch, dtype, reduction):
    logits, target, w = batch
    target = target.clamp_min(0) if dtype == torch.uint8 else target
    want = cross_entropy_with_z_loss(logits, target, weight=w, reduction=reduction)
    torch.testing.assert_close(cross_entropy_with_z_loss(logits, target.to(dtype), weight=w, reduction=reduction),
                               want)


@pytest.mark.parametrize("argument", ["target", "weight", "mask"])
def test_a_tensor_on_another_device_is_refused_by_name(batch, argument):
    """Before the review: a bare RuntimeError from inside the data check (``.item()`` of a meta tensor)."""
    logits, target, w = batch
    logits = logits.clone().requires_grad_()
    with pytest.raises(ValueError, match=rf"^{argument} must be on the device of logits \(cpu\), got a tensor on meta"):
        if argument == "mask":
            z_loss(logits, mask=torch.ones(logits.shape[:-1], dtype=torch.bool, device="meta"))
        else:
            cross_entropy_with_z_loss(logits, target.to("meta") if argument == "target" else target,
                                      weight=w.to("meta") if argument == "weight" else w)
    assert logits.grad is None


def test_torch_layout_of_k_dim_logits_is_refused_by_name():
    """``(N, C, d1, d2)`` logits with ``(N, d1, d2)`` targets (torch's layout): refused, naming the layout this
    function takes; moved to the last dimension they give F.cross_entropy's value."""
    gen = torch.Generator().manual_seed(21)
    logits, target = torch.randn(2, C, 3, 4, generator=gen), torch.randint(0, C, (2, 3, 4), generator=gen)
    with pytest.raises(ValueError, match=r"the class dimension of logits is the last"):
        cross_entropy_with_z_loss(logits, target)
    torch.testing.assert_close(cross_entropy_with_z_loss(logits.movedim(1, -1), target, z_loss=0.0),
                               F.cross_entropy(logits, target))


@pytest.mark.parametrize("call", ["ce-ignored", "ce-counted", "ce-no-z", "z_loss-masked"])
def test_a_position_with_every_logit_minus_inf_is_refused_not_a_nan_gradient(call):
    """Before the review an ignored position whose logits are all -inf (padding masked with -inf) gave a finite
    loss and a NaN gradient (F.cross_entropy does too): it poisons every parameter. Refused by name; with the
    data checks off it is torch's value (documented)."""
    logits = torch.randn(3, C, requires_grad=True)
    rows = torch.tensor([False, True, False])
    bad = logits.masked_fill(rows[:, None], float("-inf"))
    target = torch.tensor([1, 2 if call == "ce-counted" else -100, 0])
    run = {"ce-ignored": lambda: cross_entropy_with_z_loss(bad, target),
           "ce-counted": lambda: cross_entropy_with_z_loss(bad, target),
           "ce-no-z": lambda: cross_entropy_with_z_loss(bad, target, z_loss=0.0),
           "z_loss-masked": lambda: z_loss(bad, mask=~rows)}[call]
    with pytest.raises(ValueError, match="logits must have a logit above -inf at every position"):
        run()
    assert logits.grad is None
    partly = logits.masked_fill(torch.arange(C) == 0, float("-inf"))  # a -inf class is fine: a softmax exists
    cross_entropy_with_z_loss(partly, torch.tensor([1, -100, 2])).backward()
    assert torch.isfinite(logits.grad).all()
