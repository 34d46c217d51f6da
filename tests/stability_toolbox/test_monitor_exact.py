"""The monitor's records, bit for bit, against the quantities written out in the test on a short seeded run.

The monitor's hot paths are tuned for speed (the probe pass without autograd and with torch.nn's fused
fast path switched off, no attention projection or branch subtraction on the probe pass); none of that may
change a value a rule or a record reads. Here a seeded torch.nn Post-LN encoder (dropout on, so the training
and probe passes differ) is trained a few steps under the default monitor with ``per_update=True``, while the
test keeps, with its own hooks, every tensor it needs, and recomputes slowly and independently:

* ``grad_rms_eps_min`` of every update: each gradient's own ``linalg.vector_norm``, squared, summed layer by
  layer in parameter order, ``sqrt(sum / N_l) / eps``, the smallest;
* ``beta`` and ``act_max`` of every sublayer: from the layer input and the LayerNorms' inputs (Post-LN: the
  residual sum is the norm's input, the branch is that minus the shortcut);
* ``output_change``: the model re-run on the probe in eval mode *with* autograd (torch.nn's Python path, as the
  probe pass ran before it was made cheaper), its LayerNorm inputs' first rows compared across logging steps;
* ``attn_logit_max`` / ``attn_entropy``: from the self-attention's input of the training pass alone.

Equality is exact (``==`` on the floats), not approximate.
"""

import math
import struct

import pytest
import torch
from torch import nn

from stability_toolbox import StabilityMonitor
from stability_toolbox.probe import Probe
from stability_toolbox.quantities import Recorder

DIM, HEADS, LAYERS, STEPS, EVERY = 16, 2, 2, 6, 2


def _model():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(DIM, HEADS, 2 * DIM, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)


def _batch(i):
    return torch.randn(3, 5, DIM, generator=torch.Generator().manual_seed(100 + i))


