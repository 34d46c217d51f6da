"""The stability monitor at its edges: a failed step leaves nothing behind, refused calls change nothing, two
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
