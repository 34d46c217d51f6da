"""StabilityMonitor against independent computations: hand-computed ratios and output changes,
bitwise-unchanged training, clean removal, torch.compile, outputs, warnings, argument checks."""

import json
import logging
import math

import pytest
import torch
from torch import nn

from admin_torch import make_stack
from admin_torch.reference_stack import AddResidual
from stability_toolbox import StabilityMonitor, WarningRule


class TwoLayer(nn.Module):
    """A hand-built two-sublayer Post-LN stack: h1 = LN1(x + f1(x)), h2 = LN2(h1 + f2(h1))."""

    def __init__(self, dim=6, residual_modules=True, input_norm=False):
        super().__init__()
        self.input_norm = nn.LayerNorm(dim) if input_norm else None
        self.f1, self.f2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.r1 = AddResidual() if residual_modules else None
        self.r2 = AddResidual() if residual_modules else None

    def forward(self, x):
        if self.input_norm is not None:
            x = self.input_norm(x)
        s1 = self.r1(x, self.f1(x)) if self.r1 is not None else x + self.f1(x)
        h1 = self.n1(s1)
        s2 = self.r2(h1, self.f2(h1)) if self.r2 is not None else h1 + self.f2(h1)
        return self.n2(s2)


def _by_hand(model: TwoLayer, x):
    """(beta1, beta2, s1, s2) computed directly in float64."""
    with torch.no_grad():
        if model.input_norm is not None:
            x = model.input_norm(x)
        f1 = model.f1(x).double()
        s1 = x.double() + f1
        h1 = model.n1(s1.float())
        f2 = model.f2(h1).double()
        s2 = h1.double() + f2
    var = lambda t: t.var(unbiased=False).item()  # noqa: E731
    return var(f1) / var(s1), var(f2) / var(s2), s1, s2


def _no_hooks(model: nn.Module) -> bool:
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
            return False
    return all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())


@pytest.mark.parametrize("residual_modules", [True, False])
def test_ratio_and_output_change_match_a_hand_computation(residual_modules):
    torch.manual_seed(0)
    model = TwoLayer(residual_modules=residual_modules, input_norm=not residual_modules)
    x = torch.randn(3, 4, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    kw = {} if residual_modules else {"fallback": "post_ln"}
    mon = StabilityMonitor(model, every=1, probe=x, **kw)
    b1, b2, s1_before, s2_before = _by_hand(model, x)
    with mon.step() as s:
        loss = model(x).pow(3).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        s.loss = loss
    rec = mon.history[0]["quantities"]
    names = mon.sites
    if residual_modules:
        assert names == ["r1", "r2"]
        assert rec["beta"]["r1"] == pytest.approx(b1, rel=1e-5)
        assert rec["beta"]["r2"] == pytest.approx(b2, rel=1e-5)
    else:  # the fallback: the LayerNorms in call order, n1 after input_norm, n2 after n1
        assert names == ["input_norm", "n1", "n2"]
        assert rec["beta"]["n1"] == pytest.approx(b1, rel=1e-5)
        assert rec["beta"]["n2"] == pytest.approx(b2, rel=1e-5)
    # the output change: s of each sublayer on the probe, before vs after the next logged update
    _, _, s1_mid, s2_mid = _by_hand(model, x)
    with mon.step():
        model(x).pow(3).mean().backward()
        opt.step()
        opt.zero_grad()
    _, _, s1_after, s2_after = _by_hand(model, x)
    oc = mon.history[1]["quantities"]["output_change"]
    rel = lambda a, b: ((a - b).pow(2).sum() / b.pow(2).sum()).item()  # noqa: E731
    first, second = (("r1", "r2") if residual_modules else ("n1", "n2"))
    assert oc[first] == pytest.approx(rel(s1_after, s1_mid), rel=1e-4)
    assert oc[second] == pytest.approx(rel(s2_after, s2_mid), rel=1e-4)
    assert rel(s1_after, s1_mid) > 0
    mon.close()


def test_pre_ln_torch_layer_ratio_by_hand():
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    mon = StabilityMonitor(model, every=1)
    assert mon.mechanism == "layer descriptions"
    x = torch.randn(2, 5, 8)
    with mon.step():
        model(x).sum().backward()
    l0 = model.layers[0]
    with torch.no_grad():
        f1 = l0._sa_block(l0.norm1(x), None, None)
        x1 = x + f1
        f2 = l0._ff_block(l0.norm2(x1))
        x2 = x1 + f2
    beta = mon.history[0]["quantities"]["beta"]
    assert beta["layers.0.norm1"] == pytest.approx((f1.var(unbiased=False) / x1.var(unbiased=False)).item(), rel=1e-5)
    assert beta["layers.0.norm2"] == pytest.approx((f2.var(unbiased=False) / x2.var(unbiased=False)).item(), rel=1e-5)
    mon.close()


def test_attention_logit_max_by_hand():
    torch.manual_seed(2)
    model = make_stack("post_ln", depth=1, dim=8, heads=2, seed=0)
    mon = StabilityMonitor(model, every=1)
    x = torch.randn(2, 3, 8)
    with mon.step():
        model(x)
    attn = model.sublayers[0]
    with torch.no_grad():
        h = model.input_norm(x)
        q = attn.q_proj(h).view(2, 3, 2, 4).transpose(1, 2)
        k = attn.k_proj(h).view(2, 3, 2, 4).transpose(1, 2)
        want = (q @ k.transpose(-1, -2)).abs().max().item() / 2.0
    assert mon.history[0]["quantities"]["attn_logit_max"]["sublayers.0"] == pytest.approx(want, rel=1e-5)
    # torch.nn.MultiheadAttention: from its packed projection
    mha = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1,
                                enable_nested_tensor=False)
    mon2 = StabilityMonitor(mha, every=1)
    with mon2.step():
        mha(x)
    m = mha.layers[0].self_attn
    with torch.no_grad():
        qkv = nn.functional.linear(x, m.in_proj_weight, m.in_proj_bias)
        q, k = qkv[..., :8].view(2, 3, 2, 4).transpose(1, 2), qkv[..., 8:16].view(2, 3, 2, 4).transpose(1, 2)
        want = (q @ k.transpose(-1, -2)).abs().max().item() / 2.0
    assert mon2.history[0]["quantities"]["attn_logit_max"]["layers.0.self_attn"] == pytest.approx(want, rel=1e-5)


