"""``fairseq-train --stability-guard``: the flags (one line naming the flag, exit 2) and a real training run."""

import argparse
import os

import pytest
from omegaconf import OmegaConf

import fairseq_plugins  # noqa: F401  (installs the repairs)
from fairseq_plugins import guard as fg
from fairseq_plugins.flags import FlagError
from fairseq_helpers import PLUGINS_DIR, TINY_TRANSFORMER_ARGS, run_tool, run_tool_batch


def _args(**kw):
    base = {"stability_guard": False, "stability_monitor": None}
    base.update({"stability_guard_" + n.replace("-", "_"): None for n in fg.OPTIONS})
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("kw, flag", [
    (dict(stability_guard=True, stability_guard_threshold="0"), "--stability-guard-threshold"),
    (dict(stability_guard=True, stability_guard_threshold="x"), "--stability-guard-threshold"),
    (dict(stability_guard=True, stability_guard_window="1"), "--stability-guard-window"),
    (dict(stability_guard=True, stability_guard_window="2.5"), "--stability-guard-window"),
    (dict(stability_guard=True, stability_guard_backoff="1.5"), "--stability-guard-backoff"),
    (dict(stability_guard=True, stability_guard_rewind_skip="-1"), "--stability-guard-rewind-skip"),
    (dict(stability_guard=True, stability_guard_warmup="200"), "--stability-guard-warmup"),
    (dict(stability_guard_snapshot_every="5"), "--stability-guard-snapshot-every"),
    (dict(stability_guard=True, stability_guard_lr_cut="1"), "--stability-guard-lr-cut"),
    (dict(stability_guard=True, stability_guard_lr_cut="0"), "--stability-guard-lr-cut"),
    (dict(stability_guard=True, stability_guard_lr_cut="nan"), "--stability-guard-lr-cut"),
    (dict(stability_guard=True, stability_guard_max_lr_cuts="-1"), "--stability-guard-max-lr-cuts"),
    (dict(stability_guard=True, stability_guard_max_lr_cuts="1.5"), "--stability-guard-max-lr-cuts"),
    (dict(stability_guard=True, stability_guard_snapshots="0"), "--stability-guard-snapshots"),
    (dict(stability_guard=True, stability_guard_backoff="0"), "--stability-guard-backoff"),
    (dict(stability_guard=True, stability_guard_threshold="inf"), "--stability-guard-threshold"),
    (dict(stability_guard=True, stability_guard_min_ratio="0.5"), "--stability-guard-min-ratio"),
    (dict(stability_guard=True, stability_guard_min_ratio="nan"), "--stability-guard-min-ratio"),
])
def test_flag_checks_name_the_flag(kw, flag):
    with pytest.raises(FlagError, match=flag):
        fg.check_guard_flags(_args(**kw))


def test_flags_parsed_with_defaults_and_read_from_the_configuration(tmp_path):
    environ = dict(os.environ)
    args = _args(stability_guard=True, stability_guard_threshold="8", stability_guard_rewind_skip="3")
    fg.check_guard_flags(args)
    assert (args.stability_guard_threshold, args.stability_guard_rewind_skip, args.stability_guard_window) == (8.0, 3, 128)
    fg.check_guard_flags(args)  # fairseq checks a model's configuration again: the parsed values pass
    cfg = OmegaConf.create({"common": {k: v for k, v in vars(args).items()}})
    settings = fg.guard_settings(cfg)
    assert settings["threshold"] == 8.0 and settings["rewind_skip"] == 3 and settings["window"] == 128
    assert settings["log_dir"] is None
    cfg.common.stability_monitor = str(tmp_path)
    assert fg.guard_settings(cfg)["log_dir"] == str(tmp_path)
    off = _args()
    fg.check_guard_flags(off)
    assert fg.guard_settings(OmegaConf.create({"common": vars(off)})) is None
    assert fg.guard_settings(OmegaConf.create({"common": {}})) is None
    assert dict(os.environ) == environ  # nothing goes through the environment


