"""Attacks on the guard's ``min_ratio`` and ``observe_grad_norm`` and on the trainers' norm feeds (HuggingFace's
``accelerator.clip_grad_norm_``, Lightning's ``clip_grad_by_norm``): bad input, aliasing, old checkpoints, a run
ended by an exception, a user's clipping of some layers, two Trainers and a reused one."""

import json
import statistics

import numpy as np
import pytest
import torch
from torch import nn

from stability_toolbox.guard import StabilityGuard
from stability_toolbox.hf_guard_callback import _guard_state_from_json
from stability_toolbox.spike_detector import SpikeDetector

F32_MAX = float(torch.finfo(torch.float32).max)


def make_guard(**kw):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return model, opt, StabilityGuard(model, opt, **kw)


def spy_scored(monkeypatch):
    """Per guarded step: (the gradient norm scored, the norm handed over or None)."""
    seen = []
    original = StabilityGuard._signal_values

    def spy(self, grads, sharded, several, device, host=False, given=None):
        values, present = original(self, grads, sharded, several, device, host, given)
        seen.append((float(values[self.signals.index("grad_norm")]), None if given is None else float(given)))
        return values, present

    monkeypatch.setattr(StabilityGuard, "_signal_values", spy)
    return seen


# ---------------------------------------------------------------- min_ratio: bad input

@pytest.mark.parametrize("bad, exc", [
    (True, TypeError), (np.bool_(True), TypeError), ("2", TypeError), ([2.0], TypeError),
    (torch.ones(2), TypeError), (float("nan"), ValueError), (float("inf"), ValueError), (0.5, ValueError),
    (-2.0, ValueError), (1e39, ValueError), ({"bogus": 2.0}, ValueError), ({1: 2.0}, ValueError),
    ({"loss": True}, TypeError), ({"loss": None}, TypeError), ({"grad_norm": 1e39}, ValueError),
])
def test_a_bad_min_ratio_is_refused_by_name_and_wraps_nothing(bad, exc):
    """1e39 is a finite float but infinite in float32, where the cut is computed (it was accepted)."""
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(exc, match="min_ratio"):
        StabilityGuard(model, opt, min_ratio=bad)
    assert "step" not in vars(opt)
    with pytest.raises(exc, match="min_ratio"):
        SpikeDetector(min_ratio=bad)


@pytest.mark.parametrize("given, expected", [
    (np.float32(2.5), {"loss": 2.5, "grad_norm": 2.5}), (torch.tensor(3.0), {"loss": 3.0, "grad_norm": 3.0}),
    ({"loss": torch.tensor(1.5)}, {"loss": 1.5, "grad_norm": 2.0}), ({}, {"loss": 1.2, "grad_norm": 2.0}),
    (F32_MAX, {"loss": F32_MAX, "grad_norm": F32_MAX}),
])
def test_accepted_min_ratios(given, expected):
    assert make_guard(min_ratio=given)[2].detector.min_ratio == expected


@pytest.mark.parametrize("ratio", [1.0, 1e30, F32_MAX])
@pytest.mark.parametrize("host", [True, False])
def test_a_median_of_zero_leaves_the_z_score_alone_whatever_the_ratio(ratio, host):
    """A loss around 0 (median exactly 0, MAD 1): 100 is a spike by the rule written out (z = 100 / 1.4826 > 6 and
    100 > 0 + (ratio - 1) * |0|). Before the fix a ratio infinite in float32 made the cut NaN: never a spike."""
    det = SpikeDetector(("loss",), window=8, warmup=4, refresh_every=1, min_ratio=ratio)
    for v in (-1.0, 0.0, 1.0, 0.0, -1.0, 1.0, 0.0):
        det.score_host([v]) if host else det.score(torch.tensor([v]))
    med = statistics.median([-1.0, 0.0, 1.0, 0.0, -1.0, 1.0, 0.0])
    assert med == 0.0
    _, event, _, _ = det.score_host([100.0]) if host else det.score(torch.tensor([100.0]))
    assert bool(event[0])


