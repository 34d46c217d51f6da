"""The monitor's host path (CPU gradient norms and losses reduced in Python floats) attacked as a user would: loss
kinds mixed across steps (NumPy scalars, numbers, float64 / integer tensors, NaN, -0.0), a failed step after the
sums became tensors, copies mid-interval, gradients that change dtype or go missing (MoE-like), norms beyond
float32's range. The device path (a GPU's) is taken by telling the monitor CPU tensors are no host memory
(``scalar_reader.host_memory``); every expectation is written out from the losses / gradients fed in."""

import copy
import fractions
import math
import pickle

import numpy as np
import pytest
import torch

from stability_toolbox import StabilityMonitor, scalar_reader
from stability_toolbox.leading_signals import LayerGradients
from stability_toolbox.signal_detector import SignalRule


pytestmark = pytest.mark.usefixtures("quiet_log")


def _monitor(model, every, **kw):
    return StabilityMonitor(model, every=every, tensorboard=False, heatmaps=False, **kw)


def _record_of(mon, losses):
    """Step 0 (logged, no loss), then one step per loss, then the logging step: its record."""
    mon.begin_step()
    mon.end_step()
    for loss in losses:
        mon.begin_step()
        mon.end_step(loss)
    mon.begin_step()
    return mon.end_step()


_NUMBERS = {
    "numpy float32": ([np.float32(1.5), torch.tensor(2.0)], [1.5, 2.0]),
    "numpy int64": ([torch.tensor(1.0), np.int64(3)], [1.0, 3.0]),
    "numpy float64": ([np.float64(0.25), 4], [0.25, 4.0]),
    "fraction": ([fractions.Fraction(1, 4), torch.tensor(0.5)], [0.25, 0.5]),
    "huge negative int": ([torch.tensor(1.0), -10 ** 400], [1.0, -math.inf]),
}


@pytest.mark.parametrize("name", sorted(_NUMBERS))
def test_real_numbers_of_any_kind_are_losses(model, name):
    """NumPy's scalars (np.float32, np.int64: real numbers, but not Python int / float) were refused with
    "loss must be a tensor or a real number"; an integer below -1.8e308 read as +inf. The record's loss is the
    mean of the losses, its maximum the largest (written out)."""
    losses, values = _NUMBERS[name]
    mon = _monitor(model, every=len(losses) + 1, per_update=True)
    record = _record_of(mon, losses)
    assert record["loss"] == pytest.approx(sum(values) / len(values), rel=1e-6)
    assert record["loss_max"] == pytest.approx(max(values), rel=1e-6)
    assert record["updates"]["loss"] == [pytest.approx(v, rel=1e-6) for v in values]
    mon.close()


@pytest.mark.parametrize("bad", [True, np.bool_(True), "1.0", 1j])
def test_a_bool_or_other_loss_is_refused_and_changes_nothing(model, bad):
    mon = _monitor(model, every=10)
    mon.begin_step()
    mon.observe_loss(torch.tensor(2.0))
    before = (mon._loss_sum, mon._loss_max, mon._loss_n)
    with pytest.raises(TypeError, match="^loss must be"):
        mon.observe_loss(bad)
    assert (mon._loss_sum, mon._loss_max, mon._loss_n) == before
    mon.close()


def test_a_failed_step_after_the_sums_became_tensors_keeps_the_earlier_losses(model):
    """Host (float) sums; a step whose float64 loss turns them into tensors fails: the sums are those of before
    that step (floats again), and the CPU losses after it are read on the host; the record is over the kept
    losses only."""
    mon = _monitor(model, every=5)
    mon.begin_step()
    mon.end_step()
    mon.begin_step()
    mon.end_step(torch.tensor(1.0))
    with pytest.raises(KeyError):
        with mon.step() as s:
            mon.observe_loss(torch.tensor(100.0, dtype=torch.float64))
            assert isinstance(mon._loss_sum, torch.Tensor)
            s.loss = torch.tensor(50.0)
            raise KeyError("the step failed")
    assert type(mon._loss_sum) is float and (mon._loss_sum, mon._loss_max, mon._loss_n) == (1.0, 1.0, 1)
    for loss in (torch.tensor(3.0), torch.tensor(float("-0.0"))):
        mon.begin_step()
        mon.end_step(loss)
    mon.begin_step()
    mon.end_step(torch.tensor(2.0))
    mon.begin_step()
    record = mon.end_step()
    assert record["step"] == 5 and record["loss"] == pytest.approx((1.0 + 3.0 + 0.0 + 2.0) / 4)
    assert record["loss_max"] == 3.0
    mon.close()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_monitor_copied_mid_interval_records_what_the_original_does(model, how):
    """Host float sums (and a NaN among them) carried by a copy: both record the same loss and maximum."""
    mon = _monitor(model, every=4)
    mon.begin_step()
    mon.end_step()
    for v in (2.0, float("nan")):
        mon.begin_step()
        mon.end_step(torch.tensor(v))
    twin = copy.deepcopy(mon) if how == "deepcopy" else pickle.loads(pickle.dumps(mon))
    records = []
    for m in (mon, twin):
        m.begin_step()
        m.end_step(torch.tensor(1.0))
        m.begin_step()
        records.append(m.end_step())
        m.close()
    for r in records:
        assert r["step"] == 4 and math.isnan(r["loss"]) and math.isnan(r["loss_max"])


