"""Adversarial review of the monitor's round-5 changes (per-update bookkeeping, growth_span, the probe's fast-path
switch): bad input refused by name, values the caller changes later not recorded changed, a failed step not
counted, an overflowed growth factor deciding as the exact one, torch.nn's fast path left as the user set it.

Expected values are written out here (exact arithmetic on small numbers), never read back from the monitor."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from admin_torch import make_stack
from stability_toolbox import StabilityMonitor
from stability_toolbox.leading_signals import UpdateStream
from stability_toolbox.scalar_reader import ScalarReader, as_scalar
from stability_toolbox.warning_rules import WarningRule, as_rules, check


@pytest.fixture
def monitor():
    mon = StabilityMonitor(make_stack("post_ln", depth=2, dim=8, seed=0), every=2, signal_rules=[], per_update=True)
    yield mon
    mon.close()


# ---------------------------------------------------------------- WarningRule(growth_span=...)

@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (10.0, TypeError), (True, TypeError),
                                        (float("nan"), TypeError), ("10", TypeError), (np.float64(2), TypeError)])
def test_growth_span_refuses_what_is_not_an_integer_ge_1_by_name(bad, error):
    with pytest.raises(error, match="growth_span must be an integer >= 1"):
        WarningRule(1.0, growth_span=bad)
    with pytest.raises(error, match=r"rules\['beta'\]\.growth_span"):
        as_rules({"beta": {"threshold": 1.0, "growth_span": bad}})


def test_growth_span_takes_numpy_and_huge_integers_as_python_ints():
    assert WarningRule(1.0, growth_span=np.int64(10)).growth_span == 10
    assert type(WarningRule(1.0, growth_span=np.int64(10)).growth_span) is int
    huge = WarningRule(1.0, window=2, min_growth=2.0, growth_span=10 ** 400)  # 2 ** (d / 10**400) == 1 for any d
    h = [{"step": 0, "quantities": {"beta": {"l": 2.0}}}, {"step": 10 ** 6, "quantities": {"beta": {"l": 2.5}}}]
    assert len(check(h, {"beta": huge})) == 1


def _two(steps, values):
    return [{"step": s, "quantities": {"beta": {"l": v}}} for s, v in zip(steps, values)]


@pytest.mark.parametrize("d", [1023, 1024, 5000, 10 ** 400])
@pytest.mark.parametrize("direction, values, fires", [
    ("rising", (0.0, 5.0), True),     # 5 >= 0 * 2**d: exactly 0, whatever d
    ("rising", (1.0, 5.0), False),    # 5 >= 1 * 2**d is false for every d >= 3
    ("falling", (5.0, 0.0), True),    # 0 * 2**d <= 5
    ("falling", (5.0, 1.0), False),   # 1 * 2**d <= 5 is false
])
def test_a_growth_factor_past_the_float_range_decides_as_the_exact_one(d, direction, values, fires):
    """min_growth ** (d / growth_span) overflows a float past d = 1024 here; the rule must decide as the exact
    (integer) factor does, the same below and past the overflow (0 * inf is NaN and compared false)."""
    threshold = 1.0 if direction == "rising" else 4.0
    rule = WarningRule(threshold, window=2, min_growth=2.0, growth_span=1, direction=direction)
    assert (len(check(_two((0, d), values), {"beta": rule})) == 1) is fires


@pytest.mark.parametrize("steps", [(4, 4), (8, 4)])
def test_duplicate_or_decreasing_steps_ask_no_growth_only_a_move(steps):
    """Records not d > 0 updates apart (a duplicate step, a run rewound) ask a factor 1: the value must still move."""
    rule = WarningRule(1.0, window=2, min_growth=2.0, growth_span=10)
    assert len(check(_two(steps, (2.0, 2.1)), {"beta": rule})) == 1  # 2.1 > 2 (factor 1 between them)
    assert check(_two(steps, (2.0, 2.0)), {"beta": rule}) == []      # no move


def test_a_record_without_a_step_is_refused_by_name():
    rule = WarningRule(1.0, window=2, min_growth=2.0, growth_span=10)
    with pytest.raises(ValueError, match=r"history\[1\] has no 'step'"):
        check([{"step": 0, "quantities": {"beta": {"l": 1.0}}}, {"quantities": {"beta": {"l": 5.0}}}],
              {"beta": rule})


def test_a_resumed_monitor_reads_the_growth_per_span_from_the_records_steps():
    """growth_span reads the records' steps: a monitor resumed from state_dict, logging every 20 after a run that
    logged every 10, asks 2 ** (20 / 10) = 4x per log across the resume (written out: 25 -> 100 -> 400 fires, 25 ->
    90 -> 400 does not, as 90 < 4 * 25)."""
    rule = {"attn_logit_max": WarningRule(20.0, window=3, min_growth=2.0, growth_span=10)}
    for middle, fires in ((100.0, True), (90.0, False)):
        model = make_stack("pre_ln", depth=2, dim=8, seed=0)
        first = StabilityMonitor(model, every=10, rules=rule, signal_rules=[])
        first.history = [{"step": 10, "quantities": {"attn_logit_max": {"a": 25.0}}},
                         {"step": 30, "quantities": {"attn_logit_max": {"a": middle}}}]
        first.step_count = 31
        state = first.state_dict()
        first.close()
        second = StabilityMonitor(model, every=20, rules=rule, signal_rules=[])
        second.load_state_dict(state)
        lines = check(second.history + [{"step": 50, "quantities": {"attn_logit_max": {"a": 400.0}}}], rule)
        second.close()
        assert bool(lines) is fires, (middle, lines)


# ---------------------------------------------------------------- steps

@pytest.mark.parametrize("bad, error", [("3", TypeError), (-1, ValueError), (2.5, TypeError), (True, TypeError),
                                        (float("nan"), TypeError), (torch.tensor(1.5), TypeError)])
def test_bad_steps_are_refused_by_name_and_change_nothing(monitor, bad, error):
    with pytest.raises(error, match="step must be an integer >= 0"):
        monitor.is_logging_step(bad)
    with pytest.raises(error, match="step must be an integer >= 0"):
        monitor.begin_step(bad)
    assert monitor.step_count == 0 and not monitor.recording


@pytest.mark.parametrize("step", [np.int64(4), np.int32(5), torch.tensor(4), torch.tensor([5]), 10 ** 30])
def test_integer_steps_of_any_kind_are_plain_ints(monitor, step):
    n = int(step)
    assert monitor.is_logging_step(step) is (n % 2 == 0)
    assert monitor.begin_step(step) is (n % 2 == 0)
    assert type(monitor.step_count) is int and monitor.step_count == n
    monitor.discard_step()


# ---------------------------------------------------------------- losses: input and aliasing

@pytest.mark.parametrize("bad", [torch.tensor(True), torch.tensor([True, False]), torch.tensor(1 + 2j),
                                 torch.tensor([1.0 + 0j])])
def test_bool_and_complex_loss_tensors_are_refused_and_change_nothing(monitor, bad):
    monitor.begin_step()
    with pytest.raises(TypeError, match="loss must be a real"):
        monitor.observe_loss(bad)
    with pytest.raises(TypeError, match="loss must be a real"):
        monitor.end_step(bad)
    record = monitor.end_step(torch.tensor(4.0))
    assert record["loss"] == 4.0 and record["loss_max"] == 4.0 and record["updates"]["loss"] == [4.0]


def _losses():
    """(caller's tensor at end_step, what the update's loss is: the mean in float32, written out)."""
    big = torch.tensor([7.0, 1.0, 2.0])
    return [
        (torch.tensor(1.5), 1.5),
        (torch.tensor([2.5]), 2.5),
        (torch.tensor([[1.0, 2.0], [3.0, 6.0]]), 3.0),
        (big[1:2], 1.0),                                  # a view into a larger tensor
        (big[0], 7.0),                                    # a 0-d view
        (torch.tensor(0.75, requires_grad=True) * 2, 1.5),  # requires grad
        (torch.tensor(1.25, dtype=torch.float16), 1.25),
        (torch.tensor(1.25, dtype=torch.bfloat16), 1.25),
        (torch.tensor([1.0, 2.0], dtype=torch.float64), 1.5),
        (torch.tensor(3), 3.0),
        (torch.tensor([2, 4], dtype=torch.int32), 3.0),
        (torch.tensor(-0.0), 0.0),
        (torch.tensor(float("inf")), math.inf),
    ]


def test_a_loss_tensor_changed_in_place_afterwards_keeps_its_value():
    """end_step(loss) records the value at that call: the caller may change its tensor in place afterwards (a
    buffer reused at every step, a view into its own state), in every dtype and shape a loss comes in."""
    from stability_toolbox import SignalRule

    cases = _losses() + [(torch.tensor(0.5), 0.5)]
    reads = SignalRule("loss", 1e9, "rising", baseline=1, lag=0, smooth=1, persist=1, start=0)  # the reader too
    mon = StabilityMonitor(make_stack("post_ln", depth=2, dim=8, seed=0), every=len(cases) - 1, per_update=True,
                           signal_rules=[reads])
    for loss, _ in cases:
        mon.begin_step()
        mon.end_step(loss)
        with torch.no_grad():
            loss.detach().fill_(99.0)  # the caller reuses its tensor
    mon.close()
    got = mon.history[0]["updates"]["loss"] + mon.history[1]["updates"]["loss"]
    assert got == [v for _, v in cases]
    assert math.copysign(1.0, got[[v for _, v in cases].index(0.0)]) == 1.0  # a -0.0 loss is the mean's +0.0
    # the per-update rule read the same values: only the inf loss (update 12) fires it (a 1e9 rise never does)
    assert [w["update"] for w in mon.warnings if "signal" in w] == [len(cases) - 2]
    nan = StabilityMonitor(mon.model, every=2, per_update=True, signal_rules=[])
    nan.begin_step()
    assert math.isnan(nan.end_step(torch.tensor([float("nan")]))["updates"]["loss"][0])
    nan.close()


def test_update_stream_and_reader_keep_the_value_at_put():
    """as_scalar copies a tensor it is given by default: UpdateStream (read at the next logging step) and
    ScalarReader record the value put, not what the caller's tensor holds later."""
    buf = torch.tensor(1.0)
    stream, reader = UpdateStream(), ScalarReader()
    for step, value in enumerate((1.0, 2.0, 3.0)):
        buf.fill_(value)
        stream.put("loss", buf)
        reader.put("loss", buf)
        buf.fill_(-7.0)  # changed between put and end
        stream.end(step)
        reader.end(step)
    assert stream.read()["loss"] == [1.0, 2.0, 3.0]
    assert [v["loss"] for _, v in reader.ready()] == [1.0, 2.0, 3.0]
    t = torch.tensor(4.0)
    out = as_scalar(t)
    t.add_(1)
    assert float(out) == 4.0
    owned = torch.tensor(4.0)
    assert as_scalar(owned, copy=False) is owned  # the monitor's own fresh values: no op