def _norm_inputs(model, x, *, train):
    """``(output, layer inputs, {norm name: its input, norm name + ':out': its output})`` of one forward pass of
    ``model`` on ``x`` (the test's own hooks), in train mode (autograd on) or in eval mode with autograd on
    (torch.nn's Python path)."""
    seen, layer_in, handles = {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            handles.append(m.register_forward_pre_hook(lambda _m, a, name=name: seen.__setitem__(name, a[0].detach())))
            handles.append(m.register_forward_hook(
                lambda _m, a, o, name=name: seen.__setitem__(name + ":out", o.detach())))
        if isinstance(m, nn.TransformerEncoderLayer):
            handles.append(m.register_forward_pre_hook(
                lambda _m, a, name=name: layer_in.__setitem__(name, a[0].detach())))
    try:
        if train:
            out = model(x)
        else:
            model.eval()
            with torch.enable_grad(), torch.random.fork_rng():
                out = model(x)
            model.train()
    finally:
        for h in handles:
            h.remove()
    return out, layer_in, seen


@pytest.fixture(scope="module")
def run():
    """The seeded run: the monitor's history, and what the test kept of each step."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    mon = StabilityMonitor(model, every=EVERY, per_update=True)
    kept = []
    gen = torch.Generator().manual_seed(7)
    for i in range(STEPS):
        x = _batch(i)
        mon.begin_step()
        torch.manual_seed(1000 + i)  # dropout: the same masks whoever's hooks run
        attn_in = {}
        # the self-attentions' weights the training pass reads (before this step's update)
        weights = {n: (m.in_proj_weight.detach().clone(), m.in_proj_bias.detach().clone())
                   for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
        hs = [m.register_forward_pre_hook(lambda _m, a, n=n: attn_in.__setitem__(n, a[0].detach()))
              for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
        try:
            out, layer_in, norm_in = _norm_inputs(model, x, train=True)
        finally:
            for h in hs:
                h.remove()
        loss = out.pow(2).mean() + 0.01 * torch.randn((), generator=gen)
        loss.backward()
        mon.capture_grads()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        mon.end_step(loss)
        probe = None
        if i % EVERY == 0:  # after the update, the probe (the first logged step's inputs) through the slow path
            _, _, probe = _norm_inputs(model, _batch(0), train=False)
        kept.append({"x": x, "layer_in": layer_in, "norm_in": norm_in, "attn_in": attn_in, "grads": grads,
                     "probe": probe, "weights": weights})
    mon.close()
    return model, mon, kept


def _site(norm_name):  # 'layers.0.norm1' -> the layer ('layers.0') and its shortcut's source
    layer, norm = norm_name.rsplit(".", 1)
    return layer, norm


def test_grad_rms_eps_min_of_every_update_is_the_written_out_one(run):
    model, mon, kept = run
    updates = [u for r in mon.history for u in r["updates"]["update"]]
    values = [v for r in mon.history for v in r["updates"]["grad_rms_eps_min"]]
    assert len(updates) >= STEPS - EVERY and updates == list(range(len(updates)))
    for step, value in zip(updates, values):
        grads = kept[step]["grads"]
        rms = []
        for layer in range(LAYERS):
            names = [n for n, _ in model.named_parameters() if n.startswith(f"layers.{layer}.")]
            # CPU gradients: each tensor's float32 norm, the sums over them in float64 (Python floats), one
            # after another in parameter order; the per-update stream keeps the result as a float32
            total = 0.0
            for n in names:
                norm = float(torch.linalg.vector_norm(grads[n]))
                total += norm * norm
            rms.append(math.sqrt(total / sum(grads[n].numel() for n in names)))
        expected = float(torch.tensor(min(rms) / 1e-8, dtype=torch.float32))
        assert value == expected, (step, value, expected)


def test_beta_and_act_max_of_every_sublayer_are_the_written_out_ones(run):
    model, mon, kept = run
    for record in mon.history:
        k = kept[record["step"]]
        assert len(record["quantities"]["beta"]) == 2 * LAYERS
        for site, beta in record["quantities"]["beta"].items():
            layer, norm = _site(site)
            s = k["norm_in"][site]
            # the shortcut: the layer's input into norm1, norm1's output into norm2
            x = k["layer_in"][layer] if norm == "norm1" else k["norm_in"][f"{layer}.norm1:out"]
            f = s - x
            expected = f.float().var(unbiased=False) / s.float().var(unbiased=False).clamp_min(1e-30)
            assert beta == float(expected), site
            amax = torch.stack([f.abs().amax().float(), s.abs().amax().float()]).amax()
            assert record["quantities"]["act_max"][site] == float(amax), site


def test_output_change_is_the_written_out_one_of_the_probe_under_autograd(run):
    model, mon, kept = run
    logged = [r for r in mon.history]
    assert [r["step"] for r in logged] == list(range(0, STEPS, EVERY))
    for prev, record in zip(logged, logged[1:]):
        now_in, was_in = kept[record["step"]]["probe"], kept[prev["step"]]["probe"]
        assert set(record["quantities"]["output_change"]) == set(record["quantities"]["beta"])
        for site, value in record["quantities"]["output_change"].items():
            now = now_in[site].reshape(-1, DIM)[:256].float()
            was = was_in[site].reshape(-1, DIM)[:256].float()
            expected = (now - was).pow(2).sum() / was.pow(2).sum().clamp_min(1e-30)
            assert value == float(expected), site


def test_attention_statistics_are_those_of_the_training_pass_alone(run):
    model, mon, kept = run
    for record in mon.history:
        k = kept[record["step"]]
        for name, value in record["quantities"]["attn_logit_max"].items():
            x = k["attn_in"][name]
            w, b = k["weights"][name]
            q = nn.functional.linear(x, w[:DIM], b[:DIM])
            kk = nn.functional.linear(x, w[DIM:2 * DIM], b[DIM:2 * DIM])
            dh = DIM // HEADS
            qh = q.reshape(3, 5, HEADS, dh).transpose(1, 2)
            kh = kk.reshape(3, 5, HEADS, dh).transpose(1, 2)
            logits = qh @ kh.transpose(-1, -2) / math.sqrt(dh)
            assert value == float(logits.abs().amax()), name
            logp = torch.log_softmax(logits, -1)
            assert record["quantities"]["attn_entropy"][name] == float(-(logp.exp() * logp).sum(-1).mean()), name


def test_the_probe_pass_restores_the_fast_path_switch_even_when_the_model_fails():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x):
            seen.append((torch.backends.mha.get_fastpath_enabled(), torch.is_grad_enabled()))
            raise RuntimeError("boom")

    seen = []
    before = torch.backends.mha.get_fastpath_enabled()
    probe = Probe(Fails(), Recorder(4), ((torch.zeros(1, 2, 4),), {}))
    with pytest.raises(ValueError, match="probe"):
        probe.run()
    assert seen == [(False, False)]  # the Python path, no autograd graph, during the pass
    assert torch.backends.mha.get_fastpath_enabled() == before


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


@pytest.mark.parametrize("value", [2.5, -0.0, 0.0, 1e-45, -3.0e38, float("inf"), float("nan")])
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_a_one_element_loss_is_recorded_as_its_mean(value, shape):
    """A logged step's ``loss`` / ``loss_max`` of a one-element float32 loss are ``mean(loss)``'s value bit for bit,
    sign of zero and NaN included (the monitor adds it without the reduction)."""
    mon = StabilityMonitor(_model(), every=1, tensorboard=False)
    loss = torch.full(shape, value)
    expected = float(loss.float().reshape(-1).mean())
    mon.begin_step()
    record = mon.end_step(loss)
    for key in ("loss", "loss_max"):
        assert math.isnan(record[key]) if math.isnan(value) else _bits(record[key]) == _bits(expected), key
    mon.close()


def test_a_loss_tensor_reused_in_place_changes_nothing_kept():
    mon = StabilityMonitor(_model(), every=2, tensorboard=False)
    loss = torch.tensor(3.0)
    mon.begin_step(1)
    mon.end_step(loss)      # step 1: not logged; its loss is kept on the device
    loss.fill_(100.0)       # the caller reuses its tensor
    mon.begin_step()
    record = mon.end_step(torch.tensor(1.0))  # step 2: logged
    assert record["loss"] == 2.0 and record["loss_max"] == 3.0
    mon.close()