_PLANS = {  # (update, parameter index) -> the gradient's dtype, or None: no gradient at that update
    "float32": lambda t, i: torch.float32,
    "mixed precisions": lambda t, i: (torch.float16, torch.bfloat16, torch.float64, torch.float32)[(t + i) % 4],
    "moe": lambda t, i: None if (3 * t + i) % 4 == 0 else torch.float32,
}


def _run(model, plan, host: bool, monkeypatch):
    """12 updates with gradients of `plan` and mixed losses, rules on grad_norm and loss; the records' per-update
    values and the warnings."""
    params = list(model.parameters())
    rules = [SignalRule("grad_norm", factor=2.0, baseline=3, lag=0, persist=1, smooth=1, start=2),
             SignalRule("loss", factor=2.0, baseline=3, lag=0, persist=1, smooth=1, start=2)]
    losses = [torch.tensor(float(v)) for v in (1, 2, 1, 3, 8, 1, 2, 1, 1, 30, 1, 1)]
    losses[5], losses[7] = torch.tensor(2.0, dtype=torch.float64), np.float32(4.0)
    gen = torch.Generator().manual_seed(1)
    out = []
    with monkeypatch.context() as m:
        if not host:
            m.setattr(scalar_reader, "host_memory", lambda device: False)
        mon = _monitor(model, every=4, per_update=True, signal_rules=rules)
        for t, loss in enumerate(losses):
            mon.begin_step()
            for i, p in enumerate(params):
                dtype = plan(t, i)
                p.grad = None
                if dtype is not None:
                    p.data = p.data.to(dtype)
                    p.grad = (torch.randn(p.shape, generator=gen) * 10.0 ** (t % 7 - 3)).to(dtype)
            mon.capture_grads()
            record = mon.end_step(loss)
            if record is not None:
                out.append((record["loss"], record["loss_max"], record["updates"]))
        mon.close()
    return out, [(w["update"], w["signal"]) for w in mon.warnings if "update" in w]


@pytest.mark.parametrize("plan", sorted(_PLANS))
def test_the_host_path_records_and_warns_as_the_device_path(model, plan, monkeypatch):
    """The same run on the host path (a CPU's) and the device path (a GPU's): the same per-update values (to
    float32 rounding), losses and warnings, whatever the gradients' dtypes or which parameters have one."""
    state = copy.deepcopy(model.state_dict())
    host, host_warnings = _run(model, _PLANS[plan], True, monkeypatch)
    model.load_state_dict(state)
    device, device_warnings = _run(model, _PLANS[plan], False, monkeypatch)
    assert host_warnings == device_warnings and host_warnings  # both rules fire (the loss 8 and the grad norm)
    assert len(host) == len(device) == 3
    for (hl, hm, hu), (dl, dm, du) in zip(host, device):
        assert hl == pytest.approx(dl, rel=1e-6) and hm == pytest.approx(dm, rel=1e-6)
        assert set(hu) == set(du)
        for k in hu:
            assert [None if v is None else pytest.approx(v, rel=1e-6, nan_ok=True) for v in du[k]] == hu[k], k


