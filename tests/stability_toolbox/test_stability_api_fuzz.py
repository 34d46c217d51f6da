"""stability_toolbox's public API under adversarial arguments (each found by a fuzz of every public callable): the
spike detector's values, presence flags, device and state, the snapshots and the random generators' state. A bad
value is a TypeError or ValueError naming the argument, never an AttributeError/IndexError/KeyError or torch's
RuntimeError from deep inside; a refused call changes nothing."""

import math
import random

import pytest
import torch

from stability_toolbox import SpikeDetector
from stability_toolbox import snapshots
from stability_toolbox.snapshots import SnapshotRing, capture, restore

META = torch.zeros(2, device="meta")


@pytest.fixture
def detector():
    det = SpikeDetector(("loss", "grad_norm"), window=8, warmup=2, refresh_every=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        det.update(torch.tensor([1.0, 2.0]) + 0.01 * torch.rand(2, generator=gen))
    return det


def _same_state(a, b):
    """Bit for bit, NaN (an empty slot of the ring) equal to NaN."""
    return all(torch.allclose(a[k], b[k], rtol=0, atol=0, equal_nan=True) if isinstance(a[k], torch.Tensor)
               else a[k] == b[k] for k in a)


@pytest.mark.parametrize("method", ["update", "score"])
@pytest.mark.parametrize("values, error", [
    (None, TypeError), ([1.0, 2.0], TypeError), (3.0, TypeError),             # AttributeError ('detach') in score
    (torch.tensor(1.0), ValueError), (torch.ones(3), ValueError),             # IndexError / RuntimeError
    (torch.ones(2, 2), ValueError), (torch.empty(0), ValueError),
    (torch.ones(2, dtype=torch.complex64), TypeError), (torch.ones(2, dtype=torch.bool), TypeError),
    (META, TypeError),                                                        # NotImplementedError
], ids=["None", "list", "float", "0d", "3", "2x2", "empty", "complex", "bool", "meta"])
def test_values_are_checked_before_anything_changes(detector, method, values, error):
    before = detector.state_dict()
    with pytest.raises(error, match="^values must"):
        getattr(detector, method)(values)
    assert _same_state(before, detector.state_dict())


@pytest.mark.parametrize("method", ["update", "score"])
@pytest.mark.parametrize("present, error", [
    ("x", TypeError), (1, TypeError), ([True, True], TypeError),              # AttributeError ('to')
    (torch.ones(3, dtype=torch.bool), ValueError), (torch.ones(2), TypeError),
    (torch.ones(2, dtype=torch.bool, device="meta"), TypeError),
], ids=["str", "int", "list", "3", "float", "meta"])
def test_present_is_checked_before_anything_changes(detector, method, present, error):
    before = detector.state_dict()
    with pytest.raises(error, match="^present must"):
        getattr(detector, method)(torch.tensor([1.0, 2.0]), present)
    assert _same_state(before, detector.state_dict())


@pytest.mark.parametrize("values, present, error, name", [
    ([1 + 1j, 1.0], None, TypeError, r"values\[0\]"), (["1", 1.0], None, TypeError, r"values\[0\]"),
    ([10 ** 400, 1.0], None, ValueError, r"values\[0\]"), (torch.ones(2), None, TypeError, "values"),
    ([1.0, 1.0], [True, "x"], TypeError, r"present\[1\]"), ([1.0, 1.0], "ab", TypeError, "present"),
])
def test_score_host_checks_its_lists(detector, values, present, error, name):
    before = detector.state_dict()
    with pytest.raises(error, match=f"^{name} must"):
        detector.score_host(values, present)
    assert _same_state(before, detector.state_dict())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_score_host_a_non_finite_value_is_an_event_not_an_error(detector, bad):
    z, event, nonfinite, any_event = detector.score_host([bad, 2.0])
    assert event == [True, False] and nonfinite == [True, False] and any_event


@pytest.mark.parametrize("device, error", [("gpu", ValueError), (-1, ValueError), (1.5, TypeError)])
def test_device_is_named(device, error):
    with pytest.raises(error, match="^device must be"):
        SpikeDetector(device=device)
    det = SpikeDetector()
    with pytest.raises(error, match="^device must be"):
        det.to(device)
    assert det.device == torch.device("cpu")


@pytest.mark.parametrize("key, value, error", [
    ("buffer", None, TypeError), ("buffer", [0.0], TypeError), ("offset", 0.0, TypeError),   # AttributeError
    ("inv", None, TypeError), ("inv", torch.ones(2, dtype=torch.complex64), TypeError),
    ("inv", torch.empty(0), ValueError), ("count", torch.ones(2, dtype=torch.long), ValueError),  # RuntimeError
    ("count", torch.tensor(1.5), TypeError), ("buffer", torch.zeros(2, 9, device="meta"), TypeError),
    ("offset", torch.zeros(2).to_sparse(), TypeError),
])
def test_load_state_dict_checks_every_tensor_first(detector, key, value, error):
    state = detector.state_dict()
    state[key] = value
    fresh = SpikeDetector(("loss", "grad_norm"), window=8, warmup=2, refresh_every=2)
    before = fresh.state_dict()
    with pytest.raises(error, match=f"^state\\['{key}'\\]"):
        fresh.load_state_dict(state)
    assert _same_state(before, fresh.state_dict())


def test_load_state_dict_round_trip_decides_alike(detector):
    fresh = SpikeDetector(("loss", "grad_norm"), window=8, warmup=2, refresh_every=2)
    fresh.load_state_dict(detector.state_dict())
    for values in ([1.0, 2.0], [50.0, 2.0]):
        a, b = detector.score(torch.tensor(values)), fresh.score(torch.tensor(values))
        assert torch.equal(a[1], b[1])


# ---------------------------------------------------------------- snapshots


@pytest.fixture
def trained():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def _tampered(snap, key, value):
    bad = dict(snap)
    bad[key] = value
    return bad


@pytest.mark.parametrize("key, value, error", [
    ("rng", {}, TypeError), ("rng", torch.ones(2), TypeError),                 # KeyError / IndexError
    ("rng", {"torch": None, "python": random.getstate()}, TypeError),         # AttributeError ('clone')
    ("rng", {"torch": torch.ones(3), "python": random.getstate()}, TypeError),
    ("rng", {"torch": torch.get_rng_state(), "python": torch.ones(2)}, TypeError),
    ("rng", {"torch": torch.get_rng_state(), "python": (3, (1, 2), None)}, ValueError),
    ("optimizer", {}, ValueError), ("optimizer", torch.ones(2), TypeError),   # KeyError / IndexError
    ("model", {}, ValueError), ("model", 3, TypeError),                       # torch's RuntimeError
    ("update", -1, ValueError), ("position", "x", TypeError),
])
def test_restore_checks_the_snapshot_first(trained, key, value, error):
    model, opt = trained
    snap = capture(model, opt, update=1, position=0)
    with torch.no_grad():
        model.weight.add_(1.0)
    weight, state = model.weight.clone(), opt.state_dict()
    torch.manual_seed(7)
    rng, py = torch.get_rng_state(), random.getstate()
    with pytest.raises(error, match=f"snapshot\\['{key}'\\]"):
        restore(_tampered(snap, key, value), model, opt)
    assert torch.equal(model.weight, weight)
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], state["state"][0]["momentum_buffer"])
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py