# ---------------------------------------------------------------- observe_grad_norm: aliasing, dtypes, autograd

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_a_handed_norm_changed_afterwards_is_scored_as_handed(dtype, requires_grad, monkeypatch):
    """The trainer hands 1.5 and then writes into its tensor (a reused buffer): the step scores 1.5. Before the
    fix a float64 norm was kept by reference (``.double()`` is its no-op): the step scored 123."""
    seen = spy_scored(monkeypatch)
    model, opt, guard = make_guard(window=8, warmup=4)
    model(torch.randn(4, 3)).sum().backward()
    leaf = torch.tensor(1.5, dtype=dtype, requires_grad=requires_grad)
    norm = leaf * 1 if requires_grad else leaf
    guard.observe_grad_norm(norm)
    with torch.no_grad():
        norm.fill_(123.0)
    guard.step()
    assert seen == [(1.5, 1.5)]


def test_the_same_tensor_handed_at_every_update_is_read_at_each(monkeypatch):
    seen = spy_scored(monkeypatch)
    model, opt, guard = make_guard(window=8, warmup=4)
    buffer = torch.zeros((), dtype=torch.float64)
    for i in range(3):
        model(torch.randn(4, 3)).sum().backward()
        buffer.fill_(float(i + 1))
        guard.observe_grad_norm(buffer)
        buffer.fill_(-7.0)  # the trainer reuses it before the step
        guard.step()
        opt.zero_grad()
    assert [given for _, given in seen] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("value", [np.float32(2.0), np.float64(2.0), np.int64(2), torch.tensor([2.0])])
def test_numpy_scalars_and_one_element_tensors_are_norms(value, monkeypatch):
    seen = spy_scored(monkeypatch)
    model, opt, guard = make_guard()
    model(torch.randn(4, 3)).sum().backward()
    guard.observe_grad_norm(value)
    guard.step()
    assert seen == [(2.0, 2.0)]


def test_two_guards_each_score_their_own_handed_norm(monkeypatch):
    """Two optimizers (two halves of a model), one guard each: a norm handed to one is not the other's, and
    detaching one leaves the other guarding."""
    seen = spy_scored(monkeypatch)
    torch.manual_seed(0)
    a, b = nn.Linear(3, 1), nn.Linear(3, 1)
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.0), torch.optim.SGD(b.parameters(), lr=0.0)
    ga, gb = StabilityGuard(a, oa), StabilityGuard(b, ob)
    x = torch.randn(4, 3)
    (a(x) + b(x)).sum().backward()
    true_b = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in b.parameters()])))
    ga.observe_grad_norm(5.0)
    oa.step()
    ob.step()
    assert seen[0] == (5.0, 5.0) and seen[1][1] is None and seen[1][0] == pytest.approx(true_b, rel=1e-6)
    ga.detach()
    assert "step" not in vars(oa) and getattr(vars(ob)["step"], "_stability_guard", None) is gb
    gb.detach()


# ---------------------------------------------------------------- a checkpoint from before min_ratio

#: ``json.dumps(_guard_state_to_json(guard.state_dict()))`` written by the guard of commit adc316d^ (no min_ratio):
#: window 6, refresh_every 1, six updates with the losses 2.00..2.05 and the gradient norms below
OLD_STATE = json.loads(
    '{"updates": 6, "skipped_updates": 0, "undone_updates": 0, "rewinds": 0, "stopped": false, "stop_reason": null, '
    '"detector": {"buffer": {"dtype": "float32", "shape": [2, 7], "values": [2.0, 2.009999990463257, '
    '2.0199999809265137, 2.0299999713897705, 2.0399999618530273, 2.049999952316284, NaN, 1.0, 1.100000023841858, '
    '0.8999999761581421, 1.0499999523162842, 0.949999988079071, 1.0, NaN]}, "count": {"dtype": "int64", "shape": [], '
    '"values": [6]}, "offset": {"dtype": "float32", "shape": [2], "values": [-49.9987678527832, -13.489630699157715]}, '
    '"inv": {"dtype": "float32", "shape": [2], "values": [24.75186538696289, 13.489630699157715]}, "calls": 6}, '
    '"skip_indices": [], "forced_skips": 0, "backoff_left": 0, "skip_log": [], "skipped": [], "rewind_times": [], '
    '"lr_cuts": 0}')
