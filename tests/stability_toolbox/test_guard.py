"""The stability guard's actions, each against an independent run: skip (= the batch removed), rewind (= the
uninterrupted run, bit for bit), stop (diagnosis and remedy), escalation, records, faults and bad input."""

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from sign_optim import AddSign, PowerSign
from stability_toolbox.conditional_step import conditional_step, skip_path
from stability_toolbox.guard import StabilityGuard
from stability_toolbox.guard_policy import GuardPolicy
from stability_toolbox import snapshots
from stability_toolbox.records import read_records
from stability_toolbox.snapshots import SnapshotRing
from stability_toolbox.spike_detector import SpikeDetector

N_BATCHES = 30
BAD = 20  # the poisoned batch (after the detector's warm-up)
GUARD = dict(window=16, warmup=8, threshold=15.0, snapshot_every=5, rewind_skip=0, backoff=1.0)

OPTIMIZERS = {
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adam_fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    "addsign_fused": lambda ps: AddSign(ps, lr=1e-3, fused=True),
    "addsign_foreach": lambda ps: AddSign(ps, lr=1e-3, foreach=True),
    "powersign_fused": lambda ps: PowerSign(ps, lr=1e-3, fused=True),
    "powersign_loop": lambda ps: PowerSign(ps, lr=1e-3, foreach=False, fused=False),
}


def make_model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))


def make_data(poison: bool = True):
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(8, 6, generator=g) for _ in range(N_BATCHES)]
    if poison:
        xs[BAD] = xs[BAD] * 1e3
    return [(x, x.sum(1, keepdim=True)) for x in xs]