@pytest.mark.parametrize("snap, error", [(None, TypeError), (torch.ones(2), TypeError), ({}, TypeError),
                                         ({"update": 0}, TypeError)])
def test_restore_of_what_is_not_a_snapshot(trained, snap, error):
    model, opt = trained
    with pytest.raises(error, match="^snapshot must be"):
        restore(snap, model, opt)


@pytest.mark.parametrize("arg, value", [("model", None), ("model", "x"), ("optimizer", 3), ("scheduler", "x"),
                                        ("scaler", 1.0)])
def test_restore_and_capture_name_an_object_of_the_wrong_kind(trained, arg, value):
    model, opt = trained
    snap = capture(model, opt, update=1, position=0)
    objects = {"model": model, "optimizer": opt, arg: value}
    with pytest.raises(TypeError, match=f"^{arg} must be"):
        restore(snap, objects.pop("model"), objects.pop("optimizer"), **objects)
    objects = {"model": model, "optimizer": opt, arg: value}
    with pytest.raises(TypeError, match=f"^{arg} must be"):
        capture(objects.pop("model"), objects.pop("optimizer"), update=1, position=0, **objects)


@pytest.mark.parametrize("kw, error", [(dict(update=-1), ValueError), (dict(update="1"), TypeError),
                                       (dict(position=-3), ValueError), (dict(extra=torch.ones(2)), TypeError)])
