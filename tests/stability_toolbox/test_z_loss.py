"""z-loss against the written-out formula; zero weight is exactly cross-entropy; the monitor's log Z."""

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
    mon.close()
    assert [h["step"] for h in mon.history] == [0, 2]
    for h, lz in zip(mon.history, (seen[0], seen[2])):
        assert h["log_z"] == pytest.approx(lz.mean().item(), rel=1e-5)
        assert h["log_z_rms"] == pytest.approx(lz.pow(2).mean().sqrt().item(), rel=1e-5)
    assert mon._log_z is None
    with pytest.raises(TypeError, match="logits"):
        mon.observe_logits([1.0])
    # the step handle: s.logits
    mon2 = StabilityMonitor(model, every=1, rules={})
    logits = torch.randn(3, 4) * 5
    with mon2.step() as s:
        model(torch.randn(2, 3, 8)).sum().backward()
        s.logits = logits
    assert mon2.history[0]["log_z"] == pytest.approx(logits.logsumexp(-1).mean().item(), rel=1e-6)
    mon2.close()