def loss_of(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def state_tensors(opt):
    return [(k, v) for s in opt.state.values() for k, v in sorted(s.items()) if torch.is_tensor(v)]


def assert_same_run(m1, o1, m2, o2):
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n
    s1, s2 = state_tensors(o1), state_tensors(o2)
    assert len(s1) == len(s2)
    for (k, a), (_, b) in zip(s1, s2):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("on_host", [False, None], ids=["device_path", "host_path"])
def test_skip_is_the_batch_removed(name, on_host):
    """A skipped poisoned batch leaves parameters and optimizer state as a run that never saw it, on the device
    paths (found_inf, restore) as on the CPU's host path."""
    model, data = make_model(), make_data()
    opt = OPTIMIZERS[name](model.parameters())
    guard = StabilityGuard(model, opt, decide_on_host=on_host, **GUARD)
    for i, batch in guard.batches(data):
        loss = loss_of(model, batch)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    assert [(e["update"], e["action"]) for e in guard.events] == [(BAD, "skip")]
    ref = make_model()
    ref_opt = OPTIMIZERS[name](ref.parameters())
    for i, batch in enumerate(data):
        if i == BAD:
            continue
        loss_of(ref, batch).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert_same_run(model, opt, ref, ref_opt)


@pytest.mark.parametrize("name", ["adamw_foreach", "addsign_fused"])
def test_no_event_run_is_unchanged(name):
    """Guarded without an event = not guarded, bit for bit (dropout: the random stream is untouched too)."""
    runs = []
    for guarded in (True, False):
        model, data = make_model(dropout=0.2), make_data(poison=False)
        opt = OPTIMIZERS[name](model.parameters())
        guard = StabilityGuard(model, opt, **GUARD) if guarded else None
        torch.manual_seed(3)
        for batch in data:
            loss = loss_of(model, batch)
            loss.backward()
            guard.step(loss) if guarded else opt.step()
            opt.zero_grad()
        runs.append((model, opt, torch.get_rng_state()))
        if guarded:
            assert guard.events == []
    assert_same_run(runs[0][0], runs[0][1], runs[1][0], runs[1][1])
    assert torch.equal(runs[0][2], runs[1][2])


def test_skip_first_step_forgets_new_state():
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    assert conditional_step(opt, torch.tensor(True), on_host=False) == "restore"
    assert p not in opt.state and torch.equal(p.detach(), torch.ones(3))


def test_skip_path_choice():
    ps = [nn.Parameter(torch.ones(2))]
    assert skip_path(torch.optim.AdamW(ps, fused=True)) == "found_inf"
    assert skip_path(torch.optim.AdamW(ps, foreach=True)) == "restore"
    assert skip_path(AddSign(ps)) == "found_inf"


def test_found_inf_of_a_scaler_is_kept():
    """A GradScaler's own found_inf survives the guard's step and still skips."""
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.ones(3)
    opt.found_inf = torch.ones(())  # GradScaler's: 0-d
    assert conditional_step(opt, torch.tensor(False), on_host=False) == "found_inf"
    assert torch.equal(p.detach(), torch.ones(3)) and torch.equal(opt.found_inf, torch.ones(()))


def run_with_rewind(tmp_path, snapshot_dir):
    """The poisoned batch is bad only the first time it is read: the rewind replays it clean."""
    model = make_model(dropout=0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    data = make_data(poison=False)
    seen = set()

    def source(i):
        if i >= len(data):
            return None
        x, y = data[i]
        if i == BAD and i not in seen:
            seen.add(i)
            return x * float("nan"), y
        return x, y

    policy = GuardPolicy(actions={"nonfinite": "rewind"})
    guard = StabilityGuard(model, opt, scheduler=sched, policy=policy, snapshot_dir=snapshot_dir,
                           decide_on_host=False, **GUARD)
    torch.manual_seed(3)
    for i, batch in guard.batches(source):
        loss = loss_of(model, batch)
        loss.backward()
        guard.step(loss)
        sched.step()
        opt.zero_grad()
    return model, opt, sched, guard


@pytest.mark.parametrize("on_disk", [False, True])
def test_rewind_without_skip_or_backoff_is_the_uninterrupted_run(tmp_path, on_disk):
    model, opt, sched, guard = run_with_rewind(tmp_path, tmp_path / "snaps" if on_disk else None)
    assert [e["action"] for e in guard.events] == ["rewind"] and guard.rewinds == 1
    # back to the snapshot of update 20, taken before the NaN batch's update (which was not applied)
    assert guard.undone_updates == 0 and guard.skipped_updates == 1
    rng_after = torch.get_rng_state()
    ref = make_model(dropout=0.2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=7, gamma=0.5)
    torch.manual_seed(3)
    for batch in make_data(poison=False):
        loss_of(ref, batch).backward()
        ref_opt.step()
        ref_sched.step()
        ref_opt.zero_grad()
    assert_same_run(model, opt, ref, ref_opt)
    assert sched.state_dict() == ref_sched.state_dict()
    assert torch.equal(rng_after, torch.get_rng_state())
    if on_disk:
        assert len(list((tmp_path / "snaps").glob("guard-snapshot-*.pt"))) <= 2
        assert not list((tmp_path / "snaps").glob(".*.tmp"))


def test_rewind_skips_batches_and_backs_off():
    """rewind_skip=M: the M batches from the bad one on are never trained on; backoff scales the lr for K updates."""
    model, data = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    lrs = []
    opt.register_step_pre_hook(lambda o, a, k: lrs.append(o.param_groups[0]["lr"]))
    guard = StabilityGuard(model, opt, policy=GuardPolicy(actions={"loss_spike": "rewind", "grad_norm_spike": "rewind"}),
                           window=16, warmup=8, threshold=15.0, snapshot_every=5, rewind_skip=3, backoff=0.25,
                           backoff_updates=2, decide_on_host=False)  # the device path: every step is called
    trained = []
    for i, batch in guard.batches(data):
        trained.append(i)
        loss = loss_of(model, batch)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    assert [e["action"] for e in guard.events] == ["rewind"]
    # snapshot at update 20 (after batch 19): replay from batch 20, but 20, 21, 22 are skipped
    assert trained == list(range(21)) + list(range(23, N_BATCHES))
    assert lrs[21:23] == [0.25e-2, 0.25e-2] and lrs[23] == 1e-2 and lrs[20] == 1e-2
    assert opt.param_groups[0]["lr"] == 1e-2
    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-2)
    for k, i in enumerate(i for i in range(N_BATCHES) if i not in (20, 21, 22)):
        for g in ref_opt.param_groups:
            g["lr"] = 0.25e-2 if k in (20, 21) else 1e-2
        loss_of(ref, data[i]).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert_same_run(model, opt, ref, ref_opt)


def test_repeated_skips_escalate_to_rewind_then_stop():
    """A guard that keeps triggering ends with a diagnosis instead of looping."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = make_data(poison=False)
    data = data[:10] + [(x * 1e3, y * 1e3) for x, y in data[10:]]  # every batch from 10 on is bad
    guard = StabilityGuard(model, opt, policy=GuardPolicy(max_skips=2, window=10, max_rewinds=2),
                           window=16, warmup=8, threshold=15.0, snapshot_every=5, rewind_skip=1)
    steps = 0
    for i, batch in guard.batches(data * 3):
        loss = loss_of(model, batch)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
        steps += 1
        assert steps < 200, "the guard loops"
    actions = [e["action"] for e in guard.events]
    assert actions[:3] == ["skip", "skip", "rewind"]
    assert actions[-1] == "stop" and guard.stopped
    assert "persistent" in guard.events[-1]["signals"]
    assert "lower peak learning rate" in guard.stop_reason
    with torch.no_grad():  # after the stop no update is applied
        before = [p.clone() for p in model.parameters()]
    loss_of(model, data[0]).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class FakeMonitor:
    """A monitor's warnings list, as `StabilityMonitor.warnings` holds them."""

    def __init__(self):
        self.warnings = []


def test_monitor_warning_deep_post_ln_stops_with_admin_remedy(caplog):
    model, data = make_model(), make_data(poison=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = FakeMonitor()
    guard = StabilityGuard(model, opt, monitor=mon, **GUARD)
    with caplog.at_level(logging.WARNING, logger="stability_toolbox.guard"):
        for i, batch in guard.batches(data):
            if i == 12:
                mon.warnings.append({"quantity": "grad_ratio", "message": "stability warning: layer 0: grad_ratio fell"})
            loss = loss_of(model, batch)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    assert guard.stopped and guard.updates == 13
    assert "admin_torch.convert" in guard.stop_reason
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stability guard:")]
    assert len(lines) == 1 and "action: stop" in lines[0] and "\n" not in lines[0]


def test_every_event_is_a_log_line_and_a_record(tmp_path, caplog):
    model, data = make_model(), make_data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = StabilityGuard(model, opt, log_dir=tmp_path, tensorboard=False, **GUARD)
    with caplog.at_level(logging.WARNING, logger="stability_toolbox.guard"):
        for i, batch in guard.batches(data):
            loss = loss_of(model, batch)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    guard.close()
    records = read_records(tmp_path / "monitor.jsonl")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stability guard:")]
    assert len(records) == len(lines) == 1
    assert records[0]["guard"]["action"] == "skip" and records[0]["step"] == BAD
    assert records[0]["warnings"] == lines
    assert "robust sigmas above its running median" in lines[0] and "batch 20" in lines[0]


def test_detach_gives_the_step_back():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    guard = StabilityGuard(model, opt)
    with pytest.raises(ValueError, match="optimizer"):
        StabilityGuard(model, opt)
    guard.detach()
    assert "step" not in opt.__dict__
    StabilityGuard(model, opt).detach()
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)  # a scheduler wrapping the step after the guard
    guard = StabilityGuard(model, opt)
    torch.optim.lr_scheduler.StepLR(opt, 1)
    guard.detach()


# ---------------------------------------------------------------- the detector, against its formula


def robust_z(history, x, rel_floor=0.02, abs_floor=1e-6):
    med = np.median(history) if len(history) % 2 else sorted(history)[len(history) // 2 - 1]
    dev = sorted(abs(h - med) for h in history)
    mad = dev[(len(dev) - 1) // 2]
    return (x - med) / (max(1.4826 * mad, rel_floor * abs(med)) + abs_floor)


def test_detector_matches_median_mad_formula():
    rng = np.random.default_rng(0)
    det = SpikeDetector(("a",), window=6, warmup=3, threshold=4.0)
    accepted = []
    for v in list(rng.normal(5.0, 0.5, 20)) + [50.0, float("inf"), 5.0]:
        z, event = det.update(torch.tensor([v], dtype=torch.float32))
        window = [float(np.float32(a)) for a in accepted[-6:]]
        if window:
            assert math.isclose(float(z[0]), robust_z(window, float(np.float32(v))), rel_tol=1e-4, abs_tol=1e-4)
        expect = (not math.isfinite(v)) or (len(accepted) >= 3 and robust_z(window, v) > 4.0)
        assert bool(event[0]) == expect
        if not expect:
            accepted.append(v)
    assert 50.0 not in accepted and float("inf") not in accepted  # events add nothing to the statistics
    assert accepted[-1] == 5.0


def test_detector_absent_signal_is_not_scored():
    det = SpikeDetector(("loss", "grad_norm"), window=4, warmup=1)
    det.update(torch.tensor([1.0, 1.0]))
    z, event = det.update(torch.tensor([float("nan"), 1.0]), torch.tensor([False, True]))
    assert not event.any()


# ---------------------------------------------------------------- faults


def test_crash_in_the_middle_of_a_rewind_keeps_the_snapshot(monkeypatch):
    model, data = make_model(), make_data(poison=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = StabilityGuard(model, opt, **GUARD)
    for i, batch in guard.batches(data[:12]):
        loss_of(model, batch).backward()
        guard.step()
        opt.zero_grad()
    snap = guard.ring.latest()
    kept = {k: v.clone() for k, v in snap["model"].items()}
    kept_opt = [v.clone() for s in snap["optimizer"]["state"].values() for v in s.values()]

    def crash(*a, **k):
        raise RuntimeError("crash while restoring the random generators")

    # the model and the optimizer are restored first, then the crash
    monkeypatch.setattr(snapshots, "set_rng_state", crash)
    with pytest.raises(RuntimeError, match="crash"):
        guard.rewind()
    # the stored snapshot is intact, and nothing of the live state aliases it
    assert all(torch.equal(kept[k], v) for k, v in guard.ring.latest()["model"].items())
    assert all(torch.equal(kept[k], v) for k, v in model.state_dict().items())  # it was restored before the crash
    assert all(torch.equal(a, b) for a, b in zip(kept_opt, [v for s in guard.ring.latest()["optimizer"]["state"].values()
                                                            for v in s.values()]))
    with torch.no_grad():
        next(iter(model.parameters())).add_(1.0)
    for s in opt.state.values():
        s["exp_avg"].add_(1.0)
    assert all(torch.equal(kept[k], v) for k, v in guard.ring.latest()["model"].items())
    assert all(torch.equal(a, b) for a, b in zip(kept_opt, [v for s in guard.ring.latest()["optimizer"]["state"].values()
                                                            for v in s.values()]))


def test_crash_while_writing_a_snapshot_keeps_the_last_file(tmp_path, monkeypatch):
    ring = SnapshotRing(2, tmp_path)
    ring.save({"update": 0, "x": torch.ones(2)})
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        ring.save({"update": 5, "x": torch.zeros(2)})
    monkeypatch.undo()
    assert ring.updates() == [0] and torch.equal(ring.latest()["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guard-snapshot-0.pt"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(window=1), ValueError, "window"),
    (dict(threshold=0), ValueError, "threshold"),
    (dict(threshold="6"), TypeError, "threshold"),
    (dict(warmup=0), ValueError, "warmup"),
    (dict(snapshot_every=0), ValueError, "snapshot_every"),
    (dict(snapshots=0), ValueError, "size"),
    (dict(rewind_skip=-1), ValueError, "rewind_skip"),
    (dict(backoff=0.0), ValueError, "backoff"),
    (dict(backoff=1.5), ValueError, "backoff"),
    (dict(backoff_updates=-2), ValueError, "backoff_updates"),
    (dict(signals=("loss", "accuracy")), ValueError, "signals"),
    (dict(signals="loss"), ValueError, "signals"),
    (dict(policy={"loss_spike": "skip"}), TypeError, "policy"),
    (dict(scheduler=3), TypeError, "scheduler"),
    (dict(monitor=object()), TypeError, "monitor"),
    (dict(log_dir=3), TypeError, "log_dir"),
    (dict(tensorboard="yes"), TypeError, "tensorboard"),
    (dict(log="guard"), TypeError, "log"),
    (dict(snapshot_dir=5), TypeError, "directory"),
])
def test_bad_arguments_name_themselves_and_wrap_nothing(kwargs, exc, name):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(exc, match=name):
        StabilityGuard(model, opt, **kwargs)
    assert "step" not in opt.__dict__


@pytest.mark.parametrize("args, exc, name", [
    ((nn.Linear(2, 2), "adam"), TypeError, "optimizer"),
    (("model", None), TypeError, "model"),
])
def test_bad_model_or_optimizer(args, exc, name):
    with pytest.raises(exc, match=name):
        StabilityGuard(*args)


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(actions={"typo": "skip"}), ValueError, "actions"),
    (dict(actions={"loss_spike": "explode"}), ValueError, "loss_spike"),
    (dict(actions=[("loss_spike", "skip")]), TypeError, "actions"),
    (dict(max_skips=-1), ValueError, "max_skips"),
    (dict(window=0), ValueError, "window"),
    (dict(max_rewinds=0), ValueError, "max_rewinds"),
    (dict(rewind_window=1.5), TypeError, "rewind_window"),
])
def test_bad_policy(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        GuardPolicy(**kwargs)


def test_bad_calls():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    guard = StabilityGuard(model, opt)
    with pytest.raises(TypeError, match="loss"):
        guard.observe_loss("1.0")
    with pytest.raises(TypeError, match="loss"):
        guard.observe_loss(torch.tensor(1))
    with pytest.raises(ValueError, match="rewind"):
        guard.rewind()
    with pytest.raises(TypeError, match="source"):
        next(guard.batches(3))
    with pytest.raises(ValueError, match="start"):
        next(guard.batches([1], start=-1))
    with pytest.raises(TypeError, match="skip"):
        conditional_step(opt, 1)
    with pytest.raises(TypeError, match="names"):
        SpikeDetector(())
    with pytest.raises(ValueError, match="values"):
        SpikeDetector(("a",)).update(torch.ones(2))


# ---------------------------------------------------------------- GPU: no host-device synchronization


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_steps_without_events_do_not_synchronize():
    """fused AdamW on CUDA: between snapshots a guarded step makes no synchronizing call (torch's sync debug mode
    raises on one); a poisoned batch is still skipped, one step later on the host."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    guard = StabilityGuard(model, opt, window=16, warmup=8, threshold=15.0, snapshot_every=1000)
    data = [(x.cuda(), y.cuda()) for x, y in make_data()]
    for i, batch in enumerate(data):
        loss = loss_of(model, batch)
        loss.backward()
        if 2 <= i < N_BATCHES - 1:
            torch.cuda.set_sync_debug_mode("error")
        try:
            guard.step(loss)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.zero_grad()
    guard.flush()
    assert [(e["update"], e["action"]) for e in guard.events] == [(BAD, "skip")]