OLD_LOSSES = [2.0, 2.01, 2.02, 2.03, 2.04, 2.05]
OLD_NORMS = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0]


def expected_spike(window, x, threshold, ratio, rel_floor=0.02, abs_floor=1e-6):
    """The rule written out: z = (x - med) / (max(1.4826 MAD, rel_floor |med|) + abs_floor) > threshold and
    x > med + (ratio - 1) |med|."""
    med = statistics.median(window)
    mad = statistics.median([abs(v - med) for v in window])
    z = (x - med) / (max(1.4826 * mad, rel_floor * abs(med)) + abs_floor)
    return z > threshold and x > med + (ratio - 1) * abs(med)


@pytest.mark.parametrize("loss, norm", [(2.3, 1.0), (2.5, 1.0), (2.02, 1.9), (2.02, 2.1)])
@pytest.mark.parametrize("decide_on_host", [None, False])
def test_a_checkpoint_from_before_min_ratio_loads_and_decides_with_the_ratios(loss, norm, decide_on_host):
    """The old guard's state loads into a guard with the default ratios (1.2, 2.0), which then decide: a loss
    of 2.3 is ~7 robust sigmas above its median 2.025 but only 1.14x it (no spike); 2.5 is both; a gradient norm
    of 1.9 is ~12 sigmas but 1.9x; 2.1 is both."""
    model, opt, guard = make_guard(window=6, warmup=4, threshold=6.0, refresh_every=1, decide_on_host=decide_on_host)
    guard.load_state_dict(_guard_state_from_json(OLD_STATE))
    assert guard.updates == 6 and guard.detector.min_ratio == {"loss": 1.2, "grad_norm": 2.0}
    model.weight.grad = torch.tensor([[norm, 0.0, 0.0]])
    model.bias.grad = torch.zeros(1)
    guard.step(loss=loss)
    guard.flush()
    signals = [s for e in guard.events for s in e["signals"]]
    assert ("loss_spike" in signals) == expected_spike(OLD_LOSSES, loss, 6.0, 1.2)
    assert ("grad_norm_spike" in signals) == expected_spike(OLD_NORMS, norm, 6.0, 2.0)
    assert {(2.3, 1.0): [], (2.5, 1.0): ["loss_spike"], (2.02, 1.9): [],
            (2.02, 2.1): ["grad_norm_spike"]}[(loss, norm)] == signals


# ---------------------------------------------------------------- HuggingFace

class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, x, y):
        return {"loss": (self.a(x) + 3 * self.b(x) - y).pow(2).mean()}


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        x = torch.randn(4, generator=torch.Generator().manual_seed(i))
        return {"x": x, "y": x.sum(0, keepdim=True)}


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def hf_trainer(transformers, tmp_path, callbacks, steps=5, **kw):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps,
                                          learning_rate=1e-2, logging_steps=1000, save_strategy="no", report_to=[],
                                          use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, **kw)
    torch.manual_seed(0)
    return transformers.Trainer(model=TwoHeads(), args=args, train_dataset=Data(), callbacks=callbacks)