def test_the_flags_bounds_and_defaults_are_the_librarys():
    """Each flag accepts exactly what StabilityGuard / GuardPolicy accept (the library owns every bound), and an
    absent flag takes the library's default."""
    import torch
    from stability_toolbox import GuardPolicy, StabilityGuard

    def library_accepts(keyword, value):
        model = torch.nn.Linear(1, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            if keyword in fg.POLICY_KEYWORDS:
                GuardPolicy(**{keyword: value})
            else:
                StabilityGuard(model, opt, **{keyword: value})
        except (TypeError, ValueError):
            return False
        return True

    for name, (keyword, kind, _) in fg.OPTIONS.items():
        for value in (-1, 0, 0.5, 1, 2, 1.5, 200):
            if kind is int and value != int(value):
                continue
            value = kind(value)
            try:
                fg.check_guard_flags(_args(stability_guard=True, **{fg._dest(name): str(value)}))
                plugin = True
            except FlagError as err:
                assert str(err).startswith("--stability-guard-")  # this flag, or the one it conflicts with
                plugin = False
            assert plugin == library_accepts(keyword, value), (name, value)
    args = _args(stability_guard=True)
    fg.check_guard_flags(args)
    assert args.stability_guard_window == 128 and args.stability_guard_threshold == 6.0  # StabilityGuard's own


def test_the_learning_rate_cut_flags_reach_the_guards_policy():
    """--stability-guard-lr-cut / --stability-guard-max-lr-cuts are GuardPolicy fields: the guard fairseq builds
    cuts by that factor, that many times (the library's own defaults when not given)."""
    args = _args(stability_guard=True, stability_guard_lr_cut="0.25", stability_guard_max_lr_cuts="1")
    fg.check_guard_flags(args)
    trainer = FakeTrainer(bad=())
    trainer.cfg.common = OmegaConf.create({"common": vars(args)}).common
    guard = fg.make_guard(trainer, fg.guard_settings(trainer.cfg))
    assert (guard.policy.lr_cut, guard.policy.max_lr_cuts) == (0.25, 1)
    defaults = _args(stability_guard=True)
    fg.check_guard_flags(defaults)
    from stability_toolbox import GuardPolicy
    assert (defaults.stability_guard_lr_cut, defaults.stability_guard_max_lr_cuts) == (
        GuardPolicy().lr_cut, GuardPolicy().max_lr_cuts)


def test_the_min_ratio_flag_reaches_the_detector():
    """--stability-guard-min-ratio sets both signals' ratio; without it the library's per-signal defaults apply."""
    from stability_toolbox.spike_detector import DEFAULT_MIN_RATIO

    for given, expected in (("3", {"loss": 3.0, "grad_norm": 3.0}), (None, dict(DEFAULT_MIN_RATIO))):
        args = _args(stability_guard=True, stability_guard_min_ratio=given)
        fg.check_guard_flags(args)
        trainer = FakeTrainer(bad=())
        trainer.cfg.common = OmegaConf.create({"common": vars(args)}).common
        assert fg.make_guard(trainer, fg.guard_settings(trainer.cfg)).detector.min_ratio == expected


def test_parser_has_the_flags():
    from fairseq import options

    parser = options.get_training_parser()
    names = {s for a in parser._actions for s in a.option_strings}
    assert {"--stability-guard", "--stability-guard-threshold", "--stability-guard-backoff-updates"} <= names


@pytest.mark.slow
def test_fairseq_train_guard(tiny_translation_data, tmp_path):
    """A real run with the guard on and its defaults overridden; a bad value is one line, exit 2."""
    mon = tmp_path / "mon"
    common = [tiny_translation_data.bin, "--user-dir", PLUGINS_DIR, *TINY_TRANSFORMER_ARGS, "--no-save",
              "--save-dir", tmp_path / "ck", "--stability-guard"]  # its own save dir: fairseq writes <dir>/dummy
    bad, proc = run_tool_batch("train", [  # one process: fairseq's start-up is paid once
        [*common, "--max-update", "1", "--stability-guard-backoff", "2"],
        [*common, "--max-update", "8", "--stability-guard-snapshot-every", "3", "--stability-guard-warmup", "4",
         "--stability-monitor", mon, "--stability-monitor-interval", "4"]])
    assert bad.returncode == 2
    lines = [x for x in bad.stdout.splitlines() if "error:" in x]
    assert lines == ["fairseq-train: error: --stability-guard-backoff must be a finite real number in (0, 1], got 2.0"], \
        bad.stdout[-2000:]
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "stability guard: on Adam, snapshots every 3 updates" in proc.stdout
    assert "num_updates: 8 >= max_update: 8" in proc.stdout
    assert (mon / "monitor.jsonl").exists()


class FakeTrainer:
    """What the train-step wrapper reads of a fairseq Trainer; train_step raises fairseq's non-finite error
    at the calls listed in ``bad``."""

    def __init__(self, bad):
        import torch
        from types import SimpleNamespace

        self.model = torch.nn.Linear(2, 1)
        self.criterion = torch.nn.Module()
        self.optimizer = SimpleNamespace(optimizer=torch.optim.SGD(self.model.parameters(), lr=0.1))
        self.cfg = SimpleNamespace(optimization=SimpleNamespace(max_update=100), common=SimpleNamespace(
            stability_guard=True, **{"stability_guard_" + n.replace("-", "_"): fg.library_defaults()[kw]
                                     for n, (kw, _, _) in fg.OPTIONS.items()}))
        self.calls, self.bad, self.zeroed = 0, bad, 0

    def get_num_updates(self):
        return self.calls

    def zero_grad(self):
        self.zeroed += 1

    def train_step(self, samples, raise_oom=False):
        self.calls += 1
        if self.calls in self.bad:
            raise FloatingPointError("gradients are Nan/Inf")
        return {"loss": 1.0}


def test_train_step_turns_fairseq_nonfinite_into_a_skip_then_a_stop(monkeypatch):
    from fairseq_plugins.repairs.train_step import _wrap_train_step

    monkeypatch.setattr(FakeTrainer, "train_step", _wrap_train_step(FakeTrainer.train_step))
    trainer = FakeTrainer(bad={3})
    outs = [trainer.train_step([]) for _ in range(5)]
    assert outs[2] is None and outs[4] == {"loss": 1.0} and trainer.zeroed == 1
    g = fg.guard_of(trainer)
    assert [(e["signals"], e["action"]) for e in g.events] == [(["nonfinite"], "skip")]
    assert trainer.cfg.optimization.max_update == 100
    g.stopped, g.stop_reason = True, "test"  # once the guard stops, fairseq ends at its next check
    trainer.train_step([])
    assert trainer.cfg.optimization.max_update == trainer.get_num_updates()


@pytest.mark.parametrize("clip_norm", [0.0, 0.5])
def test_the_guard_scores_the_norm_fairseqs_trainer_computes(clip_norm, monkeypatch):
    """fairseq's own ``Trainer.clip_grad_norm`` (as installed: through the repair ``grad_norm``) and its
    ``utils.clip_grad_norm_``, called before each optimizer step as ``train_step`` does: the guard scores the norm
    they return (before clipping: with --clip-norm 0.5 the poisoned update is still a gradient-norm spike) and
    makes no pass of its own over the gradients."""
    import torch
    from types import SimpleNamespace

    from fairseq import utils as fairseq_utils
    from fairseq.trainer import Trainer

    from fairseq_plugins.repairs import _wrap
    from stability_toolbox.guard import StabilityGuard

    assert "fairseq_plugins.repairs.grad_norm._wrap_clip_grad_norm" in _wrap.wrapped_by(Trainer.clip_grad_norm)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    params = list(model.parameters())
    trainer = SimpleNamespace(is_fsdp=False, data_parallel_process_group=None, optimizer=SimpleNamespace(
        clip_grad_norm=lambda max_norm, aggregate_norm_fn=None: fairseq_utils.clip_grad_norm_(params, max_norm,
                                                                                               aggregate_norm_fn)))
    guard = trainer._stability_guard = StabilityGuard(model, opt, window=16, warmup=8, threshold=15.0)
    seen, returned = [], []
    original = guard._signal_values

    def spy(grads, sharded, several, device, host=False, given=None):
        values, present = original(grads, sharded, several, device, host, given)
        seen.append((float(values[1]), given is not None))
        return values, present

    monkeypatch.setattr(guard, "_signal_values", spy)
    gen = torch.Generator().manual_seed(1)
    for i in range(24):
        x = torch.randn(8, 4, generator=gen) * (1e3 if i == 20 else 1.0)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        returned.append(float(Trainer.clip_grad_norm(trainer, clip_norm)))  # train_step's call
        guard.step(loss)
        opt.zero_grad()
    assert all(handed for _, handed in seen)
    assert [v for v, _ in seen] == pytest.approx(returned, rel=1e-6)
    assert [(e["update"], e["signals"]) for e in guard.events] == [(20, ["loss_spike", "grad_norm_spike"])]
    guard.detach()
