"""The monitor's per-update rules (``signal_rules``, run at every update) used as an adversarial user would:
resumed runs, bad rules, non-finite / mixed-precision / missing / accumulated gradients, copies, closing twice,
no host read between logging steps, and two DDP ranks. Each expectation is worked out by hand from the rule's
formula (``stability_toolbox.signal_detector`` module docstring), not by the implementation.

Run as a script (``python test_monitor_signals_adversarial.py OUT``) it is one DDP rank of the two-rank test."""

import copy
import io
import json
import logging
import math
import pickle
import sys
from pathlib import Path

import pytest
import torch

from admin_torch import make_stack
from stability_toolbox import StabilityMonitor
from stability_toolbox import scalar_reader
from stability_toolbox.scalar_reader import ScalarReader
from stability_toolbox.signal_detector import DEFAULT_SIGNAL_RULES, SignalRule

EPS = 1e-8  # the unit of grad_rms_eps_min without an attached optimizer
# The default rule (falling x4; baseline 20, lag 5, smooth 3, persist 5, start 20) on a gradient RMS of 1e-6
# (100 eps) at every update before DROP and 1e-7 (10 eps) from DROP on: level_t = median of the last 3 values is
# 100 at DROP, 10 from DROP + 1 on (<= 100 / 4, the baseline's median 100 is over updates <= t - 6); it holds
# at DROP + 1, ..., DROP + 5 and fires there.
DROP = 30
PERSIST = 5
FIRES_AT = DROP + PERSIST


pytestmark = pytest.mark.usefixtures("quiet_log")


def _grad_rms(t: int) -> float:
    return 1e-6 if t < DROP else 1e-7


def _feed(mon, model, steps, rms=_grad_rms):
    """Updates ``steps``: every gradient entry set to ``rms(t)`` (so each layer's RMS is rms(t))."""
    from torch_helpers import feed_grads  # here: this file is also each DDP rank's script (tests/ not on its path)

    feed_grads(mon, model, steps, rms)


def _fired(mon):
    return [(w["update"], w["known_at"], w["message"]) for w in mon.warnings if "update" in w]


def test_the_default_rule_fires_where_the_formula_says(model):
    (rule,) = DEFAULT_SIGNAL_RULES  # the rule the hand computation above is for
    assert (rule.factor, rule.baseline, rule.lag, rule.smooth, rule.persist, rule.start) == (4.0, 20, 5, 3, PERSIST, 20)
    mon = StabilityMonitor(model, every=1000)
    _feed(mon, model, range(40))
    assert [(u, k) for u, k, _ in _fired(mon)] == [(FIRES_AT, FIRES_AT)]  # on a CPU known at once
    mon.close()


# before the drop; between the first hold and the firing; after the firing (it must not fire again)
@pytest.mark.parametrize("split", [10, DROP + 2, FIRES_AT + 2])
def test_a_resumed_monitor_warns_exactly_as_an_unbroken_one(model, split):
    unbroken = StabilityMonitor(model, every=1000)
    _feed(unbroken, model, range(40))
    first = StabilityMonitor(model, every=1000)
    _feed(first, model, range(split))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # a checkpoint, written and read back
    first.close()
    buf.seek(0)
    resumed = StabilityMonitor(model, every=1000)
    resumed.load_state_dict(torch.load(buf, weights_only=True))  # plain data: the safe loader reads it
    assert resumed.step_count == split
    _feed(resumed, model, range(split, 40))
    assert _fired(resumed) == [w for w in _fired(unbroken) if w[0] >= split]
    # without the state the rule starts over (26 values before its first check): it warns late or never
    fresh = StabilityMonitor(model, every=1000)
    fresh.begin_step(split)
    fresh.end_step()
    _feed(fresh, model, range(split + 1, 40))
    assert [u for u, _, _ in _fired(fresh)] in ([], [split + 1 + 26 + 1])
    assert _fired(resumed) != _fired(fresh) or split > FIRES_AT
    for m in (unbroken, resumed, fresh):
        m.close()