@pytest.mark.slow
def test_hf_a_users_clipping_of_some_layers_is_not_the_global_norm(transformers, tmp_path, monkeypatch):
    """A user's callback clips head ``b`` through the accelerator at ``on_pre_optimizer_step`` (after the Trainer's
    own call): the guard scores the global norm of the gradients it steps on (written out, read just before), not
    the subset's. Before the fix the wrapper handed the subset's norm (head ``b``'s alone) as the global one."""
    from stability_toolbox.hf_guard_callback import StabilityGuardCallback

    seen = spy_scored(monkeypatch)
    full = []

    class Witness(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            full.append(float(torch.stack([p.grad.double().pow(2).sum() for p in trainer.model.parameters()])
                              .sum().sqrt()))
            trainer.accelerator.clip_grad_norm_(trainer.model.b.parameters(), 1e9)  # clips nothing

    trainer = hf_trainer(transformers, tmp_path, [StabilityGuardCallback(window=8, warmup=4), Witness()])
    trainer.train()
    assert len(seen) == len(full) == 5
    assert [v for v, _ in seen] == pytest.approx(full, rel=1e-5)


@pytest.mark.slow
def test_hf_two_trainers_and_a_reused_one(transformers, tmp_path, monkeypatch):
    """Trainer A has the guard, Trainer B (built before A trains) has none: A's accelerator feeds A's guard at every
    update, B's accelerator and optimizer are never touched; A trained a second time hands its norm again, and
    after each train() nothing is left wrapped."""
    from stability_toolbox.hf_guard_callback import StabilityGuardCallback

    seen = spy_scored(monkeypatch)
    cb = StabilityGuardCallback(window=8, warmup=4)
    a = hf_trainer(transformers, tmp_path / "a", [cb])
    b = hf_trainer(transformers, tmp_path / "b", [])
    a.train()
    assert len(seen) == 5 and all(given is not None for _, given in seen) and cb.guard.updates == 5
    assert "clip_grad_norm_" not in vars(a.accelerator) and "step" not in vars(a.optimizer.optimizer)
    first_guard = cb.guard
    b.train()
    assert len(seen) == 5 and first_guard.updates == 5  # B's updates reach no guard
    assert "clip_grad_norm_" not in vars(b.accelerator) and "step" not in vars(b.optimizer.optimizer)
    a.train()
    assert len(seen) == 10 and all(given is not None for _, given in seen[5:]) and cb.guard.updates == 5
    assert "clip_grad_norm_" not in vars(a.accelerator)


@pytest.mark.slow
def test_hf_a_detached_guard_is_not_fed(transformers, tmp_path, monkeypatch):
    """The user detaches the guard mid-run: the accelerator's wrapper hands it nothing more."""
    from stability_toolbox.hf_guard_callback import StabilityGuardCallback

    observed = []
    monkeypatch.setattr(StabilityGuard, "observe_grad_norm", lambda self, norm: observed.append(float(norm)))

    class DetachAt2(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                cb.guard.detach()

    cb = StabilityGuardCallback(window=8, warmup=4)
    trainer = hf_trainer(transformers, tmp_path, [cb, DetachAt2()])
    trainer.train()
    assert len(observed) == 2


# ---------------------------------------------------------------- Lightning

@pytest.fixture(scope="module")
def pl():
    return pytest.importorskip("pytorch_lightning")


@pytest.mark.slow
@pytest.mark.parametrize("clip", [None, 1.0])
def test_lightning_a_fit_ended_by_an_exception_gives_everything_back(pl, clip):
    """training_step raises at batch 3: the precision plugin's clip_grad_by_norm and the optimizer's step are
    given back (before the fix both stayed wrapped, feeding and guarding a dead run)."""
    from stability_toolbox.lightning_callback import StabilityGuardLightning

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin, self.boom = nn.Linear(4, 1), 3

        def training_step(self, batch, i):
            if i == self.boom:
                raise RuntimeError("boom")
            return (self.lin(batch["x"]) - batch["y"]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    cb = StabilityGuardLightning(window=8, warmup=4)
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                         gradient_clip_val=clip)
    module = Module()
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, torch.utils.data.DataLoader(Data(), batch_size=4))
    assert "clip_grad_by_norm" not in vars(trainer.precision_plugin)
    assert "step" not in vars(trainer.optimizers[0])
    assert cb.guard.updates == 3
