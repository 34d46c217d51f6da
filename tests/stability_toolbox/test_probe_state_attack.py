"""Adversarial cases of the probe pass's model state (stability_toolbox.probe): the model after a monitored step is
the model an unmonitored twin has after the same training (carried hidden states, caches in dicts and lists,
buffers changed in place, buffers registered during a forward pass), and output_change is the full probe's, read
with the test's own hooks, on models of every build (lazy, parametrized, weight-normed, BatchNorm, two monitors, a
resumed monitor, two DDP ranks with batches of different lengths)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from stability_toolbox import StabilityMonitor
from torch_helpers import norm_inputs, output_change

DIM = 8


def _monitor(model, **kw):
    kw = {"every": 1, "probe_rows": 3, "tensorboard": False, "heatmaps": False, "rules": {}, "fallback": "post_ln",
          **kw}
    return StabilityMonitor(model, **kw)


def _train(model, mon, batches, probe, lr=0.5, rows=3):
    """Train on ``batches``; after each step, the full ``probe``'s rows read with the test's hooks (before the
    next step); returns each logged step's (recorded, expected) output_change."""
    opt = torch.optim.SGD(model.parameters(), lr)
    pairs, last = [], None
    for x in batches:
        if mon is not None:
            mon.begin_step()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if mon is not None:
            mon.end_step(loss)
        now = norm_inputs(model, probe)
        if last is not None and mon is not None:
            got = mon.history[-1]["quantities"]["output_change"]
            pairs.append((got, {k: output_change(last[k], now[k], rows) for k in got}))
        last = now
    return pairs


def _assert_full_probes(pairs):
    assert pairs
    for got, want in pairs:
        assert got and got.keys() == want.keys()
        for name in got:
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-12), name


# ---------------------------------------------------------------------------------- state kept on the model


class _LSTMLM(nn.Module):
    """An LSTM language model carrying its hidden state on ``self`` between batches (truncated BPTT)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.rnn = nn.LSTM(DIM, DIM, batch_first=True)
        self.norm0, self.norm = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.lin = nn.Linear(DIM, DIM)
        self.hidden = None

    def forward(self, x):
        h, hidden = self.rnn(self.inp(x), self.hidden)
        self.hidden = tuple(t.detach() for t in hidden)
        h = self.norm0(h)
        return self.norm(h + self.lin(h))


def _lm_run(monitored):
    torch.manual_seed(0)
    model = _LSTMLM()
    mon = _monitor(model, every=2) if monitored else None
    opt = torch.optim.SGD(model.parameters(), 0.1)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(5):
        x = torch.randn(4, 6, DIM, generator=g)
        if mon is not None:
            mon.begin_step()
        loss = model(x)[..., 0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if mon is not None:
            mon.end_step(loss)
        losses.append(loss.item())
    return losses, model


def test_the_probe_pass_leaves_a_carried_hidden_state_to_the_next_training_step():
    # the probe pass replaced the LM's carried state by the probe batch's: the monitored run's losses left the
    # unmonitored run's from the step after the first logged one
    (losses, model), (twin_losses, twin) = _lm_run(True), _lm_run(False)
    assert losses == twin_losses
    assert all(torch.equal(a, b) for a, b in zip(model.hidden, twin.hidden))


class _Stateful(nn.Module):
    """A residual block keeping state between calls, as ``kind`` says: a dict cache (the last output), a list of
    outputs, a buffer updated in place (a running mean, in eval mode too), a buffer registered per batch size."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(DIM, DIM)
        self.norm0, self.norm = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.cache, self.outputs = {}, []
        self.register_buffer("mean", torch.zeros(DIM))

    def forward(self, x):
        x = self.norm0(x)
        y = self.norm(x + self.lin(x))
        if self.kind == "dict":
            self.cache["last"] = y.detach()
        elif self.kind == "list":
            self.outputs.append(y.detach())
        elif self.kind == "in_place":
            with torch.no_grad():
                self.mean.mul_(0.5).add_(y.mean((0, 1)))
        elif self.kind == "through_data":  # no version bump (as a C++ write, DDP's broadcast of buffers)
            self.mean.data.mul_(0.5).add_(y.detach().mean((0, 1)))
            with torch.inference_mode():
                self.calls = torch.ones(()) if not hasattr(self, "calls") else self.calls.add_(1)
        elif not hasattr(self, f"mask_{x.shape[0]}"):
            self.register_buffer(f"mask_{x.shape[0]}", torch.ones(x.shape[0]))
        return y


def _state(model):
    calls = {"calls": model.calls.clone()} if hasattr(model, "calls") else {}
    return {"state_dict": {**model.state_dict(), **calls}, "cache": dict(model.cache), "outputs": list(model.outputs)}


