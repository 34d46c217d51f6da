"""``guard.step(loss, grad_norm=...)``: a global gradient norm the loop already has (clip_grad_norm_'s) is scored
instead of the guard's own pass over the gradients: the same decisions and the same run as without it, the
value handed is the one scored, and bad values are refused before anything changes."""

import pytest
import torch
from torch import nn

from stability_toolbox.guard import StabilityGuard

SETTINGS = dict(window=16, warmup=8, threshold=15.0, snapshot_every=5, rewind_skip=0, backoff=1.0)


def make():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(8, 6, generator=g) for _ in range(30)]
    xs[20] = xs[20] * 1e3  # a poisoned batch
    return [(x, x.sum(1, keepdim=True)) for x in xs]


def loss_of(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def run(data, how, decide_on_host=None):
    model, opt = make()
    guard = StabilityGuard(model, opt, decide_on_host=decide_on_host, **SETTINGS)
    for i, batch in guard.batches(data):
        loss = loss_of(model, batch)
        loss.backward()
        if how == "own":
            guard.step(loss)
        elif how == "observe":  # a trainer's callback: the clipping norm handed before the trainer's step
            guard.observe_grad_norm(nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
            guard.step(loss)
        else:
            norm = nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # the norm, nothing clipped
            guard.step(loss, grad_norm=norm if how == "tensor" else float(norm))
        opt.zero_grad()
    return model, guard


@pytest.mark.parametrize("how", ["tensor", "float", "observe"])
@pytest.mark.parametrize("decide_on_host", [None, False])
def test_a_given_norm_takes_the_same_decisions_as_the_guards_own(data, how, decide_on_host):
    m1, g1 = run(data, "own", decide_on_host)
    m2, g2 = run(data, how, decide_on_host)
    expected = [(20, "skip", ["loss_spike", "grad_norm_spike"])]
    assert [(e["update"], e["action"], e["signals"]) for e in g2.events] == \
        [(e["update"], e["action"], e["signals"]) for e in g1.events] == expected
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("decide_on_host", [None, False])
def test_the_given_norm_is_what_is_scored(data, decide_on_host):
    """A clean run where step 24 is handed 1e6 x its true norm: a grad_norm_spike there alone (the loss is normal);
    a NaN handed at step 26 is a non-finite signal. The guard's own norm would raise neither."""
    data[20] = (data[19][0], data[19][1])  # no poisoned batch
    model, opt = make()
    guard = StabilityGuard(model, opt, decide_on_host=decide_on_host, **SETTINGS)
    for i, batch in guard.batches(data):
        loss = loss_of(model, batch)
        loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        guard.step(loss, grad_norm={24: norm * 1e6, 26: float("nan")}.get(i, norm))
        opt.zero_grad()
    assert [(e["update"], e["signals"]) for e in guard.events] == [(24, ["grad_norm_spike"]), (26, ["nonfinite"])]


@pytest.mark.parametrize("bad, exc", [("1.0", TypeError), (True, TypeError), (torch.tensor(3), TypeError),
                                      (-1.0, ValueError), (torch.ones(2), ValueError)])
def test_bad_grad_norm_is_refused_and_changes_nothing(data, bad, exc):
    model, opt = make()
    guard = StabilityGuard(model, opt, **SETTINGS)
    loss = loss_of(model, data[0])
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(exc, match="grad_norm"):
        guard.step(loss, grad_norm=bad)
    assert guard.updates == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    guard.step(loss, grad_norm=1.0)  # the same gradients, still fresh: the refused call did not consume them
    assert guard.updates == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_given_norm_does_not_synchronize(data):
    """On CUDA the handed norm (clip_grad_norm_'s tensor) stays on the device: a guarded step between snapshots
    makes no synchronizing call (torch's sync debug mode raises on one); the poisoned batch is still skipped."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    guard = StabilityGuard(model, opt, window=16, warmup=8, threshold=15.0, snapshot_every=1000)
    for i, (x, y) in enumerate(data):
        loss = loss_of(model, (x.cuda(), y.cuda()))
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        if 2 <= i < len(data) - 1:
            torch.cuda.set_sync_debug_mode("error")
        try:
            guard.step(loss, grad_norm=norm)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.zero_grad()
    guard.flush()
    assert [(e["update"], e["action"]) for e in guard.events] == [(20, "skip")]


@pytest.mark.parametrize("bad", [torch.tensor(-0.5), torch.tensor([-2.0], dtype=torch.float16),
                                 torch.tensor(1.0, device="meta")])
def test_a_tensor_norm_that_cannot_be_a_norm_is_refused(data, bad):
    """A negative CPU tensor is refused as a negative number is (reading it is free there); a meta tensor (no
    value) is a named ValueError, not torch's NotImplementedError inside the step."""
    model, opt = make()
    guard = StabilityGuard(model, opt, **SETTINGS)
    loss = loss_of(model, data[0])
    loss.backward()
    with pytest.raises(ValueError, match="grad_norm"):
        guard.step(loss, grad_norm=bad)
    assert guard.updates == 0


@pytest.mark.parametrize("value", [float("-inf"), -float("inf") * torch.ones(()), 10 ** 400, float("nan")])
def test_a_non_finite_norm_is_the_nonfinite_signal_not_an_error(data, value):
    """NaN and +-inf (a float, a tensor, an integer beyond a float's range) are the guard's to catch: the update is
    skipped as non-finite, the parameters unchanged; a NumPy float is a real number like a float."""
    np = pytest.importorskip("numpy")
    model, opt = make()
    guard = StabilityGuard(model, opt, **SETTINGS)
    loss = loss_of(model, data[0])
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    guard.step(loss, grad_norm=value)
    assert [e["signals"] for e in guard.events] == [["nonfinite"]]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.zero_grad()
    loss = loss_of(model, data[1])
    loss.backward()
    guard.step(loss, grad_norm=np.float32(1.5))
    assert len(guard.events) == 1 and guard.updates == 2


# ---------------------------------------------------------------- observe_grad_norm (the trainers' callbacks)
def scored_norms(guard, monkeypatch):
    """The gradient norms the guard's detector is handed, step by step."""
    seen = []
    original = guard._signal_values

    def spy(grads, sharded, several, device, host=False, given=None):
        values, present = original(grads, sharded, several, device, host, given)
        seen.append(float(values[guard.signals.index("grad_norm")]))
        return values, present

    monkeypatch.setattr(guard, "_signal_values", spy)
    return seen


def own_norm(model):
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))