def test_capture_checks_its_numbers(trained, kw, error):
    model, opt = trained
    args = {**dict(update=1, position=0), **kw}
    with pytest.raises(error, match=f"^{next(iter(kw))} must be"):
        capture(model, opt, **args)


def test_set_rng_state_refusal_sets_no_generator():
    torch.manual_seed(3)
    random.seed(3)
    rng, py = torch.get_rng_state(), random.getstate()
    with pytest.raises(ValueError, match=r"state\['python'\]"):
        snapshots.set_rng_state({"torch": torch.zeros_like(rng), "python": (3, tuple(range(5)), None)})
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py


def test_restore_still_restores(trained):
    model, opt = trained
    snap = capture(model, opt, update=1, position=0)
    weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    restore(snap, model, opt)
    assert torch.equal(model.weight, weight)


@pytest.mark.parametrize("snap, error", [(None, TypeError), ({"x": 1}, TypeError), ({"update": -1}, ValueError),
                                         ({"update": "3"}, TypeError)])
def test_ring_save_needs_an_update(tmp_path, snap, error):
    for ring in (SnapshotRing(2), SnapshotRing(2, tmp_path)):
        with pytest.raises(error, match="^snapshot"):
            ring.save(snap)
        assert len(ring) == 0


@pytest.mark.parametrize("update, error", [(None, TypeError), ("3", TypeError), (torch.ones(2), TypeError)])
def test_ring_drop_after_takes_an_integer(update, error):
    ring = SnapshotRing(2)
    ring.save({"update": 0})
    with pytest.raises(error, match="^update must be"):
        ring.drop_after(update)
    assert ring.updates() == [0]


# ---------------------------------------------------------------- losses without a value, the guard's state


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.f1, self.f2 = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, x):
        return self.f2(self.norm(x + torch.relu(self.f1(x))))


@pytest.fixture
def guarded():
    from stability_toolbox import StabilityGuard

    torch.manual_seed(0)
    model = _Two()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = StabilityGuard(model, opt, window=8, warmup=2, refresh_every=2, tensorboard=False)
    x = torch.randn(8, 4)
    for _ in range(3):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        guard.observe_loss(loss)
        opt.step()
    yield model, opt, guard, x
    guard.detach()


@pytest.mark.parametrize("loss", [torch.zeros((), device="meta"), torch.empty(0)], ids=["meta", "empty"])
def test_guard_loss_without_a_value_is_refused_and_not_kept(guarded, loss):
    """A meta loss was stored and broke every later step (NotImplementedError); an empty one was a NaN mean."""
    model, opt, guard, x = guarded
    with pytest.raises(ValueError, match="^loss must hold a value"):
        guard.observe_loss(loss)
    opt.zero_grad()
    good = model(x).pow(2).mean()
    good.backward()
    guard.observe_loss(good)
    opt.step()  # the refused loss left nothing behind
    assert guard.summary()["updates"] == 4


def test_guard_integer_loss_beyond_a_float_is_non_finite(guarded):
    """Was an OverflowError; now what check_grad_norm does with such a norm: a non-finite value (an event)."""
    model, opt, guard, x = guarded
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    guard.observe_loss(10 ** 400)
    opt.step()
    assert guard.summary()["skipped_updates"] == 1


@pytest.mark.parametrize("key, value, error", [
    ("updates", float("inf"), ValueError), ("updates", torch.tensor(1 + 1j), TypeError),   # OverflowError / Runtime
    ("rewinds", -1, ValueError), ("stopped", "yes", TypeError), ("stopped", torch.empty(0), TypeError),
    ("stop_reason", 3, TypeError), ("skip_indices", 5, TypeError), ("skip_indices", [-1], ValueError),
    ("skip_log", [3], TypeError), ("lr_cuts", 10 ** 400, ValueError),
])
def test_guard_load_state_dict_checks_every_entry_first(guarded, key, value, error):
    model, opt, guard, x = guarded
    state = guard.state_dict()
    state[key] = value
    before = guard.state_dict()
    with pytest.raises(error, match=f"state\\['{key}'\\]"):
        guard.load_state_dict(state)
    after = guard.state_dict()
    assert {k: v for k, v in after.items() if k != "detector"} == {k: v for k, v in before.items() if k != "detector"}
    assert _same_state(before["detector"], after["detector"])


