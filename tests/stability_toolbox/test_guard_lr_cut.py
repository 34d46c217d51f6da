"""The guard's ``cut_lr`` action (a learning rate too high: rewind and lower it for the rest of the run), against
independent computations: the rate each applied update used (the schedule's formula x lr_cut ** cuts seen by the
loop), the scheduler's own rate untouched, a resume from state_dict equal to the uninterrupted run, the bounded
escalation to stop, and bad settings."""

import math

import pytest
import torch
from torch import nn

from stability_toolbox.guard import StabilityGuard
from stability_toolbox.guard_policy import GuardPolicy

BASE = (0.1, 0.01)  # the two parameter groups' initial learning rates


def schedule(k: int) -> float:
    """The LambdaLR factor, written out: the rate of the update the scheduler is at, k, is BASE x schedule(k)."""
    return 1.0 / (1.0 + 0.1 * k)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(8, 6, generator=g) for _ in range(40)]
    return [(x, x.sum(1, keepdim=True)) for x in xs]


def make(policy: GuardPolicy, **kwargs):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": BASE[0]},
                           {"params": model[2].parameters(), "lr": BASE[1]}], momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    guard = StabilityGuard(model, opt, scheduler=sched, policy=policy, window=16, warmup=8, threshold=15.0,
                           snapshot_every=5, rewind_skip=1, backoff=1.0, **kwargs)
    return model, opt, sched, guard


def loss_of(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


@pytest.mark.parametrize("lr_cut", [0.5, 0.3])
@pytest.mark.parametrize("decide_on_host", [None, False])
def test_each_update_uses_the_schedule_times_lr_cut_to_the_cuts_so_far(data, lr_cut, decide_on_host):
    """Three non-finite batches, each mapped to cut_lr, with max_lr_cuts=2: the updates between the k-th and the
    next cut use BASE x schedule(scheduler position) x lr_cut ** k; the third is the stop. The scheduler's own rate
    (what it leaves in the groups) never carries the cut."""
    nan_at = {12, 21, 30}
    for i in nan_at:
        data[i] = (data[i][0] * float("nan"), data[i][1])
    model, opt, sched, guard = make(GuardPolicy(actions={"nonfinite": "cut_lr"}, lr_cut=lr_cut, max_lr_cuts=2),
                                    decide_on_host=decide_on_host)
    seen = {"nan": 0}
    applied = []
    opt.register_step_pre_hook(lambda o, a, k: applied.append(
        ([g["lr"] for g in o.param_groups], sched.last_epoch, seen["nan"])))
    for i, batch in guard.batches(data):
        loss = loss_of(model, batch)
        loss.backward()
        guard.step(loss)
        sched.step()
        opt.zero_grad()
        seen["nan"] += i in nan_at
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * schedule(sched.last_epoch) for b in BASE],
                                                                    rel=1e-12)
    assert [e["action"] for e in guard.events] == ["cut_lr", "cut_lr", "stop"]
    assert guard.stopped and guard.lr_cuts == 2 and guard.lr_scale() == pytest.approx(lr_cut ** 2, rel=1e-15)
    assert "cut 2 times" in guard.events[-1]["line"]
    assert {cuts for _, _, cuts in applied} == {0, 1, 2}  # updates were applied at every level
    for lrs, position, cuts in applied:
        assert lrs == pytest.approx([b * schedule(position) * lr_cut ** cuts for b in BASE], rel=1e-12)


def test_a_resumed_run_keeps_the_cut(data):
    """Checkpoint after one cut, resume in new objects from the state dicts: the same updates as the uninterrupted
    guarded run, bit for bit (the cut is in the guard's state; the scheduler's state holds no cut)."""
    data[12] = (data[12][0] * float("nan"), data[12][1])
    policy = GuardPolicy(actions={"nonfinite": "cut_lr"})

    def train(model, opt, sched, guard, start, stop):
        for i, batch in guard.batches(data[:stop], start=start):
            loss = loss_of(model, batch)
            loss.backward()
            guard.step(loss)
            sched.step()
            opt.zero_grad()

    m1, o1, s1, g1 = make(policy)
    train(m1, o1, s1, g1, 0, 30)
    m2, o2, s2, g2 = make(policy)
    train(m2, o2, s2, g2, 0, 20)
    assert g2.lr_cuts == 1
    ckpt = {"model": m2.state_dict(), "opt": o2.state_dict(), "sched": s2.state_dict(), "guard": g2.state_dict()}
    m3, o3, s3, g3 = make(policy)
    m3.load_state_dict(ckpt["model"])
    o3.load_state_dict(ckpt["opt"])
    s3.load_state_dict(ckpt["sched"])
    g3.load_state_dict(ckpt["guard"])
    assert g3.lr_cuts == 1
    train(m3, o3, s3, g3, 20, 30)
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)
    assert [g["lr"] for g in o1.param_groups] == [g["lr"] for g in o3.param_groups]
    old = {k: v for k, v in ckpt["guard"].items() if k != "lr_cuts"}  # a state saved before lr cuts existed
    m4, o4, s4, g4 = make(policy)
    g4.load_state_dict(old)
    assert g4.lr_cuts == 0
    with pytest.raises(ValueError, match="lr_cuts"):
        g4.load_state_dict({**ckpt["guard"], "lr_cuts": -1})
    assert g4.lr_cuts == 0 and g4.updates == old["updates"]