def _train(model, steps, monitor=None, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    outs, grads = [], []
    for i in range(steps):
        x = torch.randn(2, 5, 16)
        if monitor is not None:
            monitor.begin_step()
        out = model(x)
        loss = out.pow(2).mean()
        loss.backward()
        outs.append(out.detach().clone())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
        if monitor is not None:
            monitor.end_step(loss)
    return outs, grads


@pytest.mark.parametrize("build", [
    lambda: make_stack("post_ln", depth=2, dim=16, seed=0),
    lambda: make_stack("admin", depth=2, dim=16, seed=0),
    lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.2, batch_first=True), 2,
                                  enable_nested_tensor=False),
], ids=["post_ln", "admin", "torch_nn_dropout"])
def test_outputs_and_gradients_bitwise_unchanged(build):
    torch.manual_seed(5)
    a = build()
    b = build()
    b.load_state_dict(a.state_dict())
    outs_a, grads_a = _train(a, 4)
    mon = StabilityMonitor(b, every=1)  # every step logged: hooks, probe pass, snapshots every time
    outs_b, grads_b = _train(b, 4, mon)
    for oa, ob in zip(outs_a, outs_b):
        assert torch.equal(oa, ob)
    for ga, gb in zip(grads_a, grads_b):
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert len(mon.history) == 4
    mon.close()


