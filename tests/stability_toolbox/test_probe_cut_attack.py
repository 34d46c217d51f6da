"""Adversarial cases of the monitor's probe cut (stability_toolbox.probe) and of its fused parameter-group norms
(stability_toolbox.tensor_norms): the recorded values against the full probe read with the test's own hooks and
against the norms written out in float64."""

import math

import pytest
import torch
from torch import nn

from stability_toolbox import StabilityMonitor
from torch_helpers import norm_inputs, output_change

DIM = 8


class _GatedMixer(nn.Module):
    """A residual sublayer whose branch mixes the batch's samples (each row minus the batch's mean row), scaled by
    ``alpha``: zero-initialised (ReZero / SkipInit), so at initialisation every sample's rows are its own."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)
        self.alpha = nn.Parameter(torch.zeros(()))
        self.norm0, self.norm = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.mix = True

    def forward(self, x):
        x = self.norm0(x)
        h = self.lin(x)
        if self.mix:
            h = h - h.mean(0, keepdim=True)
        return self.norm(x + self.alpha * h)


def _run(model, mon, batches, lr, warmup=0, before_step=None):
    """Train on ``batches`` (the first one is the probe); returns the full probe's rows after each step."""
    opt = torch.optim.SGD(model.parameters(), lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / warmup) if warmup else 1.0)
    g = torch.Generator().manual_seed(1)
    after = []
    for i, x in enumerate(batches):
        if before_step is not None:
            before_step(i)
        mon.begin_step()
        loss = (model(x) * torch.randn(x.shape, generator=g)).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        mon.end_step(loss)
        after.append(norm_inputs(model, batches[0]))
    return after


def test_samples_that_interact_only_after_the_first_update_keep_the_full_probes_output_change(quiet_log):
    # a learning-rate warmup from 0 (the usual linear warmup) leaves the first logged step's weights at their
    # initialisation, where the zero-initialised mixing branch hides that samples interact: the one check there
    # accepted the cut, and every later output_change was the cut probe's (7.7 recorded for 2055)
    torch.manual_seed(0)
    model = _GatedMixer()
    batches = [torch.randn(4, 3, DIM, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    mon = StabilityMonitor(model, every=1, probe_rows=3, tensorboard=False, heatmaps=False, rules={},
                           fallback="post_ln")
    after = _run(model, mon, batches, lr=0.5, warmup=2)
    assert mon._probe.cut is False and torch.equal(mon._probe.call[0][0], batches[0])
    for step in range(1, len(batches)):
        record = mon.history[step]["quantities"]["output_change"]
        assert record["norm"] == pytest.approx(output_change(after[step - 1]["norm"], after[step]["norm"], 3), rel=1e-4)


def test_samples_that_come_to_interact_later_are_caught_at_the_next_check(quiet_log):
    # checks on the probe's runs 0, 1, 2, 4, 8...: mixing switched on before step 3 is found at run 4, and from the
    # run after it every value is the full probe's again
    torch.manual_seed(0)
    model = _GatedMixer()
    with torch.no_grad():
        model.alpha.fill_(0.5)
    model.mix = False
    batches = [torch.randn(4, 3, DIM, generator=torch.Generator().manual_seed(i)) for i in range(7)]
    mon = StabilityMonitor(model, every=1, probe_rows=3, tensorboard=False, heatmaps=False, rules={},
                           fallback="post_ln")
    cuts = []

    def switch(i):
        cuts.append(mon._probe.cut)
        if i == 3:
            model.mix = True
    after = _run(model, mon, batches, lr=0.05, before_step=switch)
    assert cuts[1:5] == [True] * 4 and cuts[5:] == [False, False]  # run 3 unchecked, run 4 a check
    for step in (5, 6):
        record = mon.history[step]["quantities"]["output_change"]
        assert record["norm"] == pytest.approx(output_change(after[step - 1]["norm"], after[step]["norm"], 3), rel=1e-4)


def test_a_removed_monitor_keeps_no_probe_batch(quiet_log):
    torch.manual_seed(0)
    model = _GatedMixer()
    model.mix = False
    mon = StabilityMonitor(model, every=1, probe_rows=3, tensorboard=False, heatmaps=False, rules={},
                           fallback="post_ln")
    _run(model, mon, [torch.randn(4, 3, DIM)], lr=0.1)
    assert mon._probe.cut
    mon.remove()
    assert mon._probe.call is None and getattr(mon._probe, "full", None) is None


# ----------------------------------------------------------------------------- parameter-group norms


class _Net(nn.Module):
    """Embedding (the "(other)" row) and two residual layers (the ModuleList's rows)."""

    def __init__(self, sparse):
        super().__init__()
        self.emb = nn.Embedding(20, DIM, sparse=sparse)
        self.layers = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(DIM), "lin": nn.Linear(DIM, DIM)})
                                    for _ in range(2))
        self.layers[0]["lin"].register_parameter("empty", nn.Parameter(torch.zeros(0)))  # an empty parameter
        self.out = nn.LayerNorm(DIM)

    def forward(self, ids):
        x = self.emb(ids) + self.layers[0]["lin"].empty.sum()
        for layer in self.layers:
            x = x + layer["lin"](layer["norm"](x))
        return self.out(x)


