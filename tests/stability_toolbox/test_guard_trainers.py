"""The guard in the real HuggingFace Trainer and PyTorch Lightning Trainer, on tiny models: a poisoned step is
skipped and the run goes on; a monitor's deep Post-LN warning stops the run with the admin_torch remedy."""

import pytest
import torch
from torch import nn

POISON_AT = 20  # the forward call whose loss (and so gradient) is multiplied by 1e4
STEPS = 30
GUARD = dict(window=16, warmup=8, threshold=15.0, snapshot_every=5)


class FakeMonitor:
    def __init__(self):
        self.warnings = []


class Regression(nn.Module):
    """y = sum(x); the forward call number POISON_AT returns a loss 1e4 times too large."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.calls = 0

    def loss(self, x, y):
        loss = (self.lin(x) - y).pow(2).mean()
        if self.training and torch.is_grad_enabled():
            if self.calls == POISON_AT:
                loss = loss * 1e4
            self.calls += 1
        return loss


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 4 * STEPS

    def __getitem__(self, i):
        x = torch.randn(4, generator=torch.Generator().manual_seed(i))
        return {"x": x, "y": x.sum(0, keepdim=True)}


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def hf_run(tmp_path, transformers, monitor=None, warn_at=None, max_grad_norm=0.0, logging_steps=1000):
    from stability_toolbox.hf_guard_callback import StabilityGuardCallback

    class HFModel(Regression):
        def forward(self, x, y):
            if warn_at is not None and self.calls == warn_at:
                monitor.warnings.append({"quantity": "grad_ratio", "message": "stability warning: grad_ratio fell"})
            return {"loss": self.loss(x, y)}

    torch.manual_seed(0)
    model = HFModel()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=STEPS,
                                          learning_rate=1e-2, logging_steps=logging_steps, save_strategy="no",
                                          report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                                          max_grad_norm=max_grad_norm)
    cb = StabilityGuardCallback(monitor=monitor, **GUARD)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[cb])
    trainer.train()
    return cb, trainer


@pytest.mark.slow
def test_hf_trainer_skips_the_poisoned_step(tmp_path, transformers):
    cb, trainer = hf_run(tmp_path, transformers)
    assert [(e["update"], e["action"]) for e in cb.guard.events] == [(POISON_AT, "skip")]
    assert trainer.state.global_step == STEPS and cb.guard.skipped_updates == 1
    assert "step" not in trainer.optimizer.optimizer.__dict__  # detached at the end


@pytest.mark.slow
def scored_grad_norms(monkeypatch):
    """Spy on every guard: per guarded step, (the gradient norm scored, whether it was handed over)."""
    from stability_toolbox.guard import StabilityGuard

    seen = []
    original = StabilityGuard._signal_values

    def spy(self, grads, sharded, several, device, host=False, given=None):
        values, present = original(self, grads, sharded, several, device, host, given)
        seen.append((float(values[self.signals.index("grad_norm")]), given is not None))
        return values, present

    monkeypatch.setattr(StabilityGuard, "_signal_values", spy)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_hf_trainer_hands_its_pre_clip_norm_to_the_guard(tmp_path, transformers, monkeypatch, max_grad_norm):
    """The guard scores the Trainer's own gradient norm (the one it logs: before clipping), handed over at every
    update, and makes no pass of its own; with clipping at 1.0 the poisoned step's norm is still a spike (the
    clipped norm, at most 1.0, would hide it). The accelerator gets its method back at the end."""
    seen = scored_grad_norms(monkeypatch)
    cb, trainer = hf_run(tmp_path, transformers, max_grad_norm=max_grad_norm, logging_steps=1)
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(seen) == len(logged) == STEPS and all(handed for _, handed in seen)
    assert [v for v, _ in seen] == pytest.approx(logged, rel=1e-5)
    assert seen[POISON_AT][0] > 100 * max(v for v, _ in seen[POISON_AT - 5:POISON_AT])
    assert [(e["update"], e["action"], e["signals"]) for e in cb.guard.events] == \
        [(POISON_AT, "skip", ["loss_spike", "grad_norm_spike"])]
    assert "clip_grad_norm_" not in vars(trainer.accelerator)


@pytest.mark.slow
def test_hf_trainer_stops_on_deep_post_ln_warning(tmp_path, transformers):
    mon = FakeMonitor()
    cb, trainer = hf_run(tmp_path, transformers, monitor=mon, warn_at=12)
    assert cb.guard.stopped and trainer.state.global_step == 13
    assert "admin_torch.convert" in cb.stop_reason


def test_hf_callback_bad_arguments(transformers):
    from stability_toolbox.hf_guard_callback import StabilityGuardCallback

    with pytest.raises(ValueError, match="backoff"):
        StabilityGuardCallback(backoff=2.0)
    with pytest.raises(ValueError, match="min_ratio"):
        StabilityGuardCallback(min_ratio={"grad_norm": 0.5})
    with pytest.raises(TypeError, match="optimizer"):
        StabilityGuardCallback(optimizer=None)


@pytest.fixture(scope="module")
def pl():
    return pytest.importorskip("pytorch_lightning")


def lightning_run(pl, monitor=None, warn_at=None, gradient_clip_val=None, pre_clip=None):
    from stability_toolbox.lightning_callback import StabilityGuardLightning

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Regression()

        def training_step(self, batch, batch_idx):
            if warn_at is not None and self.net.calls == warn_at:
                monitor.warnings.append({"quantity": "grad_ratio", "message": "stability warning: grad_ratio fell"})
            return self.net.loss(batch["x"], batch["y"])

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 10)}

        def on_before_optimizer_step(self, optimizer):  # before Lightning clips: the norm, written out
            if pre_clip is not None:
                pre_clip.append(float(torch.stack([p.grad.double().pow(2).sum() for p in self.parameters()])
                                      .sum().sqrt()))

    torch.manual_seed(0)
    module = Module()
    cb = StabilityGuardLightning(monitor=monitor, **GUARD)
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                         gradient_clip_val=gradient_clip_val)
    trainer.fit(module, torch.utils.data.DataLoader(Data(), batch_size=4))
    return cb, trainer


@pytest.mark.slow
def test_lightning_trainer_skips_the_poisoned_step(pl):
    cb, trainer = lightning_run(pl)
    assert [(e["update"], e["action"]) for e in cb.guard.events] == [(POISON_AT, "skip")]
    assert trainer.global_step == STEPS and cb.guard.skipped_updates == 1


@pytest.mark.slow
@pytest.mark.parametrize("clip", [None, 1.0])
def test_lightning_clipping_hands_its_pre_clip_norm_to_the_guard(pl, monkeypatch, clip):
    """With gradient_clip_val the guard scores the norm Lightning's clipping computes (before clipping: the
    poisoned step is still a gradient-norm spike), handed over at every update; without clipping it computes the
    same norm itself. The plugin gets its method back at the end."""
    seen, pre_clip = scored_grad_norms(monkeypatch), []
    cb, trainer = lightning_run(pl, gradient_clip_val=clip, pre_clip=pre_clip)
    assert len(seen) == len(pre_clip) == STEPS
    assert all(handed == (clip is not None) for _, handed in seen)
    assert [v for v, _ in seen] == pytest.approx(pre_clip, rel=1e-5)
    assert [(e["update"], e["signals"]) for e in cb.guard.events] == [(POISON_AT, ["loss_spike", "grad_norm_spike"])]
    assert "clip_grad_by_norm" not in vars(trainer.precision_plugin)


@pytest.mark.slow
def test_lightning_trainer_stops_on_deep_post_ln_warning(pl):
    cb, trainer = lightning_run(pl, monitor=FakeMonitor(), warn_at=12)
    assert cb.guard.stopped and trainer.global_step == 13
    assert "admin_torch.convert" in cb.stop_reason


def test_lightning_callback_bad_arguments(pl):
    from stability_toolbox.lightning_callback import StabilityGuardLightning

    with pytest.raises(ValueError, match="window"):
        StabilityGuardLightning(window=1)
    with pytest.raises(ValueError, match="min_ratio"):
        StabilityGuardLightning(min_ratio=0.9)


@pytest.mark.slow
def test_real_monitor_deep_post_ln_stops_the_guard_with_admin_remedy(tmp_path, shared_data):
    """The real StabilityMonitor on the stability grid's deep Post-LN setting (Multi30k, seed 2: it warns on
    grad_ratio at update 20) drives the guard: the run stops cleanly with the admin_torch remedy, one update after
    the warning (the monitor's warning comes at the end of its step, after the guarded update)."""
    import torch.nn.functional as F

    from benchmarks import stability_grid as sg
    from stability_toolbox import StabilityMonitor
    from stability_toolbox.guard import GuardStopped, StabilityGuard

    torch.set_num_threads(1)
    train, _ = sg.load_data()
    settings = dict(kind="post_ln", depth=12, lr=2e-3)
    model = sg.build(settings, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1002)
    mon = StabilityMonitor(model, tmp_path, every=10, tensorboard=False, heatmaps=False)
    guard = StabilityGuard(model, opt, monitor=mon)
    for step in range(23):
        for g in opt.param_groups:
            g["lr"] = sg.lr_at(step, settings["lr"], 40, 21)
        starts = torch.randint(0, train.numel() - sg.SEQ - 1, (sg.BATCH,), generator=gen)
        batch = torch.stack([train[s:s + sg.SEQ + 1] for s in starts.tolist()])
        if guard.stopped:
            with pytest.raises(GuardStopped):
                guard.step()
            break
        with mon.step() as s:
            logits = model(batch[:, :-1])
            mon.observe_logits(logits)
            loss = F.cross_entropy(logits.reshape(-1, sg.VOCAB), batch[:, 1:].reshape(-1))
            loss.backward()
            mon.capture_grads()
            guard.step(loss)
            opt.zero_grad(set_to_none=True)
            s.loss = loss.detach()
    mon.close()
    assert guard.stopped and guard.updates == 22 and step == 22
    assert guard.events[-1]["signals"] == ["warning:grad_ratio"] and guard.events[-1]["action"] == "stop"
    assert "admin_torch.convert" in guard.stop_reason


@pytest.mark.slow
def test_lightning_accumulation_checkpoint_resume_and_manual_refusal(pl, tmp_path):
    """accumulate_grad_batches=2: the poisoned micro-batch's update (forward call 20 -> update 10) is skipped;
    the guard's state rides in Lightning's checkpoint and comes back on resume; manual optimization is refused."""
    from stability_toolbox.lightning_callback import StabilityGuardLightning

    class Module(pl.LightningModule):
        def __init__(self, manual=False):
            super().__init__()
            self.net = Regression()
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_idx):
            return self.net.loss(batch["x"], batch["y"])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def fit(module, cb, steps, ckpt=None, accumulate=2):
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[cb], accumulate_grad_batches=accumulate,
                             default_root_dir=tmp_path, enable_checkpointing=False)
        trainer.fit(module, torch.utils.data.DataLoader(Data(), batch_size=2), ckpt_path=ckpt)
        return trainer
    torch.manual_seed(0)
    cb = StabilityGuardLightning(**GUARD)
    trainer = fit(Module(), cb, 15)
    assert [(e["update"], e["action"]) for e in cb.guard.events] == [(10, "skip")]
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    cb2 = StabilityGuardLightning(**GUARD)
    fit(Module(), cb2, 16, ckpt=tmp_path / "c.ckpt")
    assert cb2.guard.updates == 16 and cb2.guard.skipped_updates == 1
    with pytest.raises(ValueError, match="automatic_optimization"):
        fit(Module(manual=True), StabilityGuardLightning(**GUARD), 2, accumulate=1)