def test_a_failed_steps_loss_is_not_in_the_next_record(monitor):
    monitor.begin_step()
    assert monitor.end_step(torch.tensor(1.0))["loss"] == 1.0
    with pytest.raises(RuntimeError, match="boom"):
        with monitor.step() as s:
            monitor.observe_loss(torch.tensor(100.0))  # observed, then the step fails
            s.loss = torch.tensor(100.0)
            raise RuntimeError("boom")
    monitor.begin_step()
    monitor.end_step(torch.tensor(3.0))
    monitor.begin_step()
    record = monitor.end_step(torch.tensor(5.0))
    assert record["step"] == 2 and record["loss"] == 4.0 and record["loss_max"] == 5.0
    assert record["updates"] == {"update": [1, 2], "loss": [3.0, 5.0]}


def test_discard_step_drops_a_logged_step_and_never_raises(monitor):
    assert monitor.begin_step(0)
    monitor.observe_loss(torch.tensor(9.0))
    monitor.discard_step()
    assert not monitor.recording and monitor.step_count == 0 and monitor.history == []
    monitor.discard_step()  # twice: nothing more
    assert monitor.begin_step(0)
    assert monitor.end_step(torch.tensor(2.0))["loss"] == 2.0
    monitor.close()
    monitor.discard_step()  # on an error path after close: no error