def _rows(model):
    rows = {"(other)": [model.emb.weight, model.out.weight, model.out.bias]}
    for i, layer in enumerate(model.layers):
        rows[f"layers.{i}"] = list(layer.parameters())
    return rows


def _dense64(t):
    return (t.to_dense() if t.is_sparse else t).double()


@pytest.mark.parametrize("dtype, scale, sparse", [
    (torch.float32, 1.0, True), (torch.bfloat16, 1.0, False), (torch.float16, 1.0, False), (torch.float64, 1.0, True),
    (torch.float64, 1e-30, False),  # a float64 model's gradients and updates below float32's squares' range
    (torch.float64, 1e25, False),  # and above it
])
@pytest.mark.parametrize("capture", [False, True])
def test_group_norms_are_the_formulas_over_accumulated_micro_batches(dtype, scale, sparse, capture, quiet_log):
    torch.manual_seed(0)
    model = _Net(sparse).to(dtype)
    mon = StabilityMonitor(model, every=1, tensorboard=False, heatmaps=False, rules={}, signal_rules=[],
                           fallback="pre_ln")
    model.layers[1]["lin"].bias.requires_grad_(False)  # frozen after the monitor is built: no gradient, no update
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(3)
    mon.begin_step()
    for _ in range(2):  # gradient accumulation: two backward passes in the logged step
        ids = torch.randint(0, 20, (3, 4), generator=g)
        (model(ids).pow(2).mean() * scale).backward()
    if capture:
        mon.capture_grads()
    before = {row: [p.detach().double().clone() for p in ps] for row, ps in _rows(model).items()}
    grads = {row: [_dense64(p.grad) for p in ps if p.grad is not None] for row, ps in _rows(model).items()}
    opt.step()
    opt.zero_grad()
    record = mon.end_step(1.0)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    upd_all = w_all = 0.0
    for row, ps in _rows(model).items():
        grad = math.sqrt(sum(float(t.pow(2).sum()) for t in grads[row]))
        assert record["quantities"]["grad_norm"][row] == pytest.approx(grad, rel=tol, abs=0), row
        upd = sum(float((p.detach().double() - b).pow(2).sum()) for p, b in zip(ps, before[row]))
        w = sum(float(b.pow(2).sum()) for b in before[row])
        upd_all, w_all = upd_all + upd, w_all + w
        assert record["quantities"]["update_ratio"][row] == pytest.approx(math.sqrt(upd / w), rel=tol, abs=0), row
    assert record["update_rms"] == pytest.approx(math.sqrt(upd_all / w_all), rel=tol, abs=0)


# ----------------------------------------------------------------------------- compiled models


def test_a_compiled_model_keeps_its_full_probe_and_no_graph_is_compiled_for_a_cut():
    # the cut's batch size was one more graph (seconds of inductor compilation), and made the batch dimension of
    # the graphs compiled after it dynamic (automatic dynamic shapes)
    from admin_torch import make_stack

    torch._dynamo.reset()
    model = make_stack("pre_ln", depth=1, dim=DIM, heads=2, seed=0)
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, 5, DIM, generator=torch.Generator().manual_seed(0))
    mon = StabilityMonitor(compiled, every=1, probe_rows=5, tensorboard=False, heatmaps=False, rules={})
    opt = torch.optim.SGD(model.parameters(), 0.1)
    for _ in range(2):
        mon.begin_step()
        compiled(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        mon.end_step(1.0)
    torch._dynamo.reset()
    assert mon._probe.cut is False and torch.equal(mon._probe.call[0][0], x)


# ----------------------------------------------------------------------------- given probes, odd inputs


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)
        self.norm0, self.norm = nn.LayerNorm(DIM), nn.LayerNorm(DIM)

    def forward(self, x, mask=None, scale=1.0, extra=()):
        x = self.norm0(x)
        h = self.lin(x)
        if mask is not None:
            h = h * mask[..., None]
        for e in extra:  # a list of per-sample tensors: not cut with the rest
            h = h + e[..., None]
        return self.norm(x + scale * h)