class PoisonedData(Data):
    """Data with the 4 samples of batch POISON_AT (sequential order, batch 4) 1e3 times off their target."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        if i // 4 == POISON_AT:
            item["y"] = item["y"] * 1e3
        return item


def hf_resume_run(tmp_path, transformers, resume: bool):
    """STEPS updates checkpointed every 10 (resume: a new Trainer and callback continue from checkpoint 10)."""
    from stability_toolbox.hf_guard_callback import StabilityGuardCallback

    class HFModel(Regression):
        def forward(self, x, y):
            return {"loss": (self.lin(x) - y).pow(2).mean()}

    torch.manual_seed(0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=STEPS,
                                          learning_rate=1e-2, logging_steps=1000, save_strategy="steps", save_steps=10,
                                          report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                                          max_grad_norm=0.0, train_sampling_strategy="sequential", seed=0)
    # warm-up 12 of window 16: a guard that forgot its statistics at the resume (10 values from update 10 on) would
    # not be ready for the poisoned batch 20 with a fresh start; the restored one has 20 values behind it
    cb = StabilityGuardCallback(window=16, warmup=12, threshold=15.0, snapshot_every=5)
    trainer = transformers.Trainer(model=HFModel(), args=args, train_dataset=PoisonedData(), callbacks=[cb])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10") if resume else None)
    return cb, trainer


@pytest.mark.slow
def test_hf_trainer_resume_restores_the_guard(tmp_path, transformers):
    """A Trainer resumed from a checkpoint continues with the guard's saved state: the same events, counters and
    detector statistics as the uninterrupted run (a guard started afresh would miss the poisoned batch: its
    warm-up would not be over)."""
    import json

    full, full_trainer = hf_resume_run(tmp_path, transformers, resume=False)
    assert [(e["update"], e["action"]) for e in full.guard.events] == [(POISON_AT, "skip")]
    saved = json.loads((tmp_path / "checkpoint-10" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["StabilityGuardCallback"]["guard"]["updates"] == 10
    resumed, trainer = hf_resume_run(tmp_path, transformers, resume=True)
    assert trainer.state.global_step == STEPS
    assert [(e["update"], e["action"]) for e in resumed.guard.events] == [(POISON_AT, "skip")]
    a, b = full.guard.state_dict(), resumed.guard.state_dict()
    assert a["updates"] == b["updates"] == STEPS and a["skipped_updates"] == b["skipped_updates"] == 1
    for key in ("buffer", "count", "offset", "inv"):
        assert torch.allclose(a["detector"][key], b["detector"][key], equal_nan=True), key
    for (n, p), q in zip(full_trainer.model.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), n
