"""The guard used as an adversarial user would: bad ``refresh_every``, the detector's host path against its
device path on hostile series (NaN, inf, beyond float32, flat, exactly at the threshold), a resume in the middle
of a refresh cycle, parameters replaced or added mid-run, the "stepped twice" check against a partial backward
and a real double step, and the HuggingFace callback's resume edges."""

import json
import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stability_toolbox import StabilityGuard
from stability_toolbox.spike_detector import SpikeDetector

NAMES = ("loss", "grad_norm")


# ---------------------------------------------------------------- refresh_every
@pytest.mark.parametrize("bad, kind", [(0, ValueError), (-3, ValueError), (1.5, TypeError), (2.0, TypeError),
                                       (True, TypeError), ("4", TypeError), (None, TypeError)])
def test_refresh_every_bad_values_are_refused_by_name(bad, kind):
    with pytest.raises(kind, match="refresh_every"):
        SpikeDetector(NAMES, refresh_every=bad)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = opt.step
    with pytest.raises(kind, match="refresh_every"):
        StabilityGuard(model, opt, refresh_every=bad)
    assert opt.step == step  # a refused construction wraps nothing


# ---------------------------------------------------------------- host path == device path
def both_paths(series, **kw):
    """Each step's (event, nonfinite) flags from `score` (tensor path) and `score_host` (Python floats)."""
    dev, host = SpikeDetector(NAMES, **kw), SpikeDetector(NAMES, **kw)
    out_dev, out_host = [], []
    for values in series:
        _, event, nonfinite, _ = dev.score(torch.tensor(values, dtype=torch.float64))
        out_dev.append((event.tolist(), nonfinite.tolist()))
        _, event_h, nonfinite_h, any_h = host.score_host(list(values))
        assert any_h == any(event_h)
        out_host.append((event_h, nonfinite_h))
    assert torch.equal(dev.state_dict()["buffer"].nan_to_num(7.0), host.state_dict()["buffer"].nan_to_num(7.0))
    return out_dev, out_host


values = st.one_of(st.floats(0.5, 2.0), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([1.0, 0.0, 1e39, -1e39, 3.4028235e38, float("nan"), float("inf")]))


ratios = st.one_of(st.just(1.0), st.floats(1.0, 4.0), st.sampled_from([1.2, 2.0, 1e30]))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(series=st.lists(st.tuples(values, values), min_size=1, max_size=40), window=st.integers(2, 8),
       warmup_frac=st.floats(0.0, 1.0), refresh_every=st.integers(1, 5), loss_ratio=ratios, norm_ratio=ratios)
def test_host_and_device_paths_take_the_same_decisions(series, window, warmup_frac, refresh_every, loss_ratio,
                                                        norm_ratio):
    warmup = 1 + int(warmup_frac * (window - 1))
    dev, host = both_paths(series, window=window, warmup=warmup, refresh_every=refresh_every,
                           min_ratio={"loss": loss_ratio, "grad_norm": norm_ratio})
    assert dev == host


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ratio", [1.3, 2.0])
def test_host_and_device_agree_exactly_at_the_ratio(seed, ratio):
    """Values at the ratio's cut (median x min_ratio, written out in float64, where it binds: a tight spread) and
    their float neighbours decide alike on both paths."""
    gen = torch.Generator().manual_seed(seed)
    base = (1.0 + 1e-4 * torch.rand(6, generator=gen, dtype=torch.float64)).float().double().tolist()
    med = sorted(base)[2]
    edge = med * ratio
    hits = []
    for x in (edge, math.nextafter(edge, 0), math.nextafter(edge, 10), float(torch.tensor(edge).float()),
              edge * (1 - 1e-6), edge * (1 + 1e-6)):
        dev, host = both_paths([(b, 1.0) for b in base] + [(x, 1.0)], window=8, warmup=4, refresh_every=1,
                               min_ratio={"loss": ratio, "grad_norm": 1.0})
        assert dev == host, x
        hits.append(dev[-1][0][0])
    assert hits[-2:] == [False, True]  # the ratio decides here, not the z-score (far above 6 for both)


def test_values_beyond_float32_are_nonfinite_on_both_paths():
    # 1e39 is finite in Python but infinite in the float32 statistics: both paths call it non-finite
    dev, host = both_paths([(1.0, 1.0)] * 3 + [(1e39, 1.0)], window=8, warmup=2, refresh_every=2)
    assert dev == host and dev[-1] == ([True, False], [True, False])


