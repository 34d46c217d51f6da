"""admin_torch.hooks: the hooks mechanism on small Post-LN layers written here (no transformers needed); the
HuggingFace layers it serves are covered in test_huggingface.py (gradient checkpointing, compile) and
test_convert.py (failed forwards, copies and pickles of converted models)."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from admin_torch import OmegaResidual
from admin_torch.architectures import LayerKind, Sublayer
from admin_torch.hooks import HANDLES, check_removable, install_hooks, remove_hooks


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