def test_load_state_dict_refuses_another_monitors_state_and_changes_nothing(model):
    mon = StabilityMonitor(model, every=1000)
    _feed(mon, model, range(5))
    state = mon.state_dict()
    other = StabilityMonitor(model, every=1000, signal_rules=[SignalRule("grad_norm", 2.0)])
    before = other.state_dict()
    bad = [None, {}, dict(state, step_count=-1), dict(state, eps=float("nan")), {**state, "extra": 1},
           dict(state, signal_detector={**state["signal_detector"], "held": [0, 0]})]
    for s in [state] + bad:
        with pytest.raises(ValueError, match="state"):
            other.load_state_dict(s)
        assert other.state_dict() == before and other.step_count == 0
    mon.close(), other.close()


@pytest.mark.parametrize("rules,exc,match", [
    ("grad_rms_eps_min", TypeError, r"signal_rules must be a list or tuple"),
    (DEFAULT_SIGNAL_RULES[0], TypeError, r"signal_rules must be a list or tuple"),
    ({"grad_norm": 2.0}, TypeError, r"signal_rules must be a list or tuple"),
    ([3], TypeError, r"signal_rules\[0\] must be a SignalRule"),
    (list(DEFAULT_SIGNAL_RULES) * 2, ValueError, r"signal_rules\[1\] repeats signal_rules\[0\]"),
    ((r for r in DEFAULT_SIGNAL_RULES), TypeError, r"signal_rules must be a list or tuple"),
])
def test_bad_signal_rules_are_named_and_attach_nothing(model, rules, exc, match):
    with pytest.raises(exc, match=match):
        StabilityMonitor(model, signal_rules=rules)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_an_isolated_overflow_is_silent_and_a_diverged_run_warns_once(model, bad, dtype):
    # an fp16 GradScaler's overflow step (inf gradients once, after unscale_) is routine: no warning; gradients
    # that stay non-finite (a diverged run) warn once, `persist` (5) updates in, and the run goes on
    model.to(dtype)
    mon = StabilityMonitor(model, every=1000)
    _feed(mon, model, range(30), rms=lambda t: bad if t == 22 else 1e-3)
    assert _fired(mon) == []
    _feed(mon, model, range(30, 40), rms=lambda t: bad)
    fired = _fired(mon)
    assert [(u, k) for u, k, _ in fired] == [(30 + PERSIST - 1,) * 2] and "non-finite" in fired[0][2]
    assert mon.step_count == 40
    mon.close()


def test_large_half_precision_gradients_are_no_false_non_finite_warning(model):
    # 6e4 per entry: the square overflows float16 (6e4^2 > 65504), the float32 norm does not
    model.to(torch.float16)
    mon = StabilityMonitor(model, every=1000)
    _feed(mon, model, range(8), rms=lambda t: 6e4)
    assert _fired(mon) == []
    assert list(mon._signal_detector._past["grad_rms_eps_min"]) == [pytest.approx(6e4 / EPS, rel=1e-3)] * 8
    mon.close()


def _layer_params(mon):
    return [[p for _, p in ps] for row, ps in mon._site_plan.groups if row != "(other)"]


def _expected(layers):
    """min over layers with a gradient of sqrt(sum g^2 / N) / eps, in float64, written out."""
    vals = []
    for ps in layers:
        gs = [p.grad.double() for p in ps if p.grad is not None]
        if gs:
            vals.append(math.sqrt(sum(float((g ** 2).sum()) for g in gs) / sum(g.numel() for g in gs)) / EPS)
    return min(vals)


def test_mixed_dtypes_frozen_layers_and_accumulation_read_the_formula(model):
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for i, m in enumerate(linears):  # float16, bfloat16, float64 and float32 parameters in one model
        m.to((torch.float16, torch.bfloat16, torch.float64, torch.float32)[i % 4])
    mon = StabilityMonitor(model, every=1000)
    layers = _layer_params(mon)
    for p in layers[0]:  # a frozen layer: no gradient, left out of the minimum
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    for p in model.parameters():
        p.grad = None
    mon.begin_step()
    for micro in range(3):  # gradient accumulation: three backward passes, one capture at the end
        for p in model.parameters():
            if p.requires_grad:
                d = torch.randn(p.shape, generator=g).to(p.dtype) * 1e-5
                p.grad = d if p.grad is None else p.grad + d
    mon.capture_grads()
    mon.end_step()
    got = mon._signal_detector._past["grad_rms_eps_min"][-1]
    assert got == pytest.approx(_expected(layers[1:]), rel=1e-3)
    mon.close()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_with_or_without_none_gives_the_same_warnings(model, set_to_none):
    """Every layer used at every step: zeroed and None gradients between steps read the same."""
    mon = StabilityMonitor(model, every=1000)
    for t in range(40):
        model.zero_grad(set_to_none=set_to_none)
        for p in model.parameters():
            p.grad = torch.full_like(p, _grad_rms(t)) if p.grad is None else p.grad.add_(_grad_rms(t))
        mon.begin_step()
        mon.capture_grads()
        mon.end_step()
    assert [u for u, _, _ in _fired(mon)] == [FIRES_AT]
    mon.close()


