"""The stability monitor at its edges: a failed step leaves nothing behind, refused calls change nothing, empty
logits or losses add nothing, a closed monitor refuses observations, a crashed run reads back and resumes, two
monitors on one model are independent, a monitored model pickles and copies, bad arguments are named, the
probe follows the model's dtype, and monitor.jsonl is strict JSON. Real models (the reference stacks and
torch.nn's encoder), seeded."""

import copy
import io
import json
import math

import pytest
import torch
from torch import nn

from admin_torch import make_stack
from stability_toolbox import StabilityMonitor
from stability_toolbox.monitor import read_records

from test_monitor import TwoLayer, _no_hooks

BUILDS = {
    "residual_modules": lambda: make_stack("admin", depth=2, dim=16, seed=0),
    "layer_descriptions": lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False),
    "fallback": lambda: _seeded(lambda: TwoLayer(dim=16, residual_modules=False)),
}


def _seeded(make, seed=0):
    torch.manual_seed(seed)
    return make()


def _model(kind):
    torch.manual_seed(0)
    return BUILDS[kind]()


def _batch(seed, scale=1.0):
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed)) * scale


def _step(model, opt, mon, x, loss_value=True):
    with mon.step() as s:
        loss = model(x).pow(2).mean()
        loss.backward()
        mon.capture_grads()
        opt.step()
        opt.zero_grad()
        if loss_value:
            s.loss = loss


def _quantities(record):
    return {q: rows for q, rows in record["quantities"].items() if q != "output_change"}


class _Boom(Exception):
    pass


@pytest.mark.parametrize("kind", list(BUILDS))
@pytest.mark.parametrize("fails", ["forward", "backward", "after_capture_grads", "bad_loss"])
def test_a_failed_step_leaves_no_capture_behind(kind, fails):
    """A logged step that fails (after its forward on a batch with large activations, after backward, after
    capture_grads, or with a loss that is not a number) logs nothing and leaves no hook; the retry's record
    equals that of a monitor that never saw the failed step (attention logits, gradients, betas, maxima)."""
    model = _model(kind)
    fresh_model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the failed step's update cannot differ either
    fresh_opt = torch.optim.SGD(fresh_model.parameters(), lr=0.0)
    mon, fresh = StabilityMonitor(model, every=1), StabilityMonitor(fresh_model, every=1)
    big = _batch(1, scale=50.0)
    with pytest.raises(_Boom if fails != "bad_loss" else TypeError, match=None if fails != "bad_loss" else "loss"):
        with mon.step() as s:
            loss = model(big).pow(2).mean()
            if fails == "forward":
                raise _Boom()
            loss.backward()
            if fails == "after_capture_grads":
                mon.capture_grads()
            if fails == "bad_loss":
                s.loss = "high"
            raise _Boom()
    assert not mon.history and _no_hooks(model)
    opt.zero_grad()
    for _ in range(2):
        x = _batch(2)
        _step(model, opt, mon, x)
        _step(fresh_model, fresh_opt, fresh, x)
    assert len(mon.history) == len(fresh.history) == 2
    for got, want in zip(mon.history, fresh.history):
        assert _quantities(got) == _quantities(want)
        assert got["quantities"]["output_change"] == want["quantities"]["output_change"]  # the same probe
    mon.close(), fresh.close()


def test_a_refused_end_step_changes_nothing():
    """end_step(loss='high') is refused before anything changes: the step stays open and a good end_step logs it."""
    model = _model("residual_modules")
    mon = StabilityMonitor(model, every=1)
    mon.begin_step()
    model(_batch(0)).pow(2).mean().backward()
    with pytest.raises(TypeError, match="loss must be a tensor or a real number"):
        mon.end_step(loss="high")
    assert not _no_hooks(model) and mon.step_count == 0
    assert mon.end_step(loss=1.0)["loss"] == 1.0 and _no_hooks(model)


