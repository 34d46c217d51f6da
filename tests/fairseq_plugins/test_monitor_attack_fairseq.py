"""Adversarial review of ``--stability-monitor``'s per-update path (`fairseq_plugins.monitor.monitored_step`): a
train_step that raises or returns None (fairseq made no update: fp16 overflow, out of memory, the guard's skipped
non-finite step) records nothing and logs each update once; a tensor loss; the interval flag's spellings; and the
real fairseq-train with gradient accumulation and memory-efficient fp16 (one batch, one process)."""

import argparse
import json

import pytest
import torch

import fairseq_plugins  # noqa: F401  (installs the repairs)
from fairseq_plugins import monitor as fm
from fairseq_plugins.flags import FlagError
from fairseq_helpers import PLUGINS_DIR, TINY_TRANSFORMER_ARGS, run_tool_batch
from stability_toolbox import SignalRule, StabilityMonitor


class _Trainer:
    """What `monitored_step` reads of a fairseq Trainer around a real small-LM step. ``fail(update, attempt)``
    says whether this call fails (``"raise"``: after its backward, as fairseq's FloatingPointError; ``"none"``: the
    update is skipped, gradients dropped and None returned, as fairseq's overflow / OOM skip); a failed call does not
    advance the counter, and the batch of an update is the same at every attempt (seeded by the update)."""

    def __init__(self, fail=lambda u, a: None, tensor_loss=False):
        from admin_torch import make_stack

        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Embedding(11, 8),
                                         make_stack("pre_ln", depth=2, dim=8, heads=2, seed=0, causal=True),
                                         torch.nn.Linear(8, 11))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.fail, self.tensor_loss, self.updates, self.attempts = fail, tensor_loss, 0, {}

    def get_num_updates(self):
        return self.updates

    def train_step(self, samples, raise_oom=False):
        u = self.updates
        attempt = self.attempts[u] = self.attempts.get(u, -1) + 1
        self.opt.zero_grad()
        x = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(u))
        loss = torch.nn.functional.cross_entropy(self.model(x).reshape(-1, 11), x.reshape(-1))
        loss.backward()
        how = self.fail(u, attempt)
        if how == "raise":
            raise FloatingPointError(f"gradients are Nan/Inf at update {u}")
        if how == "none":
            self.opt.zero_grad(set_to_none=True)
            return None
        self.opt.step()
        self.updates += 1
        return {"loss": loss.detach() if self.tensor_loss else float(loss.detach())}


def _run(fail=lambda u, a: None, tensor_loss=False, updates=7):
    trainer = _Trainer(fail, tensor_loss)
    rules = [SignalRule("loss", 1e9, "rising", baseline=1, lag=0, smooth=1, persist=1, start=0)]
    trainer._stability_monitor = mon = StabilityMonitor(trainer.model, every=2, per_update=True, signal_rules=rules)
    errors = []
    while trainer.updates < updates:
        try:
            fm.monitored_step(trainer, trainer.train_step, [])
        except FloatingPointError as err:
            errors.append(str(err))
    mon.close()
    return mon.history, errors


@pytest.mark.parametrize("how", ["raise", "none"])
@pytest.mark.parametrize("where", [0, 3, 4])  # a logged update (0, 4) and one between (3)
def test_a_failed_or_skipped_update_records_nothing(how, where):
    """The run with a failed first attempt at update ``where`` records exactly what the run without it records
    (bit for bit: the retry sees the same batch and weights): each logged update once, no record of the failure."""
    clean, _ = _run()
    history, errors = _run(lambda u, a: how if (u, a) == (where, 0) else None)
    assert [r["step"] for r in history] == [0, 2, 4, 6]
    assert errors == ([f"gradients are Nan/Inf at update {where}"] if how == "raise" else [])  # fairseq's own error
    assert json.dumps(history, sort_keys=True) == json.dumps(clean, sort_keys=True)


def test_a_tensor_loss_is_recorded_as_its_value():
    floats, _ = _run(updates=3)
    tensors, _ = _run(tensor_loss=True, updates=3)
    assert [r["updates"]["loss"] for r in tensors] == [r["updates"]["loss"] for r in floats]
    assert all(r["loss"] > 0 for r in tensors)


@pytest.mark.parametrize("value, parsed", [(" 3 ", 3), ("+3", 3), ("\uff13", 3), ("1_0", 10), ("\uff10", None),
                                           ("-0", None), ("3.0", None), ("", None), ("0x3", None)])
def test_the_interval_flag_reads_what_an_argparse_int_flag_reads(tmp_path, value, parsed):
    """--stability-monitor-interval parses as fairseq's own integer flags (argparse ``type=int``: Python's int of
    the string, surrounding whitespace, a sign, Unicode digits and underscores included), then the library's bound
    (>= 1)."""
    args = argparse.Namespace(stability_monitor=str(tmp_path / "m"), stability_monitor_interval=value)
    if parsed is None:
        with pytest.raises(FlagError, match="^--stability-monitor-interval must be an integer >= 1"):
            fm.check_monitor_flags(args)
    else:
        fm.check_monitor_flags(args)
        assert args.stability_monitor_interval == parsed and type(args.stability_monitor_interval) is int


@pytest.mark.slow
def test_fairseq_train_with_update_freq_and_memory_efficient_fp16(tmp_path, tiny_translation_data):
    """The real fairseq-train, one process: gradient accumulation (--update-freq 2: one monitor step per update,
    not per micro-batch), --memory-efficient-fp16 on CPU, the interval written ' 2 ' / '+2'; --fp16 itself is
    refused on CPU by fairseq (its FP16 optimizer needs CUDA), not by the plugin."""
    cases = {"uf2": ["--update-freq", "2"], "mefp16": ["--memory-efficient-fp16"], "plus": [], "fp16": ["--fp16"]}
    intervals = {"uf2": " 2 ", "mefp16": "2", "plus": "+2", "fp16": "2"}
    runs = run_tool_batch("train", [
        [tiny_translation_data.bin, "--user-dir", PLUGINS_DIR, *TINY_TRANSFORMER_ARGS, *extra, "--max-update", "6",
         "--no-save", "--save-dir", tmp_path / "ck", "--stability-monitor", tmp_path / name, "--stability-monitor-interval", intervals[name]]
        for name, extra in cases.items()])
    for (name, _), proc in zip(cases.items(), runs):
        if name == "fp16":
            assert proc.returncode != 0 and "CUDA" in proc.stdout and "stability" not in proc.stdout.split("Error")[-1]
            continue
        assert proc.returncode == 0, proc.stdout[-3000:]
        records = [json.loads(x) for x in (tmp_path / name / "monitor.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [0, 2, 4], name
        assert all(r["loss"] > 0 and r["quantities"]["update_ratio"]["decoder.layers.1"] > 0 for r in records), name