@pytest.mark.parametrize("kind", ["dict", "list", "in_place", "through_data", "new_buffer"])
def test_a_monitored_step_leaves_the_models_state_as_an_unmonitored_one(kind, quiet_log):
    # the tried cut's pass put back only the objects bound to attributes: a dict or list filled in place kept the
    # cut batch's tensors (and the cut was taken: their shapes were not compared), a buffer changed in place kept
    # the cut pass's values, a buffer registered for the cut batch stayed in model.state_dict()
    batches = [torch.randn(4, 3, DIM, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    torch.manual_seed(0)
    model = _Stateful(kind)
    mon = _monitor(model)
    torch.manual_seed(0)
    twin = _Stateful(kind)
    for x in batches:  # the same steps, the twin unmonitored
        for m, monitor in ((model, mon), (twin, None)):
            if monitor is not None:
                monitor.begin_step()
            loss = m(x).pow(2).mean()
            loss.backward()
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.05 * p.grad
                    p.grad = None
            if monitor is not None:
                monitor.end_step(loss)
        got, want = _state(model), _state(twin)
        assert got["state_dict"].keys() == want["state_dict"].keys()
        assert all(torch.equal(got["state_dict"][k], want["state_dict"][k]) for k in want["state_dict"])
        assert got["cache"].keys() == want["cache"].keys()
        assert all(torch.equal(got["cache"][k], want["cache"][k]) for k in want["cache"])
        assert len(got["outputs"]) == len(want["outputs"])
        assert all(torch.equal(a, b) for a, b in zip(got["outputs"], want["outputs"]))
    # a model keeping batch-sized state (or state per batch size) keeps the full probe; a running mean may cut
    assert mon._probe.cut is (kind in ("in_place", "through_data"))


# ---------------------------------------------------------------------------------- models of every build


class _Block(nn.Module):
    """norm0 -> ``inner`` branch -> norm(x + branch): samples never interact in eval mode."""

    def __init__(self, inner):
        super().__init__()
        self.norm0, self.inner, self.norm = nn.LayerNorm(DIM), inner, nn.LayerNorm(DIM)

    def forward(self, x):
        x = self.norm0(x)
        return self.norm(x + self.inner(x))


class _BatchNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(DIM, DIM), nn.BatchNorm1d(DIM)

    def forward(self, x):
        return self.bn(self.lin(x).transpose(1, 2)).transpose(1, 2)


def _inner(kind):
    if kind == "lazy":
        return nn.LazyLinear(DIM)
    if kind == "parametrized":
        return nn.utils.parametrizations.orthogonal(nn.Linear(DIM, DIM))
    if kind == "weight_norm":
        return nn.utils.parametrizations.weight_norm(nn.Linear(DIM, DIM))
    if kind == "old_weight_norm":
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return nn.utils.weight_norm(nn.Linear(DIM, DIM))
    if kind == "batch_norm_eval":
        return _BatchNormed().eval()
    return _BatchNormed()


@pytest.mark.parametrize("kind", ["lazy", "parametrized", "weight_norm", "old_weight_norm", "batch_norm_eval",
                                  "batch_norm"])
def test_models_of_every_build_take_the_cut_and_give_the_full_probes_output_change(kind, quiet_log):
    torch.manual_seed(0)
    model = _Block(_inner(kind))
    batches = [torch.randn(4, 3, DIM, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    model(batches[0])  # a lazy module materialised (the monitor's hooks see the built model)
    mon = _monitor(model)
    pairs = _train(model, mon, batches, batches[0])
    _assert_full_probes(pairs)
    assert mon._probe.cut and mon._probe.call[0][0].shape[0] == 1


def test_two_monitors_on_one_model_each_give_the_full_probes_output_change(quiet_log):
    torch.manual_seed(0)
    model = _Block(nn.Linear(DIM, DIM))
    batches = [torch.randn(4, 3, DIM, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    first, second = _monitor(model), _monitor(model, probe_rows=5)
    opt = torch.optim.SGD(model.parameters(), 0.05)
    expected = []
    for x in batches:
        first.begin_step(), second.begin_step()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        first.end_step(loss), second.end_step(loss)
        expected.append(norm_inputs(model, batches[0]))
    for mon, rows in ((first, 3), (second, 5)):
        assert mon._probe.cut and torch.equal(mon._probe.full[0][0], batches[0])
        for step in range(1, len(batches)):
            got = mon.history[step]["quantities"]["output_change"]
            assert got["norm"] == pytest.approx(output_change(expected[step - 1]["norm"], expected[step]["norm"], rows),
                                                rel=1e-4)


def test_a_resumed_monitor_tries_the_cut_afresh_on_its_own_first_batch(quiet_log):
    torch.manual_seed(0)
    model = _Block(nn.Linear(DIM, DIM))
    batches = [torch.randn(4, 3, DIM, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    mon = _monitor(model)
    _train(model, mon, batches[:2], batches[0])
    state = mon.state_dict()
    mon.close()
    resumed = _monitor(model)
    resumed.load_state_dict(state)
    pairs = _train(model, resumed, batches[2:], batches[2])  # its probe: its first logged step's batch
    _assert_full_probes(pairs)
    assert resumed._probe.cut and torch.equal(resumed._probe.full[0][0], batches[2])
    assert [r["step"] for r in resumed.history[-4:]] == [2, 3, 4, 5]


def test_a_monitor_removed_in_the_middle_of_a_check_step_logs_nothing_and_leaves_the_model_alone(quiet_log):
    torch.manual_seed(0)
    model = _Block(nn.Linear(DIM, DIM))
    x = torch.randn(4, 3, DIM)
    mon = _monitor(model)
    _train(model, mon, [x, x], x)  # runs 0 and 1: both checks
    mon.begin_step()  # run 2 would be a check
    model(x).sum().backward()
    mon.remove()
    assert mon.end_step() is None and mon._probe.call is None and mon._probe.full is None
    assert not model._forward_pre_hooks and not model.norm._forward_pre_hooks
    pairs = _train(model, mon, [x, x], x)  # it may be used again: a fresh probe, tried cut again
    _assert_full_probes(pairs)
    assert mon._probe.cut and mon._probe.runs == 2


def test_a_tiny_gpt2_takes_the_cut_gives_the_full_probes_values_and_trains_as_its_unmonitored_twin(quiet_log):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    torch.manual_seed(0)
    twin = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 50, (4, 7), generator=g) for _ in range(3)]
    mon = _monitor(model, probe_rows=7, fallback="auto")
    opts = [torch.optim.SGD(m.parameters(), 0.5) for m in (model, twin)]
    pairs, last = [], None
    for x in batches:
        for m, opt, monitor in ((model, opts[0], mon), (twin, opts[1], None)):
            if monitor is not None:
                monitor.begin_step()
            loss = m(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if monitor is not None:
                monitor.end_step(loss)
        now = norm_inputs(model, batches[0])
        if last is not None:
            got = mon.history[-1]["quantities"]["output_change"]
            pairs.append((got, {k: output_change(last[k], now[k], 7) for k in got}))
        last = now
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    _assert_full_probes(pairs)
    assert mon._probe.cut and mon._probe.call[1]["input_ids"].shape[0] == 1


# ---------------------------------------------------------------------------------- two DDP ranks

WORLD = 2


@pytest.mark.slow
def test_two_ddp_ranks_with_batches_of_other_lengths_each_get_the_full_probes_values(tmp_path):
    # each rank's probe is its own batch (sequences of 5 on rank 0, of 3 on rank 1), the DDP wrapper broadcasts
    # the BatchNorm's buffers in each forward: no rank may run a pass the other does not. The probe pass (without
    # autograd) told DDP to skip the next training forward's broadcast of the buffers: each rank's model must stay
    # its unmonitored twin's
    from fairseq_helpers import run_script_ranks  # here: this file is also each rank's script

    codes, outs = run_script_ranks(__file__, [tmp_path], WORLD)
    assert codes == [0] * WORLD, "\n".join(outs)
    for r in range(WORLD):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["cut"] is False and got["probe_len"] == 5 - 2 * r
        assert len(got["pairs"]) == 3 and got["twin"] == [True] * 4
        for recorded, expected in got["pairs"]:
            assert recorded.keys() == expected.keys() and recorded
            for name in recorded:
                assert recorded[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-12), (r, name)


def _ddp_worker(out: Path) -> None:
    import copy as copy_module

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DDP(_Block(_BatchNormed()))
    g = torch.Generator().manual_seed(10 + rank)
    batches = [torch.randn(4, 5 - 2 * rank, DIM, generator=g) for _ in range(4)]
    torch.manual_seed(0)
    twin = DDP(_Block(_BatchNormed()))
    mon = _monitor(model)
    opt, twin_opt = torch.optim.SGD(model.parameters(), 0.5), torch.optim.SGD(twin.parameters(), 0.5)
    pairs, same, last = [], [], None
    for x in batches:
        for m, o, monitor in ((model, opt, mon), (twin, twin_opt, None)):
            if monitor is not None:
                monitor.begin_step()
            loss = m(x).pow(2).mean()
            loss.backward()
            o.step()
            o.zero_grad()
            if monitor is not None:
                monitor.end_step(loss)
        same.append(all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values())))
        # the full probe as the DDP wrapper runs it: on rank 0's buffers (broadcast before each forward)
        copy = copy_module.deepcopy(model.module)
        for b in copy.buffers():
            dist.broadcast(b, 0)
        now = {f"module.{k}": v for k, v in norm_inputs(copy, batches[0]).items()}
        if last is not None:
            got = mon.history[-1]["quantities"]["output_change"]
            pairs.append((got, {k: output_change(last[k], now[k], 3) for k in got}))
        last = now
    got = {"cut": mon._probe.cut, "probe_len": mon._probe.call[0][0].shape[1], "pairs": pairs, "twin": same}
    (out / f"rank{rank}.json").write_text(json.dumps(got))
    mon.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _ddp_worker(Path(sys.argv[1]))