def test_a_model_with_no_layer_group_says_the_default_rule_is_off_and_refuses_it_explicitly(caplog):
    """A LayerNorm between two Linears: the monitor falls back to the LayerNorm as its site, but every parameter
    is in the "(other)" row, so the smallest layer's gradient RMS does not exist."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    with caplog.at_level(logging.INFO, logger="stability_toolbox.monitor"):
        mon = StabilityMonitor(mlp, every=1000)
    assert mon._signal_detector.rules == () and "grad_rms_eps_min is off" in caplog.text
    mon.close()
    with pytest.raises(ValueError, match=r"signal_rules\[0\].*no layer group"):
        StabilityMonitor(mlp, signal_rules=list(DEFAULT_SIGNAL_RULES))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in mlp.modules())
    grad_norm = StabilityMonitor(mlp, every=1000, signal_rules=[SignalRule("grad_norm", 2.0)])
    mlp(torch.randn(3, 4)).sum().backward()
    grad_norm.begin_step(), grad_norm.capture_grads(), grad_norm.end_step()
    want = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in mlp.parameters()))
    assert grad_norm._signal_detector._past["grad_norm"][-1] == pytest.approx(want, rel=1e-5)
    grad_norm.close()


def test_steps_without_a_backward_and_closing_twice(model):
    mon = StabilityMonitor(model, every=3)
    for _ in range(5):  # no gradient at all: nothing to read, nothing pending, no warning
        mon.begin_step()
        mon.capture_grads()
        mon.end_step()
    assert mon.step_count == 5 and mon._reader.pending == 0 and _fired(mon) == []
    text = mon.close()
    assert mon.close() == text
    with pytest.raises(RuntimeError, match="closed"):
        mon.end_step()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_monitor_carries_the_rules_state(model, how):
    mon = StabilityMonitor(model, every=1000)
    _feed(mon, model, range(DROP + 2))
    twin = copy.deepcopy(mon) if how == "deepcopy" else pickle.loads(pickle.dumps(mon))
    _feed(mon, model, range(DROP + 2, 40))
    _feed(twin, twin.model, range(DROP + 2, 40))
    assert [u for u, _, _ in _fired(twin)] == [u for u, _, _ in _fired(mon)] == [FIRES_AT]
    mon.close(), twin.close()


@pytest.mark.parametrize("host", [False, True], ids=["device", "host"])
def test_a_non_logging_step_reads_nothing_on_the_host(model, monkeypatch, host):
    """The default rules between logging steps: no tensor value is read on the host, and the reader is
    polled without waiting (block=False) at every end_step. The device path (a GPU's) is taken by telling the
    monitor that CPU tensors are no host memory; on the host path (a CPU's: reading is free there) the norms
    and the loss are read once each with ``item`` and nothing else is read."""
    mon = StabilityMonitor(model, every=100)
    _feed(mon, model, range(1))  # step 0: logged
    if not host:
        monkeypatch.setattr(scalar_reader, "host_memory", lambda device: False)
    items = []
    real_item = torch.Tensor.item
    polls = []
    real_ready = ScalarReader.ready

    def ready(self, block=False):
        polls.append(block)
        return real_ready(self, block)

    def refuse(*_a, **_k):
        raise AssertionError("a tensor value read on the host between logging steps")

    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-6)
    with monkeypatch.context() as m:
        m.setattr(ScalarReader, "ready", ready)
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu"):
            m.setattr(torch.Tensor, name, refuse)
        if host:  # one item per gradient norm and per loss, of CPU tensors (0-d)
            m.setattr(torch.Tensor, "item", lambda t: items.append(t.device.type) or real_item(t))
        for _ in range(3):
            mon.begin_step()
            mon.capture_grads()
            mon.end_step(torch.tensor(2.0))
    assert polls == [False] * 3
    n_grads = sum(1 for p in mon._layer_grads.params if p.grad is not None)  # the layers' (no model norm)
    assert items == (["cpu"] * (3 * (n_grads + 1)) if host else [])
    assert list(mon._signal_detector._past["grad_rms_eps_min"])[-3:] == [pytest.approx(100.0)] * 3
    mon.close()


# ---------------------------------------------------------------------------------------------- two DDP ranks

WORLD = 2


@pytest.mark.slow
def test_two_ddp_ranks_warn_alike_and_finish(tmp_path):
    """Each rank trains on its own data; the all-reduced gradients are the same, so each rank's rule reads the
    same values and warns at the same update; nothing the rule does is collective, so no rank waits."""
    from fairseq_helpers import run_script_ranks  # here: this file is also each rank's script

    codes, outs = run_script_ranks(__file__, [tmp_path], WORLD)
    assert codes == [0] * WORLD, "\n".join(outs)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert got[0] == got[1]
    assert got[0]["steps"] == 40 and [w[0] for w in got[0]["warnings"]] == [FIRES_AT]


def _ddp_worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = make_stack("pre_ln", depth=2, dim=8, heads=2, seed=0)
    mon = StabilityMonitor(model, every=1000)
    ddp = DDP(model)
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own data
    for t in range(40):
        x = torch.randn(2, 5, 8, generator=g)
        ddp(x).sum().backward()
        for p in model.parameters():  # DDP's averaged gradient, rescaled to the RMS _grad_rms(t) says
            p.grad.mul_(_grad_rms(t) / p.grad.double().pow(2).mean().sqrt().clamp_min(1e-30).float())
        mon.begin_step()
        mon.capture_grads()
        mon.end_step()
        model.zero_grad()
    mon.close()
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"steps": mon.step_count, "warnings": [[u, k] for u, k, _ in _fired(mon)],
         "values": list(mon._signal_detector._past["grad_rms_eps_min"])}))
    dist.destroy_process_group()


if __name__ == "__main__":
    _ddp_worker(Path(sys.argv[1]))


_LOSS_SEQUENCES = {
    # CPU float32 losses (summed as host floats) with NaN, inf, -0.0; a float64 or integer tensor or a number
    # among them (the sums become tensors from there on)
    "cpu": [1.0, 2.5, -0.0, 4.0], "nan": [1.0, float("nan"), 3.0], "inf": [float("inf"), 1.0],
    "-inf": [-1.0, float("-inf")], "float64 midway": [1.0, torch.tensor(3.0, dtype=torch.float64), 2.0],
    "number midway": [1.0, 5, 2.0], "vector midway": [2.0, torch.tensor([1.0, 3.0]), 0.5],
}


@pytest.mark.parametrize("name", sorted(_LOSS_SEQUENCES))
def test_a_logged_steps_loss_is_the_mean_and_max_of_the_losses_since_the_last(model, name):
    """The record's ``loss`` / ``loss_max`` over the steps since the last logging step, written out with float64
    numbers (NaN wins the maximum as torch.maximum has it), whatever mix of CPU float32 losses (read on the host)
    and other losses (kept as tensors) came in."""
    losses = _LOSS_SEQUENCES[name]
    mon = StabilityMonitor(model, every=len(losses) + 1)
    _feed(mon, model, range(1))  # step 0: logged, no loss
    values = []
    for loss in losses:
        t = loss if not isinstance(loss, float) else torch.tensor(loss)
        mon.begin_step()
        mon.end_step(t)
        values.append(float(t.double().mean()) if isinstance(t, torch.Tensor) else float(t))
    mon.begin_step()
    record = mon.end_step()
    want_mean = sum(values) / len(values)
    want_max = math.nan if any(v != v for v in values) else max(values)
    for got, want in ((record["loss"], want_mean), (record["loss_max"], want_max)):
        if math.isnan(want):
            assert math.isnan(got), (name, record["loss"], record["loss_max"])
        else:
            assert got == pytest.approx(want, rel=1e-6), (name, got, want)
    assert math.copysign(1.0, record["loss_max"]) == 1.0 or want_max < 0  # -0.0 reads as +0.0
    mon.close()