def test_no_hooks_between_logging_steps_and_removed_cleanly():
    model = make_stack("post_ln", depth=2, dim=16, seed=0)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    mon = StabilityMonitor(model, every=3)
    for i in range(7):
        logged = mon.begin_step()
        assert logged == (i % 3 == 0)
        assert _no_hooks(model) != logged  # hooks exist only inside a logged step
        model(torch.randn(2, 5, 16)).sum().backward()
        opt.step()
        opt.zero_grad()
        mon.end_step()
        assert _no_hooks(model)
    assert [h["step"] for h in mon.history] == [0, 3, 6]
    # a step that raises leaves nothing behind
    with pytest.raises(RuntimeError):
        with mon.step(step=9):
            raise RuntimeError("boom")
    assert _no_hooks(model)
    # the optimizer integration, then close: every hook is gone
    mon2 = StabilityMonitor(model, every=2).attach_optimizer(opt)
    for _ in range(4):
        model(torch.randn(2, 5, 16)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert [h["step"] for h in mon2.history] == [0, 2]
    assert mon2.history[0]["quantities"]["grad_norm"]
    mon2.close()
    mon.close()
    assert _no_hooks(model)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    with pytest.raises(RuntimeError, match="closed"):
        mon.begin_step()


def test_gradient_and_update_ratio_by_hand():
    torch.manual_seed(3)
    model = make_stack("post_ln", depth=2, dim=8, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = StabilityMonitor(model, every=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with mon.step():
        model(torch.randn(2, 3, 8)).pow(3).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)  # gone before end_step: the accumulated gradient is used
    q = mon.history[0]["quantities"]
    names = [n for n in before if n.startswith("sublayers.1.")]
    g = math.sqrt(sum(grads[n].pow(2).sum().item() for n in names))
    u = math.sqrt(sum((p.detach() - before[n]).pow(2).sum().item() for n, p in model.named_parameters() if n in names))
    w = math.sqrt(sum(before[n].pow(2).sum().item() for n in names))
    assert q["grad_norm"]["sublayers.1"] == pytest.approx(g, rel=1e-5)
    assert q["update_ratio"]["sublayers.1"] == pytest.approx(u / w, rel=1e-5)
    assert q["act_frac"]["residuals.0"] == pytest.approx(q["act_max"]["residuals.0"] / torch.finfo(torch.float32).max)
    mon.close()


def test_outputs_written(tmp_path):
    model = make_stack("admin", depth=2, dim=8, seed=0)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    with StabilityMonitor(model, tmp_path / "mon", every=2, range_dtype=torch.float16) as mon:
        for _ in range(5):
            with mon.step() as s:
                loss = model(torch.randn(2, 3, 8)).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                s.loss = loss
    d = tmp_path / "mon"
    lines = [json.loads(x) for x in (d / "monitor.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 2, 4]
    assert set(lines[-1]["quantities"]) >= {"beta", "output_change", "grad_norm", "update_ratio", "act_max",
                                            "act_frac", "attn_logit_max"}
    assert lines[-1]["quantities"]["act_frac"]["residuals.0"] == pytest.approx(
        lines[-1]["quantities"]["act_max"]["residuals.0"] / 65504.0)
    assert "| beta | residuals.0 |" in (d / "summary.md").read_text()
    assert (d / "heatmap_beta.png").stat().st_size > 0 and (d / "heatmap_output_change.png").exists()
    assert any((d / "tb").iterdir())


def test_warning_line_names_layer_quantity_and_trend(caplog):
    model = make_stack("post_ln", depth=1, dim=8, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon = StabilityMonitor(model, every=1, rules={"update_ratio": WarningRule(threshold=0.0, window=2, min_growth=0.0)})
    with caplog.at_level(logging.WARNING, logger="stability_toolbox.monitor"):
        for i in range(6):
            for g in opt.param_groups:
                g["lr"] = 0.01 * 2 ** i  # rising updates
            with mon.step():
                model(torch.randn(2, 3, 8)).pow(3).sum().backward()
                opt.step()
                opt.zero_grad()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stability warning:")]
    assert lines and all("update_ratio" in x and "rose" in x for x in lines)
    assert any("layer sublayers.0" in x for x in lines)
    assert mon.warnings[0]["quantity"] == "update_ratio"
    # each (layer, quantity) warns once
    assert len({(w["layer"], w["quantity"]) for w in mon.warnings}) == len(mon.warnings)
    # a NaN loss warns at once
    mon2 = StabilityMonitor(model, every=1)
    with caplog.at_level(logging.WARNING, logger="stability_toolbox.monitor"):
        with mon2.step() as s:
            s.loss = torch.tensor(float("nan"))
    assert any("loss is non-finite" in w["message"] for w in mon2.warnings)


def test_bad_arguments_are_named_and_attach_nothing(tmp_path):
    model = make_stack("post_ln", depth=1, dim=8, seed=0)
    with pytest.raises(TypeError, match="model"):
        StabilityMonitor("not a model")
    with pytest.raises(ValueError, match="every"):
        StabilityMonitor(model, every=0)
    with pytest.raises(TypeError, match="every"):
        StabilityMonitor(model, every=1.5)
    with pytest.raises(ValueError, match="fallback"):
        StabilityMonitor(model, fallback="sideways")
    with pytest.raises(ValueError, match="rules"):
        StabilityMonitor(model, rules={"speed": WarningRule(1.0)})
    with pytest.raises(TypeError, match="range_dtype"):
        StabilityMonitor(model, range_dtype=torch.int8)
    with pytest.raises(TypeError, match="probe"):
        StabilityMonitor(model, probe=3)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="log_dir"):
        StabilityMonitor(model, f)
    with pytest.raises(ValueError, match="nothing to monitor"):
        StabilityMonitor(nn.Linear(3, 3))
    mon = StabilityMonitor(model)
    with pytest.raises(TypeError, match="loss"):
        mon.end_step(loss="high")
    assert _no_hooks(model)


def test_torch_compile_of_a_monitored_model():
    torch._dynamo.reset()
    model = make_stack("post_ln", depth=2, dim=16, seed=0)
    ref = make_stack("post_ln", depth=2, dim=16, seed=0)
    compiled = torch.compile(model, backend="eager")
    mon = StabilityMonitor(model, every=2)
    for i in range(4):
        x = torch.randn(2, 5, 16)
        with mon.step():
            out = compiled(x)
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
    assert [h["step"] for h in mon.history] == [0, 2]
    assert mon.history[0]["quantities"]["beta"]["residuals.0"] > 0
    mon.close()


def test_hf_callback_stock_and_converted(tmp_path):
    transformers = pytest.importorskip("transformers")
    import admin_torch
    from stability_toolbox.hf_callback import StabilityMonitorCallback

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(0, 50, (8,), generator=g)
            return {"input_ids": ids, "labels": ids.clone()}

    for converted in (False, True):
        torch.manual_seed(0)
        model = transformers.BertForMaskedLM(cfg)
        if converted:
            admin_torch.convert(model)
        out = tmp_path / f"run{int(converted)}"
        args = transformers.TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=4,
                                              logging_steps=100, save_strategy="no", report_to=[], use_cpu=True,
                                              disable_tqdm=True, dataloader_num_workers=0)
        cb = StabilityMonitorCallback(every=2)
        transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[cb]).train()
        hist = cb.monitor.history
        assert [h["step"] for h in hist] == [0, 2]
        assert hist[-1]["loss"] > 0
        assert len(hist[-1]["quantities"]["beta"]) == 4  # 2 layers x 2 sublayers
        assert hist[-1]["quantities"]["grad_norm"]["bert.encoder.layer.1"] > 0
        assert cb.monitor.mechanism == ("residual modules" if converted else "layer descriptions")
        assert (out / "stability" / "summary.md").exists()


def test_names_import_from_where_they_did_before_the_monitor_was_split():
    import stability_toolbox
    from stability_toolbox import monitor, quantities, records, sites, warning_rules

    assert monitor.read_records is records.read_records and monitor._json_safe is records._json_safe
    assert monitor.register_layer_kind is sites.register_layer_kind is stability_toolbox.register_layer_kind
    assert monitor.WarningRule is warning_rules.WarningRule is stability_toolbox.WarningRule is WarningRule
    assert monitor.DEFAULT_RULES is warning_rules.DEFAULT_RULES is stability_toolbox.DEFAULT_RULES
    assert monitor.QUANTITIES is quantities.QUANTITIES and monitor.MODEL_QUANTITIES is quantities.MODEL_QUANTITIES
    assert monitor.StabilityMonitor is stability_toolbox.StabilityMonitor is StabilityMonitor
    assert all(hasattr(monitor, name) for name in monitor.__all__)
    assert all(hasattr(stability_toolbox, name) for name in stability_toolbox.__all__)


def test_the_monitors_modules_import_downward_only():
    """monitor.py composes the one-idea modules; each imports only those below it (read from the source, imports
    inside functions too), so there is no circle and the quantities know nothing of sites, records or steps."""
    import ast
    from pathlib import Path

    import stability_toolbox

    below = {"tensor_norms": set(), "quantities": {"tensor_norms"}, "inert_hooks": set(), "warning_rules": set(),
             "sites": {"quantities"}, "module_state": set(), "probe": {"quantities", "module_state"},
             "records": {"quantities", "warning_rules"},
             "attention_stats": {"quantities", "sites"}, "signal_detector": set(), "scalar_reader": set(),
             "leading_signals": {"quantities", "inert_hooks", "sites", "attention_stats", "scalar_reader",
                                 "tensor_norms"},
             "monitor": {"quantities", "inert_hooks", "warning_rules", "sites", "probe", "records", "leading_signals",
                         "signal_detector", "scalar_reader"}}
    package = Path(stability_toolbox.__file__).parent
    for module, allowed in below.items():
        imported = set()
        for node in ast.walk(ast.parse((package / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stability_toolbox"):
                imported |= {(node.module.split(".") + ["__init__"])[1]}
            elif isinstance(node, ast.Import):
                imported |= {(a.name.split(".") + ["__init__"])[1] for a in node.names
                             if a.name.startswith("stability_toolbox")}
        assert imported == allowed, f"{module} imports {sorted(imported)}, expected {sorted(allowed)}"