@pytest.mark.parametrize("model_norm", [True, False])
def test_norms_beyond_float32_read_inf_on_both_paths(monkeypatch, model_norm):
    """Two float64 gradients of norm 3e38 each in one layer: their norm (4.2e38) and the layer's RMS over eps
    (1.5e38 / 1e-8) are beyond float32. The device path gives inf (float32 results); the host path gave 4.2e38,
    a finite value the per-update rules read on a CPU where a GPU reads a non-finite one (and the record kept
    inf). Both say inf; values just below the limit stay finite on both."""
    def values(scale, host, eps=1e-8):
        a = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        b = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        a.grad = torch.tensor([scale, 0.0, 0.0, 0.0], dtype=torch.float64)
        b.grad = torch.tensor([0.0, scale, 0.0, 0.0], dtype=torch.float64)
        with monkeypatch.context() as m:
            if not host:
                m.setattr(scalar_reader, "host_memory", lambda device: False)
            out = LayerGradients([("l0", [("a", a), ("b", b)])], model_norm=model_norm)(eps)
        return {k: float(v) for k, v in out.items()}

    over = {k: math.inf for k in (["grad_norm"] if model_norm else []) + ["grad_rms_eps_min"]}
    assert values(3e38, True) == values(3e38, False) == over
    # norm 2e38 * sqrt(2) = 2.83e38 < 3.4e38; rms = sqrt(2 * 4e76 / 8) = 1e38, over eps 1: 1e38
    below = values(2e38, True, eps=1.0)
    assert below == pytest.approx(values(2e38, False, eps=1.0), rel=1e-6)
    assert below["grad_rms_eps_min"] == pytest.approx(1e38, rel=1e-6)
    assert below.get("grad_norm", 2e38 * math.sqrt(2)) == pytest.approx(2e38 * math.sqrt(2), rel=1e-6)


@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
def test_a_sparse_embedding_gradient_is_measured_as_its_dense_one(monkeypatch, host):
    """nn.Embedding(sparse=True): the fused norm refused its (uncoalesced, index 2 twice) gradient with
    NotImplementedError at every update of a monitor with per_update=True or a grad_norm rule. Its norm is that
    of the dense gradient (duplicates summed), written out from to_dense()."""
    torch.manual_seed(0)
    emb, lin = torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 4)
    lin(emb(torch.tensor([1, 2, 2, 7]))).pow(2).sum().backward()
    assert emb.weight.grad.is_sparse and not emb.weight.grad.is_coalesced()
    dense = [emb.weight.grad.to_dense().double(), lin.weight.grad.double(), lin.bias.grad.double()]
    with monkeypatch.context() as m:
        if not host:
            m.setattr(scalar_reader, "host_memory", lambda device: False)
        out = LayerGradients([("l0", [("e", emb.weight)]), ("l1", [("w", lin.weight), ("b", lin.bias)])])(1e-8)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in dense))
    rms = [math.sqrt(float(dense[0].pow(2).sum()) / 40),
           math.sqrt(float(dense[1].pow(2).sum() + dense[2].pow(2).sum()) / 20)]
    assert float(out["grad_norm"]) == pytest.approx(norm, rel=1e-5)
    assert float(out["grad_rms_eps_min"]) == pytest.approx(min(rms) / 1e-8, rel=1e-5)


def test_a_detector_pickled_before_it_kept_its_memory_still_updates():
    """A SignalDetector pickled by an earlier version (no ``_memory`` in its state) updates as a new one does."""
    import pickle

    from stability_toolbox.signal_detector import SignalDetector, SignalRule

    rule = SignalRule("loss", factor=2.0, baseline=3, lag=0, smooth=1, persist=1, start=0)
    old, new = SignalDetector([rule]), SignalDetector([rule])
    del old.__dict__["_memory"]  # what an earlier version pickled
    old = pickle.loads(pickle.dumps(old))
    out = [(old.update(i, {"loss": v}), new.update(i, {"loss": v})) for i, v in enumerate([1.0, 1.0, 1.0, 3.0])]
    assert [len(a) for a, _ in out] == [len(b) for _, b in out] == [0, 0, 0, 1]


@pytest.mark.parametrize("value", [1e300, -1e300, 3.5e38, 1.5, -2.0, 0.0])
def test_a_python_float_and_a_numpy_one_read_alike(value):
    """ScalarReader keeps a Python float within float32's range as it is; beyond it, a Python float reads inf of
    its sign, as a NumPy float64 (converted to float32) does."""
    import numpy as np

    from stability_toolbox.scalar_reader import ScalarReader

    r = ScalarReader()
    got = []
    for v in (value, np.float64(value)):
        r.put("x", v)
        r.end(0)
        got.append(r.ready()[0][1]["x"])
    assert got[0] == got[1] or (abs(value) < 3.4e38 and got[0] == pytest.approx(got[1], rel=1e-7))
    if abs(value) > 3.4028235e38:
        assert got[0] == math.copysign(math.inf, value)