@pytest.mark.parametrize("max_lr_cuts", [0, 1, 3])
def test_persistent_spikes_cut_the_rate_a_bounded_number_of_times_then_stop(data, max_lr_cuts):
    """Every batch from 10 on is bad: skips escalate to rewinds, rewinds to 'persistent', which by default cuts the
    learning rate (rewinding too), max_lr_cuts times; the next 'persistent' stops (0: at once, as before the cut
    existed), leaving the model at a snapshot."""
    bad = data[:10] + [(x * 1e3, y * 1e3) for x, y in data[10:]]
    model, opt, sched, guard = make(GuardPolicy(max_skips=2, window=10, max_rewinds=2, max_lr_cuts=max_lr_cuts))
    steps = 0
    for i, batch in guard.batches(bad * 3):
        loss = loss_of(model, batch)
        loss.backward()
        guard.step(loss)
        sched.step()
        opt.zero_grad()
        steps += 1
        assert steps < 400, "the guard loops"
    actions = [e["action"] for e in guard.events]
    assert actions.count("cut_lr") == max_lr_cuts == guard.lr_cuts
    assert actions[-1] == "stop" and guard.stopped and "persistent" in guard.events[-1]["signals"]
    cuts = [e for e in guard.events if e["action"] == "cut_lr"]
    assert all("persistent" in e["signals"] for e in cuts)
    assert all(math.isfinite(p.abs().max().item()) for p in model.parameters())


def test_default_table_cuts_on_persistent_and_allows_stop():
    assert GuardPolicy().action("persistent") == "cut_lr"
    assert GuardPolicy(actions={"persistent": "stop"}).action("persistent") == "stop"
    assert GuardPolicy(actions={"warning:log_z_rms": "cut_lr"}).action("warning:log_z_rms") == "cut_lr"


@pytest.mark.parametrize("kwargs, exc", [
    (dict(lr_cut=0.0), ValueError), (dict(lr_cut=1.0), ValueError), (dict(lr_cut=1.5), ValueError),
    (dict(lr_cut=float("nan")), ValueError), (dict(lr_cut="0.5"), TypeError),
    (dict(max_lr_cuts=-1), ValueError), (dict(max_lr_cuts=1.5), TypeError),
    (dict(actions={"persistent": "rewind"}), ValueError),
])
def test_bad_lr_cut_settings(kwargs, exc):
    with pytest.raises(exc, match=next(iter(kwargs)) if "actions" not in kwargs else "persistent"):
        GuardPolicy(**kwargs)


@pytest.mark.parametrize("window", [3, 4, 6])
def test_a_snapshot_due_right_after_a_skip_waits_for_a_quiet_window(data, window):
    """The spikes of a too-high rate come from the model's state: a snapshot due (every 5 updates) within
    ``window`` updates of a skip (batch 18, poisoned) is taken at the first update u >= 20 with u - 18 >= window
    (not at 20); the next one is on schedule (25)."""
    data[18] = (data[18][0] * 1e3, data[18][1] * 1e3)
    model, opt, sched, guard = make(GuardPolicy(window=window))
    for i, batch in guard.batches(data[:29]):
        loss = loss_of(model, batch)
        loss.backward()
        guard.step(loss)
        sched.step()
        opt.zero_grad()
    assert [(e["update"], e["action"]) for e in guard.events] == [(18, "skip")]
    postponed = next(u for u in range(20, 25) if u - 18 >= window)
    assert guard.ring.updates() == [postponed, 25]