@pytest.mark.parametrize("seed", range(4))
def test_host_and_device_agree_exactly_at_the_threshold(seed):
    """Values whose z-score is the threshold itself (written out: median + threshold * 1.4826 MAD, in float64) and
    their float neighbours: float32 arithmetic on one path and float64 on the other must not split the decision."""
    gen = torch.Generator().manual_seed(seed)
    base = (1.0 + 0.01 * torch.rand(6, generator=gen, dtype=torch.float64)).float().double().tolist()
    med = sorted(base)[2]  # of 6 values, torch's (nan)median is the lower middle one
    mad = sorted(abs(b - med) for b in base)[2]
    scale = max(1.4826 * mad, 0.02 * abs(med)) + 1e-6
    edge = med + 6.0 * scale
    for x in (edge, math.nextafter(edge, 0), math.nextafter(edge, 10), float(torch.tensor(edge).float())):
        dev, host = both_paths([(b, 1.0) for b in base] + [(x, 1.0)], window=8, warmup=4, refresh_every=1)
        assert dev == host, x


def test_flat_series_has_no_scale_on_both_paths():
    # median and MAD both 0: no rise is a spike; still identical on both paths; a NaN is an event on both
    series = [(0.0, 0.0)] * 10 + [(5.0, 1e-3), (float("nan"), 0.0)]
    dev, host = both_paths(series, window=8, warmup=2, refresh_every=3)
    assert dev == host
    assert dev[-2] == ([False, False], [False, False]) and dev[-1] == ([True, False], [True, False])


# ---------------------------------------------------------------- resume mid refresh cycle
@pytest.mark.parametrize("cut", [9, 12, 13, 20])  # inside the warm-up refreshes, at and between refreshes
@pytest.mark.parametrize("host_first, host_then", [(True, True), (False, True), (True, False)])
def test_state_dict_mid_refresh_cycle_resumes_identically(cut, host_first, host_then):
    gen = torch.Generator().manual_seed(cut)
    series = (1.0 + 0.05 * torch.randn(32, 2, generator=gen, dtype=torch.float64)).tolist()
    series[15] = [9.0, 1.0]
    series[22] = [1.0, float("inf")]
    kw = dict(window=8, warmup=4, refresh_every=5)

    def run(det, xs, host):
        out = []
        for x in xs:
            if host:
                z, e, _, _ = det.score_host(x)
            else:
                z, e, _, _ = det.score(torch.tensor(x))
                z, e = z.tolist(), e.tolist()
            out.append((e, [round(v, 3) for v in z]))
        return out

    whole = run(SpikeDetector(NAMES, **kw), series, host_then)
    first = SpikeDetector(NAMES, **kw)
    head = run(first, series[:cut], host_first)
    resumed = SpikeDetector(NAMES, **kw)
    state = first.state_dict()
    resumed.load_state_dict(state)
    tail = run(resumed, series[cut:], host_then)
    strip = [[e for e, _ in part] for part in (whole, head + tail)]
    assert strip[0] == strip[1]
    assert [v for _, z in whole[cut:] for v in z] == pytest.approx([v for _, z in tail for v in z], nan_ok=True)
    assert whole[15][0] == [True, False] and whole[22][0] == [False, True]  # events (the test means something)


# ---------------------------------------------------------------- the cached parameter list
def make_guard(model, opt, **kw):
    return StabilityGuard(model, opt, window=8, warmup=3, snapshot_every=1000, signals=("grad_norm",), **kw)


def test_parameter_replaced_inside_its_group_is_seen():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = make_guard(model, opt)
    for _ in range(5):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        guard.step()
    new = nn.Parameter(torch.zeros(1, 4))
    opt.param_groups[0]["params"][0] = new  # same list, same length
    model.bias.grad = None
    new.grad = torch.full((1, 4), 1e6)
    guard.step()
    # the spike is the new parameter's gradient norm, sqrt(4) * 1e6: caught, the update not applied
    assert [e["signals"] for e in guard.events] == [["grad_norm_spike"]]
    assert torch.equal(new.detach(), torch.zeros(1, 4))


def test_param_group_added_and_layers_frozen_mid_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    guard = make_guard(model, opt)
    for _ in range(5):
        for p in model[0].parameters():
            p.grad = torch.ones_like(p)
        guard.step()
    opt.add_param_group({"params": list(model[1].parameters())})
    for p in model[0].parameters():  # the first layer frozen: no gradient any more
        p.requires_grad_(False)
        p.grad = None
    before = model[1].weight.detach().clone()
    model[1].weight.grad = torch.full((1, 4), 1e6)
    model[1].bias.grad = torch.zeros(1)
    guard.step()
    assert [e["signals"] for e in guard.events] == [["grad_norm_spike"]]
    assert torch.equal(model[1].weight.detach(), before)
    model[1].weight.grad = torch.ones(1, 4)  # a normal gradient of the new group: applied
    guard.step()
    assert len(guard.events) == 1 and not torch.equal(model[1].weight.detach(), before)


