"""admin_torch.hooks: the hooks mechanism on small Post-LN layers written here (no transformers needed); the
HuggingFace layers it serves are covered in test_huggingface.py (gradient checkpointing, compile) and
test_convert.py (failed forwards, copies and pickles of converted models). The hooks are what a layer gets where
`admin_torch.fused_sums` cannot prove its sums; the layers here it could, so these tests keep it out."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from admin_torch import OmegaResidual, fused_sums
from admin_torch.architectures import LayerKind, Sublayer
from admin_torch.hooks import HANDLES, check_removable, install_hooks, remove_hooks


@pytest.fixture(autouse=True)
def hooks_only(monkeypatch):
    """The hook path, as for a layer whose forward the rewrite refuses."""
    monkeypatch.setattr(fused_sums, "install", lambda *args, **kwargs: None)


class Block(nn.Module):
    """``LN2(h + fc2(h))`` with ``h = LN1(x + fc1(x))``: a Post-LN layer of two sublayers."""

    def __init__(self, dim=8):
        super().__init__()
        self.fc1, self.norm1 = nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.fc2, self.norm2 = nn.Linear(dim, dim), nn.LayerNorm(dim)

    def forward(self, x):
        h = self.norm1(x + self.fc1(x))
        return self.norm2(h + self.fc2(h))


#: x of the first sublayer is fc1's input, x of the second the output of norm1
BLOCK = LayerKind((Sublayer("norm1", ("fc1",), capture="fc1"), Sublayer("norm2", ("fc2",), source="norm1")),
                  last_norm="norm2", mechanism="hooks")


class Output(nn.Module):
    """Called as ``output(f_x, x)``: ``LN(f_x + x)`` (HuggingFace's ``BertOutput`` pattern)."""

    def __init__(self, dim=8):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, hidden_states, input_tensor):
        return self.norm(hidden_states + input_tensor)


class ArgBlock(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.fc, self.output = nn.Linear(dim, dim), Output(dim)

    def forward(self, x):
        return self.output(self.fc(x), input_tensor=x)


ARG_BLOCK = LayerKind((Sublayer("output.norm", ("fc",), residual_arg="output"),), last_norm="output.norm",
                      mechanism="hooks")


def hooked(omegas=(1.7, 2.9)):
    torch.manual_seed(0)
    block = Block()
    block.admin_omegas = nn.ModuleList(OmegaResidual(w) for w in omegas)
    install_hooks(block, BLOCK, list(block.admin_omegas))
    return block


def written_out(block, x):
    w1, w2 = (float(m.omega) for m in block.admin_omegas)
    ln = lambda norm, s: F.layer_norm(s, norm.normalized_shape, norm.weight, norm.bias, norm.eps)  # noqa: E731
    h = ln(block.norm1, w1 * x + block.fc1(x))
    return ln(block.norm2, w2 * h + block.fc2(h))


def test_hooks_make_each_residual_omega_x_plus_f_x():
    block, x = hooked(), torch.randn(3, 8)
    torch.testing.assert_close(block(x), written_out(block, x))
    torch.manual_seed(0)
    arg = ArgBlock()
    omega = OmegaResidual(2.5)
    install_hooks(arg, ARG_BLOCK, [omega])
    norm = arg.output.norm
    expected = F.layer_norm(2.5 * x + arg.fc(x), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(arg(x), expected)


def test_a_norm_called_outside_its_layer_is_refused():
    block = hooked()
    with pytest.raises(RuntimeError, match="converted LayerNorm ran outside its layer's forward"):
        block.norm1(torch.randn(3, 8))


def test_a_forward_that_raises_leaves_no_captured_tensor_behind(monkeypatch):
    block = hooked()
    x = torch.randn(3, 8, requires_grad=True) * 2  # a non-leaf input: it could be neither copied nor pickled

    def boom(_):
        raise RuntimeError("simulated failure inside the layer")

    monkeypatch.setattr(block.fc2, "forward", boom)
    with pytest.raises(RuntimeError, match="simulated failure"):
        block(x)
    monkeypatch.undo()
    # the layer's exit hook (always called) emptied its slot: norm1's output, captured for fc2, is not kept alive
    slots = [slot for hook in block._forward_hooks.values() for slot in getattr(hook, "slots", ())]
    assert len(slots) == 1 and slots[0].x is None
    copy.deepcopy(block)
    pickle.dumps(block)
    torch.testing.assert_close(block(x), written_out(block, x))


def test_copies_and_pickles_carry_hooks_of_their_own():
    block, x = hooked(), torch.randn(3, 8)
    for other in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        torch.testing.assert_close(other(x), block(x))
        with torch.no_grad():
            other.admin_omegas[0].omega.mul_(3.0)
        torch.testing.assert_close(other(x), written_out(other, x))
        torch.testing.assert_close(block(x), written_out(block, x))  # the original's omegas are its own
        assert not torch.allclose(other(x), block(x))


def test_remove_hooks_gives_the_stock_layer_back():
    block, x = hooked(), torch.randn(3, 8)
    check_removable("block", block)
    remove_hooks(block)
    assert not hasattr(block, HANDLES)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in block.modules())
    stock = Block()
    stock.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("admin_omegas")})
    torch.testing.assert_close(block(x), stock(x))
    remove_hooks(block)  # nothing left to remove: no error