class _ScaleSGD(torch.optim.Optimizer):
    """Plain SGD whose step size is the group's ``scale``: an optimizer without an ``lr``."""

    def __init__(self, params):
        super().__init__(params, {"scale": 0.05})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["scale"])


@pytest.mark.parametrize("lr", ["absent", None])
def test_an_optimizer_without_a_numeric_lr_stops_instead_of_cutting(data, lr):
    """No 'lr' to multiply (a group without one; lr=None as Adafactor's relative step has): a cut_lr is a stop
    naming why (not a KeyError/TypeError inside the next step), and a rewind's backoff leaves such groups alone."""
    data[12] = (data[12][0] * float("nan"), data[12][1])
    for action, expected in (("cut_lr", "stop"), ("rewind", "rewind")):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        opt = _ScaleSGD(model.parameters())
        if lr is None:
            opt.param_groups[0]["lr"] = None
        guard = StabilityGuard(model, opt, policy=GuardPolicy(actions={"nonfinite": action}), window=16, warmup=8,
                               threshold=15.0, snapshot_every=5, rewind_skip=1, backoff=0.5)
        for i, batch in guard.batches(data[:20]):
            loss = loss_of(model, batch)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
        assert [e["action"] for e in guard.events] == [expected]
        # stop: updates 0..12 (12 not applied); rewind to 10, batches 11, 12 skipped: 10 + batch 10 + batches 13..19
        assert guard.lr_cuts == 0 and guard.updates == {"stop": 13, "rewind": 18}[expected]
        assert opt.param_groups[0].get("lr", "absent") == lr and opt.param_groups[0]["scale"] == 0.05
        if expected == "stop":
            assert "without a numeric learning rate" in guard.stop_reason + guard.events[0]["line"]


def test_a_rate_set_inside_the_step_is_kept_and_a_tensor_lr_is_cut(data):
    """The guard puts the group's rate back after the update only where it is still the one the guard set: a
    rate set inside the step (here a post-step hook, as a hook-driven schedule does) is kept. A tensor lr (torch's
    fused Adam) is cut like a number: the update uses lr x 0.5 ** cuts and the group keeps its tensor."""
    data[12] = (data[12][0] * float("nan"), data[12][1])
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01), fused=True)
    guard = StabilityGuard(model, opt, policy=GuardPolicy(actions={"nonfinite": "cut_lr"}), window=16, warmup=8,
                           threshold=15.0, snapshot_every=5, rewind_skip=1, backoff=1.0)
    applied = []
    opt.register_step_pre_hook(lambda o, a, k: applied.append((float(o.param_groups[0]["lr"]), guard.lr_cuts)))
    for i, batch in guard.batches(data[:20]):
        loss = loss_of(model, batch)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and float(opt.param_groups[0]["lr"]) == \
            pytest.approx(0.01)
    assert guard.lr_cuts == 1 and {c for _, c in applied} == {0, 1}
    assert all(lr == pytest.approx(0.01 * 0.5 ** c, rel=1e-6) for lr, c in applied)
    handle = opt.register_step_post_hook(lambda o, a, k: o.param_groups[0].__setitem__("lr", 0.003))
    loss = loss_of(model, data[0])
    loss.backward()
    guard.step(loss)
    assert opt.param_groups[0]["lr"] == 0.003 and applied[-1] == (pytest.approx(0.005, rel=1e-6), 1)
    handle.remove()


def test_isolated_skips_that_keep_coming_do_not_starve_the_snapshots():
    """A bad batch every 7 updates (never 'repeated': 2 skips per window of 10) keeps a skip within the window at
    every due snapshot: each waits at most window=10 updates (due 15 -> taken 25, due 30 -> 40, due 45 -> 55), not
    for ever (the ring stuck at updates 5 and 10, a later rewind losing 50 updates)."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(8, 6, generator=g) for _ in range(58)]
    data = [(x * 1e3, x.sum(1, keepdim=True) * 1e3) if i >= 12 and (i - 12) % 7 == 0 else (x, x.sum(1, keepdim=True))
            for i, x in enumerate(xs)]
    model, opt, sched, guard = make(GuardPolicy(window=10))
    for i, batch in guard.batches(data):
        loss = loss_of(model, batch)
        loss.backward()
        guard.step(loss)
        sched.step()
        opt.zero_grad()
    assert {e["action"] for e in guard.events} == {"skip"} and len(guard.events) == 7
    assert guard.ring.updates() == [40, 55]