def test_guard_load_state_dict_detector_refusal_changes_nothing(guarded):
    model, opt, guard, x = guarded
    state = guard.state_dict()
    state["detector"] = dict(state["detector"], inv=torch.ones(2, dtype=torch.complex64))
    before = guard.state_dict()
    with pytest.raises(TypeError, match=r"state\['inv'\]"):
        guard.load_state_dict(state)
    assert _same_state(before["detector"], guard.state_dict()["detector"])
    assert guard.state_dict()["updates"] == before["updates"]


def test_monitor_meta_loss_is_refused_and_not_kept():
    from stability_toolbox import StabilityMonitor

    torch.manual_seed(0)
    model = _Two()
    monitor = StabilityMonitor(model, every=1, tensorboard=False, heatmaps=False, fallback="pre_ln")
    x = torch.randn(8, 4)
    try:
        monitor.begin_step()
        model(x).sum().backward()
        with pytest.raises(ValueError, match="^loss must hold a value"):
            monitor.observe_loss(torch.zeros((), device="meta"))
        record = monitor.end_step(0.5)  # was: NotImplementedError from the stored meta loss
        assert record is None or math.isclose(record["loss"], 0.5)
    finally:
        monitor.remove()


def test_update_signals_meta_loss_is_refused_before_the_row_is_written():
    from stability_toolbox import UpdateSignals

    torch.manual_seed(0)
    model = _Two()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    signals = UpdateSignals(model, opt)
    x = torch.randn(8, 4)
    try:
        signals.begin_update()
        model(x).sum().backward()
        signals.after_backward()
        opt.step()
        with pytest.raises(TypeError, match="^loss must be a real tensor with data"):
            signals.after_step(torch.zeros((), device="meta"))
        signals.after_step(10 ** 400)  # an int beyond a float: inf (was an OverflowError half-way)
        rows = signals.read()
        assert len(rows["loss"]) == 1 and math.isinf(rows["loss"][0])
    finally:
        signals.remove()


def test_ring_keeps_a_tensor_update_as_an_int():
    """A tensor ``update`` was kept as it was: drop_after then compared tensors (OverflowError for a large int)."""
    ring = SnapshotRing(2)
    ring.save({"update": torch.tensor(3)})
    assert ring.updates() == [3] and type(ring.updates()[0]) is int
    ring.drop_after(10 ** 400)
    assert ring.updates() == [3]
    ring.drop_after(2)
    assert ring.updates() == []


# ---------------------------------------------------------------- the monitor's hooks under inputs the model takes


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 0, 8)], ids=["empty-batch", "empty-sequence"])
def test_monitored_model_takes_an_empty_batch_as_the_plain_one(batch_first, shape):
    """The plain layer returns an empty output; monitored, the hooks failed in ``amax()`` of nothing."""
    from stability_toolbox import StabilityMonitor

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=batch_first, dropout=0.0)
    monitor = StabilityMonitor(layer, every=1, tensorboard=False, heatmaps=False)
    x = torch.randn(shape if batch_first else (shape[1], shape[0], shape[2]))
    try:
        monitor.begin_step()
        out = layer(x)
        out.sum().backward()
        monitor.end_step(1.0)
        monitor.begin_step()  # and a real step after it is recorded
        layer(torch.randn(2, 5, 8) if batch_first else torch.randn(5, 2, 8)).sum().backward()
        record = monitor.end_step(1.0)
        assert record is not None and record["step"] == 1
    finally:
        monitor.remove()


def test_monitored_attention_leaves_a_bad_input_to_the_module():
    """A query of the wrong width: the module's own error (AssertionError), not the hook's matmul RuntimeError."""
    from stability_toolbox import StabilityMonitor

    layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
    monitor = StabilityMonitor(layer, every=1, tensorboard=False, heatmaps=False)
    try:
        monitor.begin_step()
        with pytest.raises(AssertionError, match="embedding dimension"):
            layer.self_attn(torch.randn(2, 5, 7), torch.randn(2, 5, 7), torch.randn(2, 5, 7))
        monitor.discard_step()
    finally:
        monitor.remove()


@pytest.mark.parametrize("modules", [None, 3, [("a", None, "torch_mha")], [("a", torch.nn.Linear(2, 2), "nope")],
                                     [("a", torch.nn.Linear(2, 2), "batch_first")], [("a",)]])
def test_attention_logits_checks_its_modules(modules):
    from stability_toolbox.attention_stats import AttentionLogits

    with pytest.raises(TypeError, match="^modules must be a list of"):
        AttentionLogits(modules, None)
