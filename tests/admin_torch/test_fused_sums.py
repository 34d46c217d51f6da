"""admin_torch.fused_sums: the rewrite of a layer's own forward, proved or refused, and the converted models it
serves against the hook path (an independent implementation of the same Admin sums) on every HuggingFace family."""

import copy
import linecache
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import admin_torch
from admin_torch import OmegaResidual, fused_sums
from admin_torch.fused_sums import FusedForward

from benchmarks import hf_families as H

transformers = pytest.importorskip("transformers")


def _module_class(forward_source: str, name: str = "Block"):
    """A module with ``fc``, ``fc2`` and LayerNorms ``norm``, ``norm2``, whose forward is ``forward_source`` (kept
    in ``linecache`` under a made-up file name, so that ``inspect.getsource`` reads it as it reads a real file)."""
    source = textwrap.dedent(forward_source)
    filename = f"<test_fused_sums {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"nn": nn, "torch": torch}
    exec(compile(source, filename, "exec"), namespace)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
            self.norm, self.norm2 = nn.LayerNorm(8), nn.LayerNorm(8)

    Block.forward = namespace["forward"]
    Block.__name__ = Block.__qualname__ = name
    return Block


BART_STYLE = """
def forward(self, hidden_states):
    residual = hidden_states
    hidden_states = self.fc(hidden_states)
    hidden_states = residual + hidden_states
    hidden_states = self.norm(hidden_states)
    residual = hidden_states
    hidden_states = self.fc2(hidden_states)
    hidden_states = hidden_states + residual
    hidden_states = self.norm2(hidden_states)
    return hidden_states
"""

INLINE_STYLE = """
def forward(self, x):
    h = self.norm(self.fc(x) + x)
    return self.norm2(h + self.fc2(h))
"""

BRANCHED = """
def forward(self, hidden_states, skip=False):
    residual = hidden_states
    hidden_states = self.fc(hidden_states)
    hidden_states = residual + hidden_states
    hidden_states = self.norm(hidden_states)
    if not skip:
        residual = hidden_states
        hidden_states = self.fc2(hidden_states)
        hidden_states = residual + hidden_states
        hidden_states = self.norm2(hidden_states)
    return hidden_states
"""


def _written_out(block, x, w1, w2, skip=False):
    h = block.norm(w1 * x + block.fc(x))
    return h if skip else block.norm2(w2 * h + block.fc2(h))


