"""Adversarial tests of the hook-free Admin reading of HuggingFace BERT-style sublayers (``residual_arg``: the output
module called as ``module(f_x, input_tensor)``, whose forward is BERT's, gets `admin_torch.fused_sums`'s forward:
``LayerNorm(dropout(dense(h)) + omega * x)`` with the sum one fused operation; a watched omega is called as a
module, so its hooks see ``(x, f_x)``). Tiny random models from configs (nothing downloaded); every expectation is
the written-out Admin formula run with no admin_torch code (equal up to the rounding of one fused multiply-add)."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from admin_torch import OmegaResidual, convert, fold
from admin_torch.fused_sums import FusedForward
from admin_torch.hf_architectures import bert_like_kind
from admin_torch.hooks import HANDLES, install_hooks, remove_hooks

from benchmarks import hf_families as H

transformers = pytest.importorskip("transformers")

OUTPUTS = ("BertSelfOutput", "BertOutput")


def _omegas(model):
    return [m for m in model.modules() if isinstance(m, OmegaResidual)]


def build(family="bert", as_parameter=False):
    """A converted tiny model whose omegas all differ (vector omegas: per feature too), as after training."""
    model, x, _ = H.build(family)
    convert(model, as_parameter=as_parameter)
    with torch.no_grad():
        for i, m in enumerate(_omegas(model)):
            m.omega.mul_(1 + 0.1 * i)
            if as_parameter:
                m.omega.add_(torch.linspace(-0.3, 0.3, m.omega.numel()))
    return model, x


def _outputs_of(layer):
    outs = [layer.attention.output]
    if hasattr(layer, "crossattention"):
        outs.append(layer.crossattention.output)
    return outs + [layer.output]


def written_out(model):
    """A deep copy with every admin_torch hook removed and each output module's forward replaced by the written-out
    Admin sum ``LN(dropout(dense(h)) + omega * x)`` (functional LayerNorm: no hook can run)."""
    ref = copy.deepcopy(model)
    for layer in ref.modules():
        if hasattr(layer, HANDLES):
            outs = _outputs_of(layer)
            remove_hooks(layer)
            for out, om in zip(outs, layer.admin_omegas):
                def forward(hidden_states, input_tensor, out=out, om=om):
                    ln = out.LayerNorm
                    return F.layer_norm(out.dropout(out.dense(hidden_states)) + om.omega * input_tensor,
                                        ln.normalized_shape, ln.weight, ln.bias, ln.eps)
                out.forward = forward
    return ref


def hook_counts(model):
    return {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()
            if m._forward_pre_hooks or m._forward_hooks}


def one_hook_each(model):
    """The unwatched state: no hook anywhere, each output module with the fused forward."""
    outputs = [m for m in model.modules() if type(m).__name__ in OUTPUTS]
    return outputs and not hook_counts(model) and all(isinstance(vars(m).get("forward"), FusedForward)
                                                      for m in outputs)


class Count:
    """A picklable forward hook that counts its calls."""

    def __init__(self):
        self.n = 0

    def __call__(self, *args):
        self.n += 1


def watch(model):
    hook = Count()
    return hook, [m.register_forward_hook(hook) for m in _omegas(model)]


def out_of(model, x):
    return H.output(model(**x))


@pytest.mark.parametrize("family", ["bert", "bert_decoder"])
@pytest.mark.parametrize("as_parameter", [False, True])
def test_outputs_and_gradients_are_the_written_out_admin_formula(family, as_parameter):
    model, x = build(family, as_parameter)
    model.train()  # dropout 0 in the configs: train mode is deterministic
    ref = written_out(model)
    y, y_ref = out_of(model, x), out_of(ref, x)
    torch.testing.assert_close(y, y_ref)
    y.pow(2).mean().backward()
    y_ref.pow(2).mean().backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if grads[name].grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, msg=name)
    assert all(m.omega.grad is not None and m.omega.grad.abs().sum() > 0 for m in _omegas(model)) == as_parameter
    assert one_hook_each(model)


def test_watched_unwatched_toggles_train_and_fold_equal_the_converted_model():
    """Training steps with the omegas watched on every other step (a hook on every omega, as the monitor's logging
    steps do), then fold: the folded model computes the converted model, which computes the written-out formula."""
    model, x = build(as_parameter=True)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    seen = 0
    for step in range(4):
        hook, handles = watch(model) if step % 2 == 0 else (None, [])
        y = out_of(model, x)
        torch.testing.assert_close(y, out_of(written_out(model), x))
        y.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        for h in handles:
            h.remove()
        seen += hook.n if hook else 0
    assert seen == 2 * len(_omegas(model))  # each watched step: every omega called once
    model.eval()
    with torch.no_grad():
        y = out_of(model, x)
        torch.testing.assert_close(y, out_of(written_out(model), x))
        assert one_hook_each(model)
        torch.testing.assert_close(out_of(fold(model), x), y, rtol=1e-5, atol=1e-5)
        hook, handles = watch(model)  # fold of a watched model: the same function
        torch.testing.assert_close(out_of(fold(model), x), y, rtol=1e-5, atol=1e-5)


def test_monitor_readings_are_the_written_out_beta_attached_repeatedly_and_two_at_once():
    from stability_toolbox import StabilityMonitor

    model, x = build()
    model.train()
    for attempt in range(3):
        mons = [StabilityMonitor(model, every=1, rules={}, signal_rules=[]) for _ in range(1 + attempt % 2)]
        assert mons[0].mechanism == "residual modules"
        seen = {}  # x and f_x of each output module, written out from its arguments (a non-admin hook)
        probes = [(n, m.register_forward_pre_hook(
            lambda m, a, n=n: seen.__setitem__(n, (a[1].detach(), m.dense(a[0]).detach()))))
            for n, m in model.named_modules() if type(m).__name__ in OUTPUTS]
        for mon in mons:
            mon.begin_step()
        loss = out_of(model, x).pow(2).mean()
        loss.backward()
        for mon in mons:
            mon.end_step(loss)
        for _, h in probes:
            h.remove()
        checked = 0
        for layer_name, layer in model.named_modules():
            if not hasattr(layer, HANDLES):
                continue
            for (name, out), (i, om) in zip([(n, o) for n, o in model.named_modules() if o in _outputs_of(layer)],
                                            enumerate(layer.admin_omegas)):
                xx, f = seen[name]
                s = f + om.omega * xx
                expected = (f.var(unbiased=False) / s.var(unbiased=False)).item()
                for mon in mons:
                    got = mon.history[-1]["quantities"]["beta"][f"{layer_name}.admin_omegas.{i}"]
                    assert got == pytest.approx(expected, rel=1e-3)
                    checked += 1
        assert checked == 4 * len(mons)  # 2 layers x 2 sublayers, per monitor
        for mon in mons:
            mon.close()
        model.zero_grad()
        with torch.no_grad():
            torch.testing.assert_close(out_of(model, x), out_of(written_out(model), x))
        assert one_hook_each(model)  # detached: one hook again after the next forward


@pytest.mark.parametrize("state", ["watched", "mid_toggle", "after_failed_forward", "unwatched"])
def test_deepcopy_pickle_and_fold_in_every_state(state):
    model, x = build()
    with torch.no_grad():
        expected = out_of(written_out(model), x)
    _, handles = watch(model)
    if state != "unwatched":
        out_of(model, x)  # installs the captured reading's hooks
    if state == "after_failed_forward":  # raises inside an output module, its slot holding a non-leaf x
        boom = model.encoder.layer[1].output.LayerNorm.register_forward_pre_hook(
            lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            out_of(model, x)
        boom.remove()
    if state in ("mid_toggle", "unwatched"):
        for h in handles:
            h.remove()
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), model):
        with torch.no_grad():
            torch.testing.assert_close(out_of(other, x), expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out_of(fold(other), x), expected, rtol=1e-5, atol=1e-5)
        for layer in other.encoder.layer:
            remove_hooks(layer)  # the captured reading's hooks, if installed, go too
        assert all(isinstance(other.get_submodule(n), OmegaResidual) for n in hook_counts(other))
        for layer in other.encoder.layer:  # convert again (the same omegas): one hook each, the formula again
            install_hooks(layer, bert_like_kind(), list(layer.admin_omegas))
        for m in _omegas(other):
            m._forward_hooks.clear()
        with torch.no_grad():
            torch.testing.assert_close(out_of(other, x), expected)
        assert one_hook_each(other)


def test_output_module_called_directly_positional_and_keyword_watched_or_not():
    model, _ = build()
    layer = model.encoder.layer[0]
    out, om = layer.attention.output, layer.admin_omegas[0]
    torch.manual_seed(1)
    f, h = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    ln = out.LayerNorm
    expected = F.layer_norm(out.dense(f) + om.omega * h, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    hook, handles = Count(), []
    for watched in (False, True, False):
        if watched:
            handles = [om.register_forward_hook(hook)]
        for call in (lambda: out(f, h), lambda: out(f, input_tensor=h), lambda: out(hidden_states=f, input_tensor=h)):
            torch.testing.assert_close(call(), expected, rtol=1e-6, atol=1e-6)
        for handle in handles:
            handle.remove()
        handles = []
    assert hook.n == 3
    # no residual input: a TypeError naming it (Python's kind for a missing argument), for every spelling
    for call in (lambda: out(f), lambda: out(f, None), lambda: out(hidden_states=f)):
        with pytest.raises(TypeError, match="input_tensor"):
            call()


def test_scaled_input_refuses_bad_input_and_changes_nothing():
    scalar, vector = OmegaResidual(2.0), OmegaResidual(2.0, as_parameter=True, embed_dim=3)
    for om in (scalar, vector):
        before = om.omega.clone()
        for bad in ([1.0, 2.0, 3.0], 3.0, None, "x"):
            with pytest.raises(TypeError, match="x must be a torch.Tensor"):
                om.scaled_input(bad)
        with pytest.raises(ValueError, match="x must be on the device of omega"):
            om.scaled_input(torch.ones(3, device="meta"))
        torch.testing.assert_close(om.omega, before, rtol=0, atol=0)
        handle = om.register_forward_hook(Count())  # watched: the same checks, before the None
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            om.scaled_input(1.0)
        handle.remove()
    for bad in (torch.ones(4), torch.tensor(1.0)):
        with pytest.raises(ValueError, match="embed_dim=3"):
            vector.scaled_input(bad)
    # dtype: omega follows a floating x; an integer x is promoted (never truncated)
    assert scalar.scaled_input(torch.ones(2, dtype=torch.float16)).dtype == torch.float16
    torch.testing.assert_close(scalar.scaled_input(torch.ones(2, dtype=torch.int64)), torch.full((2,), 2.0))


def test_a_global_module_hook_takes_the_captured_reading_and_its_removal_one_hook():
    model, x = build()
    with torch.no_grad():
        expected = out_of(written_out(model), x)
        handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
        try:
            torch.testing.assert_close(out_of(model, x), expected)
        finally:
            handle.remove()
        torch.testing.assert_close(out_of(model, x), expected)
    assert one_hook_each(model)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("watched", [False, True])
def test_gradient_checkpointing_watched_or_not(use_reentrant, watched):
    model, x = build(as_parameter=True)
    model.train()
    ref = written_out(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()
    hook, handles = watch(model) if watched else (None, [])
    loss, ref_loss = out_of(model, x).pow(2).mean(), out_of(ref, x).pow(2).mean()
    loss.backward()
    ref_loss.backward()
    for h in handles:
        h.remove()
    torch.testing.assert_close(loss, ref_loss)
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if grads[name].grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_model_and_fullgraph_layer_match_eager():
    model, x = build(as_parameter=True)
    with torch.no_grad():
        expected = out_of(written_out(model), x)
        torch._dynamo.reset()
        try:
            torch.testing.assert_close(out_of(torch.compile(model, backend="eager"), x), expected)
            layer = model.encoder.layer[0]
            h = torch.randn(2, 8, 16)
            torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(h)[0], layer(h)[0])
        finally:
            torch._dynamo.reset()


def test_compiled_fullgraph_layer_with_a_watched_omega():
    """A layer compiled while an omega is watched traces the omega's module call and calls the hook."""
    model, _ = build()
    layer = model.encoder.layer[0]
    h = torch.randn(2, 8, 16)
    with torch.no_grad():
        expected = layer(h)[0]
        hook, _ = watch(layer)
        torch._dynamo.reset()
        try:
            got = torch.compile(layer, backend="eager", fullgraph=True)(h)[0]
        finally:
            torch._dynamo.reset()
    torch.testing.assert_close(got, expected)
    assert hook.n == 2