def test_a_converted_layer_without_its_handles_cannot_be_unhooked():
    block = hooked()
    delattr(block, HANDLES)
    with pytest.raises(ValueError, match="block: converted layer without its hook handles"):
        check_removable("block", block)
    check_removable("stock", Block())  # not converted: nothing to remove


# ---------------------------------------------------------------- residual_arg sublayers: one hook each

class ArgBlock2(nn.Module):
    """Two sublayers that each make their sum inside one module called as ``output(f_x, x)`` (BERT's layout):
    ``h = LN1(fc1(x) + x)``, ``y = LN2(fc2(h) + h)``; ``by_keyword``: x passed as ``input_tensor=``."""

    def __init__(self, dim=8, by_keyword=False):
        super().__init__()
        self.fc1, self.out1 = nn.Linear(dim, dim), Output(dim)
        self.fc2, self.out2 = nn.Linear(dim, dim), Output(dim)
        self.by_keyword = by_keyword

    def forward(self, x):
        if self.by_keyword:
            h = self.out1(self.fc1(x), input_tensor=x)
            return self.out2(self.fc2(h), input_tensor=h)
        h = self.out1(self.fc1(x), x)
        return self.out2(self.fc2(h), h)


ARG_BLOCK2 = LayerKind((Sublayer("out1.norm", ("fc1",), residual_arg="out1"),
                        Sublayer("out2.norm", ("fc2",), source="out1.norm", residual_arg="out2")),
                       last_norm="out2.norm", mechanism="hooks")


def arg_hooked(by_keyword=False, as_parameter=False, omegas=(1.7, 2.9)):
    torch.manual_seed(0)
    block = ArgBlock2(by_keyword=by_keyword)
    block.admin_omegas = nn.ModuleList(OmegaResidual(w, as_parameter, 8) for w in omegas)
    if as_parameter:
        with torch.no_grad():  # a trained vector omega: a different value per feature
            for m in block.admin_omegas:
                m.omega.add_(torch.linspace(-0.5, 0.5, 8))
    install_hooks(block, ARG_BLOCK2, list(block.admin_omegas))
    return block


def arg_written_out(block, x):
    """``LN(f(x) + omega * x)`` per sublayer, from the block's parameters (functional: no hook runs)."""
    w1, w2 = (m.omega for m in block.admin_omegas)

    def sub(fc, out, w, h):
        f = F.linear(h, fc.weight, fc.bias)
        return F.layer_norm(f + w * h, out.norm.normalized_shape, out.norm.weight, out.norm.bias, out.norm.eps)
    h = sub(block.fc1, block.out1, w1, x)
    return sub(block.fc2, block.out2, w2, h)


def hook_counts(block):
    return {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in block.named_modules()
            if m._forward_pre_hooks or m._forward_hooks}


