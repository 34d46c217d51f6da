"""stability_toolbox.probe: a probe cut to its leading samples replaces the full one only where every sublayer keeps
the same rows; output_change is the full probe's, written out, either way."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stability_toolbox import StabilityMonitor
from torch_helpers import norm_inputs
from stability_toolbox.probe import _samples_needed

DIM = 16


def _encoder(batch_first=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(DIM, 2, 2 * DIM, dropout=0.1, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _train(model, mon, batches, lr=1e-2):
    opt = torch.optim.SGD(model.parameters(), lr)
    for x in batches:
        mon.begin_step()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.end_step(loss)


@pytest.mark.parametrize("probe_rows", [7, 12, 20])
def test_a_cut_probe_gives_the_full_probes_output_change(probe_rows):
    model = _encoder()
    batches = [torch.randn(6, 5, DIM, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    mon = StabilityMonitor(model, every=1, probe_rows=probe_rows, tensorboard=False, heatmaps=False, rules={})
    before = norm_inputs(model, batches[0])  # the full probe (the first logged batch) at the first record
    _train(model, mon, batches[:2])
    after = norm_inputs(model, batches[0])  # and after the one update between the two records
    cut = mon._probe.call[0][0]
    need = math.ceil(probe_rows / 5)
    assert mon._probe.cut and torch.equal(cut, batches[0][:need])  # the fewest samples holding the rows
    record = mon.history[-1]["quantities"]["output_change"]
    assert set(record) == set(before)
    for name in before:
        was = before[name].reshape(-1, DIM)[:probe_rows]
        now = after[name].reshape(-1, DIM)[:probe_rows]
        written = float((now - was).pow(2).sum() / was.pow(2).sum())
        assert record[name] == pytest.approx(written, rel=1e-4), name
    _train(model, mon, batches[2:])  # the cut probe stays
    assert mon._probe.call[0][0].shape[0] == need


def test_enough_rows_in_one_sample_cut_to_one_and_too_few_rows_keep_every_sample():
    model = _encoder()
    x = torch.randn(4, 5, DIM)
    one = StabilityMonitor(model, every=1, probe_rows=5, tensorboard=False, heatmaps=False, rules={})
    _train(model, one, [x])
    assert one._probe.cut and one._probe.call[0][0].shape[0] == 1
    one.close()
    every = StabilityMonitor(model, every=1, probe_rows=16, tensorboard=False, heatmaps=False, rules={})
    _train(model, every, [x])  # 16 rows need all 4 samples: nothing to cut, no second pass
    assert every._probe.cut is False and torch.equal(every._probe.call[0][0], x)


def test_time_first_attention_that_looks_ahead_keeps_the_full_probe():
    model = _encoder(batch_first=False)
    x = torch.randn(6, 4, DIM)  # (time, batch, dim): a cut along the first dimension would cut time
    mon = StabilityMonitor(model, every=1, probe_rows=8, tensorboard=False, heatmaps=False, rules={})
    before = norm_inputs(model, x)
    _train(model, mon, [x, torch.randn(6, 4, DIM)])
    after = norm_inputs(model, x)
    assert mon._probe.cut is False and torch.equal(mon._probe.call[0][0], x)
    record = mon.history[-1]["quantities"]["output_change"]
    for name in before:  # the first 8 rows of (time, batch, dim): the first two time steps of every sample
        was, now = before[name].reshape(-1, DIM)[:8], after[name].reshape(-1, DIM)[:8]
        assert record[name] == pytest.approx(float((now - was).pow(2).sum() / was.pow(2).sum()), rel=1e-4)


class _BatchMixer(nn.Module):
    """A residual stack whose samples interact in eval mode (each row minus the batch's mean row)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)
        self.norm0, self.norm = nn.LayerNorm(DIM), nn.LayerNorm(DIM)

    def forward(self, x):
        x = self.norm0(x)
        h = self.lin(x)
        return self.norm(x + h - h.mean(0, keepdim=True))


class _Picky(nn.Module):
    """Refuses any batch but its first one's size (a cut probe makes it raise)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)
        self.norm0, self.norm = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.size = None

    def forward(self, x):
        self.size = self.size or x.shape[0]
        if x.shape[0] != self.size:
            raise RuntimeError("batch size changed")
        x = self.norm0(x)
        return self.norm(x + self.lin(x))


class _ShortSkips(nn.Module):
    """Skips its second residual sublayer on batches of fewer than 3 samples (another set of sublayers)."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)

    def forward(self, x):
        x = self.norm1(x + self.lin1(x))
        return self.norm2(x + self.lin2(x)) if x.shape[0] >= 3 else x


@pytest.mark.parametrize("make", [_BatchMixer, _Picky, _ShortSkips])
def test_a_cut_that_changes_the_rows_or_fails_keeps_the_full_probe(make):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(4, 3, DIM)
    mon = StabilityMonitor(model, every=1, probe_rows=3, tensorboard=False, heatmaps=False, rules={},
                           fallback="post_ln")
    _train(model, mon, [x, x])
    assert mon._probe.cut is False and torch.equal(mon._probe.call[0][0], x)
    assert mon.history[-1]["quantities"]["output_change"]  # the full probe still runs and is read


class _Memory(nn.Module):
    """Keeps each sample's mean output between calls (an RNN's carried state) and adds it, times 0, to the next
    call's input: a next batch of another size than the last call's is a RuntimeError."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)
        self.norm0, self.norm = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.memory = None

    def forward(self, x):
        if self.memory is not None:
            x = x + 0.0 * self.memory[: x.shape[0], None]
        x = self.norm0(x)
        y = self.norm(x + self.lin(x))
        self.memory = y.detach().mean(1)
        return y


def test_a_model_that_keeps_batch_sized_state_keeps_the_full_probe_and_trains_on():
    torch.manual_seed(0)
    model = _Memory()
    x = torch.randn(4, 3, DIM)
    mon = StabilityMonitor(model, every=1, probe_rows=6, tensorboard=False, heatmaps=False, rules={},
                           fallback="post_ln")
    _train(model, mon, [x, x, x])  # a cut probe (2 samples) would leave a 2-sample memory: the next step fails
    assert mon._probe.cut is False and torch.equal(mon._probe.call[0][0], x)
    assert model.memory.shape == (4, DIM)


def test_the_probe_pass_is_not_captured_as_the_probe():
    # the capture hook is live on the first logged step, whose probe pass calls the model too
    model = _encoder(batch_first=False)
    x = torch.randn(6, 4, DIM)
    mon = StabilityMonitor(model, every=1, probe_rows=8, tensorboard=False, heatmaps=False, rules={})
    _train(model, mon, [x])
    assert torch.equal(mon._probe.call[0][0], x) and mon._probe.step is None


def test_a_failed_step_drops_the_cut_probe_and_the_next_one_is_tried_again():
    model = _encoder()
    mon = StabilityMonitor(model, every=1, probe_rows=5, tensorboard=False, heatmaps=False, rules={})
    mon.begin_step()
    model(torch.randn(4, 5, DIM)).sum().backward()
    mon.discard_step()
    assert mon._probe.call is None and mon._probe.cut is None
    x = torch.randn(3, 5, DIM)
    _train(model, mon, [x])
    assert mon._probe.cut and torch.equal(mon._probe.call[0][0], x[:1])


def test_cut_and_full_passes_leave_rng_and_training_flags_alone():
    model = _encoder()
    mon = StabilityMonitor(model, every=1, probe_rows=5, tensorboard=False, heatmaps=False, rules={})
    mon.begin_step()
    model(torch.randn(4, 5, DIM)).sum().backward()
    state = torch.random.get_rng_state()
    mon.end_step(1.0)  # the probe pass and its cut pass
    assert mon._probe.cut and torch.equal(torch.random.get_rng_state(), state)
    assert all(m.training for m in model.modules())


@settings(max_examples=200, deadline=None)
@given(batch=st.integers(1, 12), per=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       probe_rows=st.integers(1, 120))
def test_samples_needed_is_the_fewest_that_hold_every_sites_rows(batch, per, probe_rows):
    rows = [batch * r for r in per]
    n = _samples_needed(batch, rows, probe_rows)
    fewest = next(k for k in range(1, batch + 1) if all(k * r >= min(probe_rows, batch * r) for r in per))
    assert n == (fewest if fewest < batch else None)


def test_samples_needed_refuses_what_it_cannot_cut():
    assert _samples_needed(None, [8], 4) is None  # no tensor input
    assert _samples_needed(4, [], 4) is None  # no site recorded
    assert _samples_needed(4, [10], 4) is None  # rows no multiple of the batch
    assert _samples_needed(4, [0], 4) is None  # an empty sublayer


@pytest.mark.parametrize("family", ["bert", "bart"])
def test_huggingface_keyword_inputs_are_cut_together_and_give_the_full_probes_values(family, monkeypatch):
    transformers = pytest.importorskip("transformers")
    if family == "bert":
        config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32)
        make = transformers.BertForMaskedLM
    else:
        config = transformers.BartConfig(vocab_size=50, d_model=16, encoder_layers=2, decoder_layers=2,
                                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                         decoder_ffn_dim=32)
        make = transformers.BartForConditionalGeneration
    ids = torch.randint(3, 50, (6, 7), generator=torch.Generator().manual_seed(0))
    records = []
    for cut in (True, False):
        torch.manual_seed(0)
        model = make(config)
        mon = StabilityMonitor(model, every=1, probe_rows=20, tensorboard=False, heatmaps=False, rules={})
        if not cut:  # the full probe at every logged step: what the monitor read before probes were cut
            monkeypatch.setattr(mon._probe, "_try_cut", lambda *a: False)
        opt = torch.optim.SGD(model.parameters(), 0.1)
        for _ in range(2):
            mon.begin_step()
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.end_step(loss)
        assert mon._probe.cut is cut
        shapes = {k: tuple(v.shape) for k, v in mon._probe.call[1].items()}
        assert shapes == {k: (3 if cut else 6, 7) for k in ("input_ids", "attention_mask", "labels")}
        records.append(mon.history[-1]["quantities"]["output_change"])
    assert records[0].keys() == records[1].keys() and records[0]
    for name, value in records[0].items():
        assert value == pytest.approx(records[1][name], rel=1e-4, abs=1e-9), name


def test_a_run_of_several_processes_keeps_the_full_probe(monkeypatch):
    # each rank decides the cut from its own batch, and a sharded model gathers its weights in every probe pass:
    # ranks running different numbers of passes would hang, so several processes never cut
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    model = _encoder()
    x = torch.randn(4, 5, DIM)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    mon = StabilityMonitor(model, every=1, probe_rows=5, tensorboard=False, heatmaps=False, rules={})
    _train(model, mon, [x, x, x])
    assert mon._probe.cut is False and torch.equal(mon._probe.call[0][0], x)
    assert calls == [4] * 6  # one training pass and one probe pass a step, whatever the data