@pytest.mark.parametrize("source", [BART_STYLE, INLINE_STYLE, BRANCHED], ids=["bart", "inline", "branched"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_proved_rewrite_is_the_written_out_admin_function_forward_and_backward(source, dtype):
    torch.manual_seed(0)
    block = _module_class(source)().to(dtype)
    omegas = [OmegaResidual(1.7), OmegaResidual(2.3)]
    handle = fused_sums.install(block, ["norm", "norm2"], omegas)
    assert handle is not None and isinstance(vars(block)["forward"], FusedForward)
    ref = copy.deepcopy(block)  # its parameters, for the written-out formula
    x = torch.randn(3, 5, 8, dtype=dtype, requires_grad=True)
    y = block(x)
    expected = _written_out(ref, x, 1.7, 2.3)
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *block.parameters()], g)
    grads_ref = torch.autograd.grad(expected, [x, *ref.parameters()], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    handle.remove()
    assert "forward" not in vars(block)
    torch.testing.assert_close(block(x), _written_out(ref, x, 1.0, 1.0))  # the stock function again


def test_a_branch_that_does_not_run_leaves_its_sum_out():
    block = _module_class(BRANCHED, "Branched")()
    fused_sums.install(block, ["norm", "norm2"], [OmegaResidual(1.5), OmegaResidual(2.5)])
    x = torch.randn(2, 8)
    torch.testing.assert_close(block(x, skip=True), _written_out(block, x, 1.5, 2.5, skip=True))
    torch.testing.assert_close(block(x, True), _written_out(block, x, 1.5, 2.5, skip=True))


#: the forms refused here; test_fused_sums_attack.py holds the rebinding, branch and expression forms
REFUSED = {
    "no stream operand": """
        def forward(self, hidden_states):
            a = self.fc(hidden_states)
            b = self.fc2(hidden_states)
            hidden_states = a + b
            hidden_states = self.norm(hidden_states)
            return hidden_states
        """,
    "a loop": """
        def forward(self, hidden_states):
            for _ in range(1):
                residual = hidden_states
                hidden_states = self.fc(hidden_states)
                hidden_states = residual + hidden_states
                hidden_states = self.norm(hidden_states)
            return hidden_states
        """,
    "its own omega name": """
        def forward(self, hidden_states, _admin_omegas_=None):
            residual = hidden_states
            hidden_states = self.fc(hidden_states)
            hidden_states = residual + hidden_states
            hidden_states = self.norm(hidden_states)
            return hidden_states
        """,
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_cannot_be_proved_the_admin_sum_is_refused_and_nothing_changes(name):
    cls = _module_class(REFUSED[name], "Refused" + "".join(w.title() for w in name.split()))
    block = cls()
    fn, why = fused_sums.rewrite(block, ["norm"], (0,))
    assert fn is None and why
    assert fused_sums.install(block, ["norm"], [OmegaResidual(2.0)]) is None
    assert "forward" not in vars(block)


def test_install_checks_its_omegas_and_leaves_an_instance_forward_alone():
    block = _module_class(BART_STYLE, "Checked")()
    with pytest.raises(ValueError, match="omegas"):
        fused_sums.install(block, ["norm", "norm2"], [OmegaResidual(2.0)])
    with pytest.raises(ValueError, match="omegas"):
        fused_sums.install(block, ["norm", "norm2"], [OmegaResidual(2.0), 2.0])
    block.forward = lambda x: x
    assert fused_sums.install(block, ["norm", "norm2"], [OmegaResidual(2.0), OmegaResidual(2.0)]) is None


# ---- every HuggingFace family: the fused model against the hook path --------------------------------------------

#: the families whose converted layers make every sum in their own code (no hook left)
FULLY_FUSED = ("bert", "bert_decoder", "roberta", "xlm_roberta", "camembert", "electra", "ernie", "roformer",
               "big_bird", "longformer", "data2vec_text", "deberta_v2", "distilbert", "bart", "bart_causal",
               "blenderbot_small", "led")


def _hooks_only(model, monkeypatch, **kwargs):
    with monkeypatch.context() as m:
        m.setattr(fused_sums, "install", lambda *a, **k: None)
        return admin_torch.convert(model, **kwargs)


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("family", list(H.families()))
def test_every_family_computes_what_the_hook_path_computes(family, monkeypatch):
    torch.manual_seed(0)
    model, x, _ = H.build(family)
    fused = admin_torch.convert(copy.deepcopy(model))
    hooked = _hooks_only(copy.deepcopy(model), monkeypatch)
    for m in (fused, hooked):
        for i, om in enumerate(o for o in m.modules() if isinstance(o, OmegaResidual)):
            om.set_omega_(1.5 + 0.05 * i)  # omegas that differ per sublayer, as after profiling
        m.train()
    fused_count = sum(isinstance(vars(m).get("forward"), FusedForward) for m in fused.modules())
    if family in FULLY_FUSED:
        assert _hooks(fused) == 0 and fused_count > 0
    y, y_ref = H.output(fused(**x)), H.output(hooked(**x))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.pow(2).mean().backward()
    y_ref.pow(2).mean().backward()
    ref = dict(hooked.named_parameters())
    for name, p in fused.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_bart_gradient_checkpointing_still_recomputes_the_layers():
    """The rewrite is made again inside transformers' checkpointing wrapper: the attention runs again in the
    backward pass (checkpointing is on), and the gradients are those without checkpointing."""
    model, x, _ = H.build("bart")
    admin_torch.convert(model)
    model.train()
    plain = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    model.model.encoder.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    loss = H.output(model(**x)).pow(2).mean()
    forward_calls = len(calls)
    loss.backward()
    assert forward_calls == 1 and len(calls) == 2  # recomputed once in the backward pass
    loss_ref = H.output(plain(**x)).pow(2).mean()
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref)
    ref = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-4, atol=1e-6, msg=name)


# ---- OmegaResidual.add_scaled -----------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), omega=st.floats(0.1, 8.0),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), vector=st.booleans())
def test_add_scaled_is_x_times_omega_plus_f(shape, omega, dtype, vector):
    torch.manual_seed(0)
    res = OmegaResidual(omega, as_parameter=vector, embed_dim=shape[-1] if vector else None)
    x, f = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    expected = x.double() * res.omega.detach().double() + f.double()
    got = res.add_scaled(f, x)
    assert got.dtype == dtype  # omega follows x's dtype, as in the module's own call
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


def test_add_scaled_follows_omega_and_a_hook_sees_the_module_call():
    res = OmegaResidual(2.0)
    x, f = torch.ones(3), torch.zeros(3)
    torch.testing.assert_close(res.add_scaled(f, x), torch.full((3,), 2.0))
    res.set_omega_(3.0)  # the cached number follows an in-place change
    torch.testing.assert_close(res.add_scaled(f, x), torch.full((3,), 3.0))
    res.load_state_dict({"omega": torch.tensor([4.0])})
    torch.testing.assert_close(res.add_scaled(f, x), torch.full((3,), 4.0))
    seen = []
    handle = res.register_forward_hook(lambda m, args, out: seen.append(args))
    torch.testing.assert_close(res.add_scaled(f, x), torch.full((3,), 4.0))
    handle.remove()
    assert len(seen) == 1 and seen[0][0] is x and seen[0][1] is f


def test_add_scaled_gives_a_vector_omega_its_gradient():
    res = OmegaResidual(2.0, as_parameter=True, embed_dim=3)
    x, f = torch.randn(4, 3), torch.randn(4, 3)
    res.add_scaled(f, x).sum().backward()
    torch.testing.assert_close(res.omega.grad, x.sum(0))


def test_add_scaled_refuses_what_the_module_refuses():
    res = OmegaResidual(2.0)
    with pytest.raises(TypeError):
        res.add_scaled(torch.ones(3), None)
    with pytest.raises(ValueError):
        res.add_scaled(torch.ones(3), torch.ones(3, device="meta"))