def slots_hold_nothing(block) -> bool:
    hooks = [h for m in block.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
    slots = [s for h in hooks for s in (getattr(h, "slot", None), *getattr(h, "slots", ())) if s is not None]
    return all(s.x is None for s in slots)


def grads(block, x, fn):
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    fn(block, x).pow(2).sum().backward()
    return [x.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("by_keyword", [False, True])
@pytest.mark.parametrize("as_parameter", [False, True])
def test_a_residual_arg_sublayer_is_one_hook_with_the_admin_outputs_and_gradients(by_keyword, as_parameter):
    block, x = arg_hooked(by_keyword, as_parameter), torch.randn(4, 3, 8)
    # one pre-hook on each module that makes its sum; the layer, its norms and its linears keep the hook-free path
    assert hook_counts(block) == {"out1": (1, 0), "out2": (1, 0)}
    torch.testing.assert_close(block(x), arg_written_out(block, x), rtol=0, atol=0)  # f + omega * x, as written
    got, expected = grads(block, x, lambda b, t: b(t)), grads(block, x, arg_written_out)
    assert all(g is not None for g in got)
    for g, e in zip(got, expected):  # input, linears, norms and (as_parameter) the omegas
        torch.testing.assert_close(g, e)


def test_an_observed_omega_sees_x_and_f_x_and_the_sublayer_returns_to_one_hook():
    """A hook on an omega module (the stability monitor's) sees ``omega(x, f_x)``; without it, one hook again."""
    block, x = arg_hooked(), torch.randn(4, 3, 8)
    h = block.out1.norm(block.fc1(x) + 1.7 * x)  # x of the second sublayer, written out
    seen = []
    handle = block.admin_omegas[1].register_forward_hook(lambda m, args, out: seen.append(args))
    torch.testing.assert_close(block(x), arg_written_out(block, x))
    assert len(seen) == 1
    torch.testing.assert_close(seen[0][0], h)
    torch.testing.assert_close(seen[0][1], block.fc2(h))  # f_x
    assert hook_counts(block) == {"out1": (1, 0), "out2": (1, 1), "out2.norm": (1, 0), "admin_omegas.1": (0, 1)}
    assert len(getattr(block, HANDLES)) == 4 and slots_hold_nothing(block)
    handle.remove()
    torch.testing.assert_close(block(x), arg_written_out(block, x), rtol=0, atol=0)
    assert hook_counts(block) == {"out1": (1, 0), "out2": (1, 0)} and len(getattr(block, HANDLES)) == 2


def test_an_observed_residual_arg_sublayer_that_raises_keeps_nothing_and_unhooks():
    block = arg_hooked()
    x = torch.randn(4, 3, 8, requires_grad=True) * 2  # non-leaf: it could be neither copied nor pickled
    handle = block.admin_omegas[1].register_forward_hook(lambda *_: None)
    norm_handle = block.out2.norm.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        block(x)
    norm_handle.remove()
    handle.remove()
    assert slots_hold_nothing(block)  # out2's exit hook (always called) emptied the slot
    for other in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        torch.testing.assert_close(other(x), arg_written_out(other, x), rtol=0, atol=0)
        remove_hooks(other)
        assert hook_counts(other) == {}
    remove_hooks(block)  # the observed reading's hooks were in the layer's handles too
    assert hook_counts(block) == {}


def test_a_residual_arg_module_called_without_its_residual_input_is_refused():
    block = arg_hooked()
    with pytest.raises(RuntimeError, match="Output called without its residual input"):
        block.out1(torch.randn(2, 8))


def test_profile_omegas_on_residual_arg_sublayers_follows_the_profiling_rule():
    """omega_1 = 1, omega_2 = sqrt(Var[x_1 * omega_1] + Var[f_1]) (population variances), written out."""
    from admin_torch import profile_omegas

    block, x = arg_hooked(), torch.randn(4, 3, 8)
    omegas = profile_omegas(block, lambda: block(x))
    with torch.no_grad():
        f1 = block.fc1(x)
        expected = (x.var(unbiased=False) + f1.var(unbiased=False)).sqrt().item()
    assert omegas == pytest.approx({"admin_omegas.0": 1.0, "admin_omegas.1": expected}, rel=1e-5)
    torch.testing.assert_close(block(x), arg_written_out(block, x), rtol=0, atol=0)
    assert hook_counts(block) == {"out1": (1, 0), "out2": (1, 0)}


def test_a_layer_hooked_the_earlier_way_still_runs_copies_and_unhooks():
    """Models converted before residual_arg sublayers took one hook (capture, norm and layer hooks, built here by
    capture_sums from an at_sum without scaled_input) run from a pickle and unhook as before."""
    import functools

    from admin_torch.hooks import capture_sums

    torch.manual_seed(0)
    block = ArgBlock2()
    block.admin_omegas = nn.ModuleList(OmegaResidual(w) for w in (1.7, 2.9))
    handles = capture_sums(block, ARG_BLOCK2, [functools.partial(OmegaResidual.rescale_sum, m)
                                               for m in block.admin_omegas])
    setattr(block, HANDLES, handles)
    x = torch.randn(4, 3, 8)
    for other in (block, pickle.loads(pickle.dumps(block))):
        assert hook_counts(other) == {"": (1, 1), "out1": (1, 0), "out2": (1, 0), "out1.norm": (1, 0),
                                      "out2.norm": (1, 0)}
        torch.testing.assert_close(other(x), arg_written_out(other, x))
        remove_hooks(other)
        assert hook_counts(other) == {}