@pytest.mark.parametrize("form", ["tensor", "tuple", "dict", "list_inside", "one_sample", "nan"])
def test_given_probes_of_every_form_give_the_full_probes_output_change(form, quiet_log):
    torch.manual_seed(0)
    model = _Masked()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 if form == "one_sample" else 4, 3, DIM, generator=g)
    if form == "nan":
        x[2, 1, 0] = float("nan")  # a trailing sample's NaN: the cut (1 sample) leaves it out, rows finite
    mask = (torch.rand(x.shape[:2], generator=g) > 0.3).float()
    probe, call = {
        "tensor": (x, ((x,), {})), "one_sample": (x, ((x,), {})), "nan": (x, ((x,), {})),
        "tuple": ((x, None, 2.0), ((x, None, 2.0), {})),
        "dict": ({"x": x, "mask": mask, "scale": 2.0, "extra": ()}, ((), {"x": x, "mask": mask, "scale": 2.0})),
        "list_inside": ((x, mask, 1.0, [mask]), ((x, mask, 1.0, [mask]), {})),
    }[form]
    mon = StabilityMonitor(model, every=1, probe=probe, probe_rows=3, tensorboard=False, heatmaps=False, rules={},
                           fallback="post_ln")
    opt = torch.optim.SGD(model.parameters(), 0.1)
    after = []
    for i in range(3):
        mon.begin_step()
        model(torch.randn(4, 3, DIM, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        mon.end_step(1.0)
        after.append(_norm_inputs_call(model, call))
    if form != "list_inside":  # (a cut there may or may not keep the rows; the values are checked below)
        assert mon._probe.cut is (form != "one_sample")
    for step in (1, 2):
        record = mon.history[step]["quantities"]["output_change"]
        assert set(record) == {"norm"}  # the fallback's sites: every norm after the first
        for name, value in record.items():
            assert value == pytest.approx(output_change(after[step - 1][name], after[step][name], 3), rel=1e-4), name


def _norm_inputs_call(model, call):
    return {name.removeprefix("model."): v for name, v in norm_inputs(_Call(model, *call), None).items()}


class _Call(nn.Module):
    """``model(*args, **kwargs)`` as a module of one input (what `norm_inputs` calls)."""

    def __init__(self, model, args, kwargs):
        super().__init__()
        self.model, self.args, self.kwargs = model, args, kwargs

    def forward(self, _):
        return self.model(*self.args, **self.kwargs)


def test_a_model_moved_to_float64_takes_the_cut_and_the_full_probe_along(quiet_log):
    torch.manual_seed(0)
    model = _GatedMixer()
    model.mix = False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, DIM, generator=g)
    mon = StabilityMonitor(model, every=1, probe_rows=3, tensorboard=False, heatmaps=False, rules={},
                           fallback="post_ln")
    after = []
    for i in range(4):
        if i == 1:
            model.double()
        dtype = next(model.parameters()).dtype
        opt = torch.optim.SGD(model.parameters(), 0.1)
        mon.begin_step()
        model(x.to(dtype) if i == 0 else torch.randn(4, 3, DIM, generator=g, dtype=dtype)).pow(2).mean().backward()
        opt.step()
        mon.end_step(1.0)
        after.append(norm_inputs(model, x.to(dtype)))
    assert mon._probe.cut and mon._probe.call[0][0].dtype == mon._probe.full[0][0].dtype == torch.float64
    for step in (1, 2, 3):
        record = mon.history[step]["quantities"]["output_change"]
        assert record["norm"] == pytest.approx(output_change(after[step - 1]["norm"], after[step]["norm"], 3), rel=1e-4)


class _SmallBatchExtra(nn.Module):
    """A second residual sublayer run on batches of fewer than 3 samples, or when ``extra`` is set."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.norm0, self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.extra = False

    def forward(self, x):
        x = self.norm0(x)
        x = self.norm1(x + self.lin1(x))
        return self.norm2(x + self.lin2(x)) if self.extra or x.shape[0] < 3 else x


def test_a_sublayer_only_the_cut_pass_reached_keeps_no_rows(quiet_log):
    # the refused cut pass's rows of a sublayer the full probe did not reach stayed as its previous rows: once the
    # full probe reached it, its output_change compared with the cut pass's rows of an earlier step
    torch.manual_seed(0)
    model = _SmallBatchExtra()
    x = torch.randn(4, 3, DIM, generator=torch.Generator().manual_seed(0))
    mon = StabilityMonitor(model, every=1, probe_rows=3, tensorboard=False, heatmaps=False, rules={},
                           fallback="post_ln")
    opt = torch.optim.SGD(model.parameters(), 0.1)
    for i in range(3):
        model.extra = i == 2
        mon.begin_step()
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        mon.end_step(1.0)
    assert mon._probe.cut is False
    assert "norm2" not in mon.history[2]["quantities"]["output_change"]  # no rows of it at step 1: no change