def test_attach_optimizer_refused_when_closed_or_attached_twice():
    """attach_optimizer on a closed monitor: RuntimeError, no hook on the optimizer (its steps work); a second
    attach_optimizer: ValueError naming optimizer, and every=2 still logs every second step."""
    model = _model("residual_modules")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    closed = StabilityMonitor(model, every=1)
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed.attach_optimizer(opt)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks and _no_hooks(model)
    mon = StabilityMonitor(model, every=2).attach_optimizer(opt)
    with pytest.raises(ValueError, match="optimizer: this monitor is already driven by an optimizer"):
        mon.attach_optimizer(opt)
    with pytest.raises(ValueError, match="optimizer"):
        mon.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    for i in range(5):
        model(_batch(i)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert [h["step"] for h in mon.history] == [0, 2, 4]
    mon.close()
    assert _no_hooks(model) and not opt._optimizer_step_pre_hooks


@pytest.mark.parametrize("kind", list(BUILDS))
def test_two_monitors_on_one_model_are_independent(kind):
    """Two monitors on one model (every=1 and every=2): each one's records equal those of a lone monitor on a
    copy; neither records the other's probe pass."""
    model = _model(kind)
    lone_model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    lone_opt = torch.optim.SGD(lone_model.parameters(), lr=0.05)
    a, b = StabilityMonitor(model, every=1), StabilityMonitor(model, every=2)
    lone_a, lone_b = StabilityMonitor(lone_model, every=1), StabilityMonitor(lone_model, every=2)
    for i in range(4):
        x = _batch(10 + i)
        for (m, o, first, second) in ((model, opt, a, b), (lone_model, lone_opt, lone_a, None)):
            with first.step(), (second.step() if second is not None else _null()):
                m(x).pow(2).mean().backward()
                o.step()
                o.zero_grad()
    # the lone every=2 monitor, on its own copy run the same way
    lone2_model = copy.deepcopy(_model(kind))
    lone2_opt = torch.optim.SGD(lone2_model.parameters(), lr=0.05)
    lone_b = StabilityMonitor(lone2_model, every=2)
    for i in range(4):
        with lone_b.step():
            lone2_model(_batch(10 + i)).pow(2).mean().backward()
            lone2_opt.step()
            lone2_opt.zero_grad()
    assert [h["quantities"] for h in a.history] == [h["quantities"] for h in lone_a.history]
    assert [h["quantities"] for h in b.history] == [h["quantities"] for h in lone_b.history]
    for m in (a, b, lone_a, lone_b):
        m.close()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("kind", list(BUILDS))
def test_a_monitored_model_pickles_and_copies_without_reporting_into_the_monitor(kind):
    """With attach_optimizer the hooks stay on the model between steps: torch.save(model) works (the loaded
    model runs, reporting nowhere), and a deepcopy (an EMA copy) run forward and backward does not change what
    the monitor records."""
    model = _model(kind)
    ref_model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    mon = StabilityMonitor(model, every=1).attach_optimizer(opt)
    ref = StabilityMonitor(ref_model, every=1).attach_optimizer(ref_opt)
    for i in range(3):
        x = _batch(20 + i)
        assert not _no_hooks(model)  # armed for this step
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        ema = copy.deepcopy(model)
        for other in (loaded, ema):
            other(_batch(99, scale=30.0)).pow(2).mean().backward()
        for m, o in ((model, opt), (ref_model, ref_opt)):
            m(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    assert [h["quantities"] for h in mon.history] == [h["quantities"] for h in ref.history]
    assert len(mon.history) == 3
    mon.close(), ref.close()


@pytest.mark.parametrize("log_dir,exc,match", [
    (5, TypeError, "log_dir must be a directory path"), (b"", TypeError, "log_dir"),
    ("", ValueError, "log_dir must be a non-empty directory path"), (["runs"], TypeError, "log_dir"),
])
def test_bad_log_dir_is_named(log_dir, exc, match, tmp_path, monkeypatch):
    """log_dir of the wrong type or empty: named, and nothing is written (not even into the current directory)."""
    monkeypatch.chdir(tmp_path)
    model = _model("residual_modules")
    with pytest.raises(exc, match=match):
        StabilityMonitor(model, log_dir)
    assert not list(tmp_path.iterdir()) and _no_hooks(model)


@pytest.mark.parametrize("probe", [torch.randn(2, 5, 7), torch.randn(5), (torch.randn(2, 5, 16), 3),
                                   {"nonsense": torch.randn(2, 5, 16)}], ids=["width", "rank", "extra_arg", "kwarg"])
def test_a_probe_the_model_refuses_is_named(probe):
    """probe= inputs the model cannot take: the first logged step raises ValueError naming probe, and leaves no
    hook behind."""
    model = _model("residual_modules")
    mon = StabilityMonitor(model, every=1, probe=probe)
    with pytest.raises(ValueError, match="probe: the model refused the probe= inputs"):
        with mon.step():
            model(_batch(0)).pow(2).mean().backward()
    assert _no_hooks(model) and not mon.history


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("given", [False, True])
def test_the_probe_follows_the_model_dtype(dtype, given):
    """model.to(dtype) after a logged step: the next logged step runs (the stored probe follows the model) and
    reports the output change."""
    model = _model("residual_modules")
    mon = StabilityMonitor(model, every=1, probe=_batch(3) if given else None)
    _step(model, torch.optim.SGD(model.parameters(), lr=0.01), mon, _batch(4))
    model.to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _step(model, opt, mon, _batch(5).to(dtype))
    rows = mon.history[-1]["quantities"]["output_change"]
    assert rows and all(math.isfinite(v) for v in rows.values())
    mon.close()


def _strict(line):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize("value,text", [(float("nan"), "NaN"), (float("inf"), "Infinity"),
                                        (float("-inf"), "-Infinity")])
def test_monitor_jsonl_is_strict_json_with_non_finite_values_as_strings(value, text, tmp_path):
    """A non-finite loss (and the statistics it makes non-finite) is written as the strings "NaN", "Infinity",
    "-Infinity": every line parses as strict JSON, and float() reads the value back."""
    model = _model("residual_modules")
    mon = StabilityMonitor(model, tmp_path, every=1, tensorboard=False, heatmaps=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _step(model, opt, mon, _batch(0))
    with mon.step() as s:
        model(_batch(1) * value).pow(2).mean().backward()
        opt.zero_grad()
        s.loss = torch.tensor(value)
    mon.close()
    lines = (tmp_path / "monitor.jsonl").read_text().splitlines()
    records = [_strict(line) for line in lines]
    assert len(records) == 2 and records[1]["loss"] == text
    got = float(records[1]["loss"])
    assert (math.isnan(got) and math.isnan(value)) or got == value
    back = read_records(tmp_path / "monitor.jsonl")  # the history as the monitor held it
    assert back[1]["loss"] is not None and str(back[1]["loss"]) == str(mon.history[1]["loss"])
    assert [sorted(r["quantities"]) for r in back] == [sorted(h["quantities"]) for h in mon.history]


def test_hf_callback_trains_twice(tmp_path):
    """The same StabilityMonitorCallback in a second trainer.train(): a new monitor logs it (no "closed" error),
    appending to the same monitor.jsonl."""
    transformers = pytest.importorskip("transformers")
    from stability_toolbox.hf_callback import StabilityMonitorCallback

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids.clone()}

    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                                          logging_steps=100, save_strategy="no", report_to=[], use_cpu=True,
                                          disable_tqdm=True, dataloader_num_workers=0)
    cb = StabilityMonitorCallback(every=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[cb])
    trainer.train()
    first = cb.monitor
    trainer.train()
    assert cb.monitor is not first and [h["step"] for h in cb.monitor.history] == [0, 1]
    lines = (tmp_path / "stability" / "monitor.jsonl").read_text().splitlines()
    assert [_strict(line)["step"] for line in lines] == [0, 1, 0, 1]
    assert _no_hooks(model)


# ---------------------------------------------------------------- empty observations, closed monitors, records

@pytest.mark.parametrize("empty", [(0, 7), (0, 3, 7), (2, 0, 7)], ids=["no_rows", "no_batch", "no_positions"])
def test_logits_with_no_positions_add_nothing_and_never_warn(empty):
    """observe_logits on logits with no positions records nothing (before: log_z = 0/0 = NaN and a false
    "non-finite" warning): alone, the record has no log_z; beside real logits, log_z is theirs alone."""
    model = _model("residual_modules")
    rules = {"log_z_rms": {"threshold": 10.0}}
    mon = StabilityMonitor(model, every=1, rules=rules)
    real = torch.randn(4, 7, generator=torch.Generator().manual_seed(0)) * 3
    for logits in ([torch.empty(empty)], [torch.empty(empty), real, torch.empty(empty)]):
        with mon.step() as s:
            model(_batch(0)).pow(2).mean().backward()
            for t in logits:
                mon.observe_logits(t)
            s.loss = 1.0
    first, second = mon.history
    assert "log_z" not in first and "log_z_rms" not in first and not mon.warnings
    lz = real.double().logsumexp(-1)
    assert second["log_z"] == pytest.approx(lz.mean().item(), rel=1e-6)
    assert second["log_z_rms"] == pytest.approx(lz.pow(2).mean().sqrt().item(), rel=1e-6)
    mon.close()


def test_logits_with_an_empty_vocabulary_are_a_value_error_changing_nothing():
    model = _model("residual_modules")
    mon = StabilityMonitor(model, every=1, rules={})
    real = torch.randn(3, 5)
    with mon.step():
        model(_batch(0)).pow(2).mean().backward()
        with pytest.raises(ValueError, match=r"logits must have a non-empty last \(vocabulary\) dimension, got "
                                             r"shape \(3, 0\)"):
            mon.observe_logits(torch.empty(3, 0))
        mon.observe_logits(real)
    assert mon.history[0]["log_z"] == pytest.approx(real.logsumexp(-1).mean().item(), rel=1e-6)
    mon.close()


def test_an_empty_loss_adds_nothing_and_never_warns():
    """A loss tensor with no elements (reduction='none' on an empty batch) is no loss: no NaN, no warning."""
    model = _model("residual_modules")
    mon = StabilityMonitor(model, every=1)
    for loss in (torch.empty(0), torch.tensor(2.0)):
        with mon.step() as s:
            model(_batch(0)).pow(2).mean().backward()
            s.loss = loss
    assert "loss" not in mon.history[0] and mon.history[1]["loss"] == 2.0
    assert not [w for w in mon.warnings if w["quantity"] == "loss"]
    mon.close()


@pytest.mark.parametrize("call", ["observe_logits", "observe_loss", "capture_grads", "begin_step", "end_step",
                                  "step"])
def test_after_close_every_observation_is_refused_like_a_closed_file(call, tmp_path):
    """Before: observe_logits / observe_loss / capture_grads after close() were dropped silently. Now each
    raises RuntimeError naming the closed monitor, and nothing is written (monitor.jsonl, history)."""
    model = _model("residual_modules")
    mon = StabilityMonitor(model, tmp_path, every=1, tensorboard=False, heatmaps=False)
    _step(model, torch.optim.SGD(model.parameters(), lr=0.01), mon, _batch(0))
    summary = mon.close()
    jsonl = (tmp_path / "monitor.jsonl").read_bytes()
    args = {"observe_logits": (torch.randn(2, 5),), "observe_loss": (1.0,)}.get(call, ())
    with pytest.raises(RuntimeError, match="closed"):
        if call == "step":
            with mon.step():
                pass
        else:
            getattr(mon, call)(*args)
    assert len(mon.history) == 1 and mon.close() == summary and _no_hooks(model)
    assert (tmp_path / "monitor.jsonl").read_bytes() == jsonl


def test_rules_are_checked_by_the_rules_own_check():
    """The monitor takes rules as warning_rules.as_rules does (a rule also as a dict of its fields); a malformed
    one is named down to the field and nothing is attached."""
    model = _model("residual_modules")
    with pytest.raises(ValueError, match=r"rules\['grad_norm'\]\.window must be an integer >= 1, got 0"):
        StabilityMonitor(model, rules={"grad_norm": {"threshold": 1.0, "window": 0}})
    with pytest.raises(TypeError, match=r"rules\['grad_norm'\] must be a WarningRule"):
        StabilityMonitor(model, rules={"grad_norm": 1.0})
    assert _no_hooks(model)
    mon = StabilityMonitor(model, every=1, rules={"grad_norm": {"threshold": 0.0, "window": 1}})
    _step(model, torch.optim.SGD(model.parameters(), lr=0.01), mon, _batch(0))
    assert mon.warnings and all(w["quantity"] == "grad_norm" for w in mon.warnings)
    mon.close()


class _Named(nn.Module):
    """A Post-LN stack under a non-ASCII module name."""

    def __init__(self):
        super().__init__()
        self.add_module("kodierer_ü", make_stack("post_ln", depth=2, dim=16, seed=0))

    def forward(self, x):
        return getattr(self, "kodierer_ü")(x)


def test_a_crashed_and_resumed_run_reads_back_as_its_history(tmp_path):
    """A monitored run with non-ASCII layer names and a NaN loss: monitor.jsonl reads back as the history; the
    run crashes while appending (its last line torn): read_records warns and gives the whole records; a
    resumed run on the same log_dir repairs the file, and the whole log reads back as both histories."""
    model = _Named()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = StabilityMonitor(model, tmp_path, every=1, tensorboard=False, heatmaps=False)
    for i in range(3):
        with mon.step() as s:
            model(_batch(i)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            s.loss = float("nan") if i == 1 else 1.0 + i
    mon.close()
    path = tmp_path / "monitor.jsonl"
    assert any("kodierer_ü" in row for row in mon.history[0]["quantities"]["beta"])
    back = read_records(path)
    assert json.dumps(back, sort_keys=True) == json.dumps(mon.history, sort_keys=True)   # NaN as NaN
    data = path.read_bytes()
    path.write_bytes(data[:-40])   # the crash: the last record cut short
    with pytest.warns(UserWarning, match="line 3 is torn"):
        assert [r["step"] for r in read_records(path)] == [0, 1]
    resumed = StabilityMonitor(model, tmp_path, every=1, tensorboard=False, heatmaps=False)
    _step(model, opt, resumed, _batch(5))
    resumed.close()
    again = read_records(path)
    assert [r["step"] for r in again] == [0, 1, 0]
    assert json.dumps(again[2], sort_keys=True) == json.dumps(resumed.history[0], sort_keys=True)


def test_a_monitor_with_a_log_dir_refuses_pickling_by_name(tmp_path):
    import pickle

    model = _model("residual_modules")
    mon = StabilityMonitor(model, tmp_path, every=1, tensorboard=False, heatmaps=False)
    with pytest.raises(TypeError, match="RecordWriter holds an open monitor.jsonl"):
        pickle.dumps(mon)
    mon.close()