def test_a_user_hook_on_an_omega_that_changes_its_call_is_honoured():
    """A forward hook that changes omega's output (here: per feature, which the LayerNorm does not undo) acts on
    the sum, as on any module; removed, the sublayer is one hook and the formula again."""
    model, x = build()
    layer = model.encoder.layer[1]
    om, out = layer.admin_omegas[1], layer.output
    ramp = torch.linspace(0.0, 1.0, 16)
    handle = om.register_forward_hook(lambda m, args, y: y + ramp * args[0])  # omega -> omega + ramp
    seen = {}
    probe = out.register_forward_pre_hook(lambda m, a: seen.update(x=a[1].detach(), f=m.dense(a[0]).detach()))
    with torch.no_grad():
        y = out_of(model, x)
        ln = out.LayerNorm
        expected_last = F.layer_norm(seen["f"] + (om.omega + ramp) * seen["x"], ln.normalized_shape, ln.weight,
                                     ln.bias, ln.eps)
        torch.testing.assert_close(y, expected_last)
        handle.remove()
        probe.remove()
        torch.testing.assert_close(out_of(model, x), out_of(written_out(model), x))
    assert one_hook_each(model)


def test_a_layer_compiled_unwatched_ignores_a_later_hook_and_stays_exact():
    """A layer compiled unwatched keeps its fused reading when a global hook appears later (the compiled code does
    not call hooks added after compiling, as for any module)."""
    model, _ = build()
    layer = model.encoder.layer[0]
    h = torch.randn(2, 8, 16)
    with torch.no_grad():
        expected = layer(h)[0]
        torch._dynamo.reset()
        try:
            compiled = torch.compile(layer, backend="eager", fullgraph=True)
            torch.testing.assert_close(compiled(h)[0], expected)
            hook = Count()
            handle = torch.nn.modules.module.register_module_forward_hook(hook)
            try:
                torch.testing.assert_close(compiled(h)[0], expected)
            finally:
                handle.remove()
        finally:
            torch._dynamo.reset()
    assert one_hook_each(model)


def test_after_remove_hooks_a_hook_on_an_omega_installs_nothing():
    """Removing Admin's hooks also forgets the readers: a hook put on an omega afterwards adds no hook to the
    layer."""
    from admin_torch.hooks import remove_hooks

    model, _ = build()
    layer = model.encoder.layer[0]
    remove_hooks(layer)
    before = hook_counts(model)
    handle = layer.admin_omegas[0].register_forward_hook(Count())
    after = hook_counts(model)
    handle.remove()
    assert {k: v for k, v in after.items() if "admin_omegas" not in k} == \
        {k: v for k, v in before.items() if "admin_omegas" not in k}