# ---------------------------------------------------------------- stepped twice
def test_partial_backward_without_zero_grad_is_not_a_double_step():
    """A second backward without zero_grad that reaches only some layers (conditional computation) changes the
    gradients of those: a legitimate update even when the sampled first, middle and last ones are untouched."""
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(5)])
    opt = torch.optim.SGD(layers.parameters(), lr=0.1)
    guard = StabilityGuard(layers, opt, snapshot_every=1000)
    x = torch.randn(3, 2)
    loss = sum(layer(x).sum() for layer in layers)
    loss.backward()
    guard.step(loss)
    loss = layers[1](x).sum() + layers[3](x).sum()
    loss.backward()
    guard.step(loss)  # accepted
    assert guard.updates == 2
    with pytest.raises(ValueError, match="called again"):
        guard.step()  # the real double step
    assert guard.updates == 2


@pytest.mark.parametrize("pattern", ["zero_sampled", "none_between", "all_zero"])
def test_real_double_step_is_refused_whatever_the_gradients_hold(pattern):
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(4)])
    opt = torch.optim.SGD(layers.parameters(), lr=0.1)
    guard = StabilityGuard(layers, opt, snapshot_every=1000)
    params = list(layers.parameters())
    for i, p in enumerate(params):
        if pattern == "none_between" and i % 2:
            continue  # every other gradient None
        p.grad = torch.zeros_like(p) if pattern == "all_zero" or (pattern == "zero_sampled" and i in (0, 4, 7)) \
            else torch.randn_like(p)
    guard.step()
    state = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="called again"):
        guard.step()
    assert guard.updates == 1 and all(torch.equal(p, s) for p, s in zip(params, state))


# ---------------------------------------------------------------- the HuggingFace callback
@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


STEPS = 12


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 4 * STEPS

    def __getitem__(self, i):
        x = torch.randn(4, generator=torch.Generator().manual_seed(i))
        y = x.sum(0, keepdim=True) * (1e3 if i // 4 == 9 else 1.0)  # batch 9: poisoned
        return {"x": x, "y": y}


class HFModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x, y):
        return {"loss": (self.lin(x) - y).pow(2).mean()}


def hf_train(tmp_path, transformers, resume=None, **extra):
    from stability_toolbox.hf_guard_callback import StabilityGuardCallback

    torch.manual_seed(0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-2,
        logging_steps=1000, save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, max_grad_norm=0.0, train_sampling_strategy="sequential", seed=0, **extra)
    cb = StabilityGuardCallback(window=8, warmup=6, threshold=15.0, snapshot_every=100)
    trainer = transformers.Trainer(model=HFModel(), args=args, train_dataset=Data(), callbacks=[cb])
    trainer.train(resume_from_checkpoint=None if resume is None else str(tmp_path / resume))
    return cb


@pytest.mark.slow
def test_hf_resume_twice_and_from_a_checkpoint_without_guard_state(tmp_path, transformers, caplog):
    full = hf_train(tmp_path, transformers)
    assert [(e["update"], e["action"]) for e in full.guard.events] == [(9, "skip")]
    # resumed at 4, then (from the resumed run's own checkpoint 8) again: the same decisions as the whole run
    once = hf_train(tmp_path, transformers, resume="checkpoint-4")
    twice = hf_train(tmp_path, transformers, resume="checkpoint-8")
    for run in (once, twice):
        assert [(e["update"], e["action"]) for e in run.guard.events] == [(9, "skip")]
        assert run.guard.updates == STEPS and run.guard.skipped_updates == 1
    # an older checkpoint (no guard state): the guard starts afresh (6 values: not warmed up for batch 9), warned
    state_file = tmp_path / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["stateful_callbacks"].pop("StabilityGuardCallback")
    state_file.write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="stability_toolbox.hf_guard_callback"):
        old = hf_train(tmp_path, transformers, resume="checkpoint-4")
    assert "without the guard's state" in caplog.text
    assert old.guard.updates == STEPS - 4 and old.guard.events == []


def test_hf_restore_callback_states_is_refused_by_name(tmp_path, transformers):
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint"):
        hf_train(tmp_path, transformers, restore_callback_states_from_checkpoint=True)


def test_hf_several_guard_callbacks_are_refused(tmp_path, transformers):
    from stability_toolbox.hf_guard_callback import StabilityGuardCallback

    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                                          report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = transformers.Trainer(model=HFModel(), args=args, train_dataset=Data(),
                                   callbacks=[StabilityGuardCallback(), StabilityGuardCallback()])
    with pytest.raises(ValueError, match="already guarded"):
        trainer.train()