@pytest.mark.parametrize("change", ["backward_again", "zero_grad_and_backward", "zero_grad_in_place"])
def test_an_observed_norm_of_gradients_changed_since_is_ignored(data, change, monkeypatch):
    """The norm handed is of the gradients as they were: a backward or a zero_grad between the hand-over and the
    step (a trainer that skipped its step) makes it stale: the step computes the norm of what it steps on."""
    model, opt = make()
    guard = StabilityGuard(model, opt, **SETTINGS)
    seen = scored_norms(guard, monkeypatch)
    loss_of(model, data[0]).backward()
    guard.observe_grad_norm(123.0)
    if change == "backward_again":
        loss_of(model, data[1]).backward()
    elif change == "zero_grad_and_backward":
        opt.zero_grad()
        loss_of(model, data[1]).backward()
    else:
        opt.zero_grad(set_to_none=False)
        loss_of(model, data[1]).backward()
    guard.step()
    assert seen[-1] == pytest.approx(own_norm(model), rel=1e-5) and seen[-1] != 123.0
    opt.zero_grad()
    loss_of(model, data[2]).backward()  # used once: the next update computes its own again
    guard.step()
    assert seen[-1] == pytest.approx(own_norm(model), rel=1e-5)


def test_an_observed_norm_is_scored_once_and_step_grad_norm_wins(data, monkeypatch):
    model, opt = make()
    guard = StabilityGuard(model, opt, **SETTINGS)
    seen = scored_norms(guard, monkeypatch)
    for i in range(3):
        loss_of(model, data[i]).backward()
        guard.observe_grad_norm(torch.tensor(7.0 + i))
        if i == 2:
            guard.step(grad_norm=0.5)
        else:
            guard.step()
        opt.zero_grad()
    assert seen == [7.0, 8.0, 0.5]


@pytest.mark.parametrize("bad, exc", [("1.0", TypeError), (-1.0, ValueError), (torch.ones(2), ValueError),
                                      (torch.tensor(3), TypeError)])
def test_a_bad_observed_norm_is_refused_and_nothing_kept(data, bad, exc, monkeypatch):
    model, opt = make()
    guard = StabilityGuard(model, opt, **SETTINGS)
    seen = scored_norms(guard, monkeypatch)
    loss_of(model, data[0]).backward()
    guard.observe_grad_norm(9.0)
    with pytest.raises(exc, match="grad_norm"):
        guard.observe_grad_norm(bad)
    guard.step()
    assert seen == [9.0]  # the refused call left the earlier hand-over as it was