# ---------------------------------------------------------------- the probe's fast-path switch

def _encoder_history(nested: bool, user_fast_path: bool):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
    x = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 4:], mask[2, 3:] = True, True  # left-aligned padding: the nested-tensor fast path would take it
    mon = StabilityMonitor(model, every=2, probe={"src": x, "src_key_padding_mask": mask}, signal_rules=[])
    opt = torch.optim.SGD(model.parameters(), 0.1)
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(user_fast_path)
    try:
        for _ in range(5):
            with mon.step() as s:
                loss = model(x, src_key_padding_mask=mask).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                s.loss = loss
            assert torch.backends.mha.get_fastpath_enabled() is user_fast_path
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
    mon.close()
    return mon.history


def test_nested_tensor_encoder_with_a_padding_mask_gives_the_slow_paths_values():
    slow = _encoder_history(nested=False, user_fast_path=True)
    assert slow[-1]["quantities"]["output_change"]["layers.1.norm2"] > 0
    assert _encoder_history(nested=True, user_fast_path=True) == slow
    assert _encoder_history(nested=True, user_fast_path=False) == slow  # and the user's setting stays off


class _EvalRefuses(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1,
                                         enable_nested_tensor=False)

    def forward(self, x):
        if not self.training:
            raise RuntimeError("no eval")
        return self.enc(x)


@pytest.mark.parametrize("user", [True, False])
def test_a_probe_that_raises_restores_the_fast_path_setting(user):
    model = _EvalRefuses()
    mon = StabilityMonitor(model, every=1, signal_rules=[])
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(user)
    try:
        with pytest.raises(ValueError, match="probe: the model refused"):
            with mon.step():
                model(torch.randn(2, 3, 8)).sum().backward()
        assert torch.backends.mha.get_fastpath_enabled() is user
        assert not mon.recording and mon.history == []
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
        mon.close()
