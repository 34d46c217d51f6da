"""Adversarial tests of `admin_torch.fused_sums` (a converted Post-LN layer's Admin sums made in its own forward,
rewritten from the class's syntax tree) and `OmegaResidual.add_scaled`.

The oracle is the hooks path (`admin_torch.hooks`, the mechanism the rewrite replaces: forced by making
`fused_sums.install` refuse) or a written-out formula. The proof is attacked with hand-written layers whose forward
looks like ``norm(x + f(x))`` but is not that sum: the rewrite must refuse them (the hooks then serve the layer), or
compute exactly the Admin function, never a silently different one. Tiny random HuggingFace models from configs
(nothing downloaded)."""

import contextlib
import copy
import importlib
import inspect
import pickle
import sys

import pytest
import torch
from torch import nn

from admin_torch import OmegaResidual, convert, fold, fused_sums
from admin_torch.architectures import LayerKind, Sublayer
from admin_torch.fused_sums import FusedForward, install, rewrite
from admin_torch.hooks import install_hooks, remove_hooks

transformers = pytest.importorskip("transformers")

from benchmarks import hf_families as H  # noqa: E402 (imports transformers lazily)

D = 8


# ------------------------------------------------------------------------------------------------ helpers

def _omegas(model):
    return [m for m in model.modules() if isinstance(m, OmegaResidual)]


def _fused(model):
    return [n for n, m in model.named_modules() if isinstance(vars(m).get("forward"), FusedForward)]


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@contextlib.contextmanager
def _hooks_only():
    """The hooks path: every fused install refused (what convert did before fused_sums)."""
    orig = fused_sums.install
    fused_sums.install = lambda *a, **k: None
    try:
        yield
    finally:
        fused_sums.install = orig


def _marian():
    model = transformers.MarianMTModel(transformers.MarianConfig(**H.SEQ2SEQ))
    ids, mask = H._ids()
    dec, _ = H._ids(seed=3, shape=(2, 6))
    return model.eval(), dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)


def _build(family):
    if family == "marian":
        torch.manual_seed(0)
        return _marian()
    model, x, _ = H.build(family)  # (H.build: fold_refused families too)
    return model, x


def converted(family, fused=True, as_parameter=False, dtype=None):
    """A converted tiny model whose omegas all differ (vector omegas per feature too), as after training."""
    model, x = _build(family)
    if dtype is not None:
        model = model.to(dtype)
    with (contextlib.nullcontext() if fused else _hooks_only()):
        convert(model, as_parameter=as_parameter)
    with torch.no_grad():
        for i, m in enumerate(_omegas(model)):
            m.omega.mul_(1 + 0.1 * i)
            if as_parameter:
                m.omega.add_(torch.linspace(-0.3, 0.3, m.omega.numel(), dtype=m.omega.dtype))
    return model, x


def out_of(model, x):
    return H.output(model(**x))


#: families whose layers take the fused forward (not only output modules): BART and descendants, DistilBERT
LAYER_FAMILIES = ["bart", "bart_causal", "blenderbot_small", "led", "marian", "distilbert"]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------- families: fused equals the hooks path

@pytest.mark.parametrize("family", LAYER_FAMILIES + ["bert"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("as_parameter", [False, True])
def test_family_outputs_and_gradients_equal_the_hooks_path(family, dtype, as_parameter):
    model, x = converted(family, True, as_parameter, dtype)
    ref, _ = converted(family, False, as_parameter, dtype)
    assert _fused(model) and not _hooks(model)  # the fused path is what is tested
    assert not _fused(ref) and _hooks(ref)
    model.train(), ref.train()  # dropout 0 in the configs
    y, y_ref = out_of(model, x), out_of(ref, x)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref, **tol)
    y.pow(2).mean().backward()
    y_ref.pow(2).mean().backward()
    g, g_ref = _grads(model), _grads(ref)
    assert g.keys() == g_ref.keys()
    for name in g:  # (LED in float64: NaN gradients in the stock model, the same in both paths)
        torch.testing.assert_close(g[name], g_ref[name], **tol, equal_nan=True, msg=name)
    omega_grads = [m.omega.grad for m in _omegas(model)]
    assert all(gr is not None and (gr.isnan().any() or gr.abs().sum() > 0) for gr in omega_grads) == as_parameter


OTHER_FAMILIES = sorted(set(H.families()) - set(LAYER_FAMILIES) - {"bert"}) + ["fsmt", "albert_shared"]


@pytest.mark.parametrize("family", OTHER_FAMILIES)
@pytest.mark.parametrize("as_parameter", [False, True])
def test_every_other_family_equals_the_hooks_path(family, as_parameter):
    model, x = converted(family, True, as_parameter)
    ref, _ = converted(family, False, as_parameter)
    model.train(), ref.train()
    y, y_ref = out_of(model, x), out_of(ref, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.pow(2).mean().backward()
    y_ref.pow(2).mean().backward()
    g, g_ref = _grads(model), _grads(ref)
    assert g.keys() == g_ref.keys()
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)


@pytest.mark.parametrize("family", ["bart", "distilbert"])
def test_bfloat16_on_cpu_is_as_close_to_float64_as_the_hooks_path(family):
    ref64, x = converted(family, False, dtype=torch.float64)
    fused16, _ = converted(family, True, dtype=torch.bfloat16)
    hooks16, _ = converted(family, False, dtype=torch.bfloat16)
    assert _fused(fused16)
    with torch.no_grad():
        exact = out_of(ref64, x)
        err_fused = (out_of(fused16, x).double() - exact).abs().max().item()
        err_hooks = (out_of(hooks16, x).double() - exact).abs().max().item()
    assert err_fused <= max(2 * err_hooks, 0.05)


@pytest.mark.parametrize("family", ["bart", "distilbert", "bert"])
def test_cpu_autocast_bfloat16_equals_the_hooks_path(family):
    model, x = converted(family)
    ref, _ = converted(family, fused=False)
    model.train(), ref.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = out_of(model, x), out_of(ref, x)
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    y.float().pow(2).mean().backward()
    y_ref.float().pow(2).mean().backward()
    g, g_ref = _grads(model), _grads(ref)
    assert g.keys() == g_ref.keys()


@pytest.mark.parametrize("family", ["bart", "bert"])
@pytest.mark.parametrize("how", ["set_omega_", "load_state_dict", "to_float64_and_back"])
def test_omega_changed_after_conversion_is_followed(family, how):
    model, x = converted(family)
    ref, _ = converted(family, fused=False)
    with torch.no_grad():
        before = out_of(model, x)  # the cached numbers are made now
        for i, (m, r) in enumerate(zip(_omegas(model), _omegas(ref))):
            r.set_omega_(0.5 + 0.25 * i)
        if how == "set_omega_":
            for m, r in zip(_omegas(model), _omegas(ref)):
                m.set_omega_(r.omega)
        elif how == "load_state_dict":
            model.load_state_dict(ref.state_dict())
        else:
            model.load_state_dict(ref.state_dict())
            model.double().float()
        after = out_of(model, x)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, out_of(ref, x), rtol=1e-5, atol=1e-5)


def test_bart_causal_lm_decoder_layer_given_encoder_states_is_the_written_out_admin_formula():
    """BartForCausalLM is converted as a decoder without cross-attention (two omegas); its layers still accept
    encoder states, which run the unconverted cross-attention sublayer (a plain sum). The fused forward then gives
    the feed-forward sum omega times its real residual stream, the cross-attention norm's output. (The hooks path
    differs here: it adds (omega - 1) times the self-attention norm's output, which is not that sum's x.)"""
    model, _ = converted("bart_causal")
    layer = model.model.decoder.layers[0]
    assert "forward" in vars(layer)
    g = torch.Generator().manual_seed(4)
    h, enc = torch.randn(2, 6, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    w0, w1 = (m.omega for m in layer.admin_omegas)
    with torch.no_grad():
        a, _ = layer.self_attn(h)
        s1 = layer.self_attn_layer_norm(a + w0 * h)
        c, _ = layer.encoder_attn(s1, key_value_states=enc)
        s2 = layer.encoder_attn_layer_norm(c + s1)
        expected = layer.final_layer_norm(layer.fc2(layer.activation_fn(layer.fc1(s2))) + w1 * s2)
        got = layer(h, encoder_hidden_states=enc)
    torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------- the proof: hand-written look-alike layers

class _Base(nn.Module):
    """Submodules every look-alike uses: ``fc`` (f), ``fc2`` (anything else), ``norm`` (the sum's norm), ``norm2``
    and ``side_norm`` (LayerNorms that are not the sum's)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.fc2 = nn.Linear(D, D), nn.Linear(D, D)
        self.norm, self.norm2, self.side_norm = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.flag = True


# --- sound: the rewrite may take these, and must then be the Admin function exactly

class SwappedOperands(_Base):
    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.fc(hidden_states)
        hidden_states = hidden_states + residual
        hidden_states = self.norm(hidden_states)
        return hidden_states


class OneLineSum(_Base):
    def forward(self, hidden_states):
        h = self.fc(hidden_states)
        return self.norm2(self.norm(hidden_states + h))


class CopyOnBothBranches(_Base):
    def forward(self, hidden_states):
        if self.flag:
            residual = hidden_states
        else:
            other = hidden_states
            residual = other
        h = self.fc(hidden_states)
        h = residual + h
        h = self.norm(h)
        return h


class SumInsideWith(_Base):
    def forward(self, hidden_states):
        residual = hidden_states
        with torch.enable_grad():
            h = self.fc(hidden_states)
            h = residual + h
            h = self.norm(h)
        return h


class OneLineExpression(_Base):
    def forward(self, hidden_states):
        return self.norm2(self.norm(hidden_states + self.fc(hidden_states)))


class StreamLastOfThree(_Base):
    """``(fc(x) + fc2(x)) + x``: f is the first two terms."""

    def forward(self, hidden_states):
        residual = hidden_states
        h = self.norm(self.fc(hidden_states) + self.fc2(hidden_states) * 0 + residual)
        return h


SOUND = [SwappedOperands, OneLineSum, CopyOnBothBranches, SumInsideWith, OneLineExpression, StreamLastOfThree]


def _admin(m, x, w):
    """The Admin function of every sound look-alike: ``norm(w x + fc(x))`` (and OneLineSum's norm2 after it)."""
    y = m.norm(w * x + m.fc(x))
    return m.norm2(y) if isinstance(m, (OneLineSum, OneLineExpression)) else y


@pytest.mark.parametrize("cls", SOUND, ids=lambda c: c.__name__)
def test_sound_look_alikes_are_rewritten_to_the_admin_function(cls):
    m, omega = cls(), OmegaResidual(1.7)
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    expected = _admin(m, x, 1.7)
    handle = install(m, ["norm"], [omega])
    assert handle is not None
    got = m(x)
    torch.testing.assert_close(got, expected)
    gx, = torch.autograd.grad(got.sum(), x)
    ex, = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(gx, ex)
    handle.remove()
    assert "forward" not in vars(m)


# --- not the Admin sum: the rewrite must refuse (the hooks then serve the layer)

class ResidualReassigned(_Base):
    def forward(self, hidden_states):
        residual = hidden_states
        h = self.fc(hidden_states)
        residual = self.fc2(residual)
        h = residual + h
        h = self.norm(h)
        return h


class OtherVariableOnOneBranch(_Base):
    def forward(self, hidden_states):
        if self.flag:
            residual = hidden_states
        else:
            residual = self.fc2(hidden_states)
        h = self.fc(hidden_states)
        h = residual + h
        h = self.norm(h)
        return h


class AugmentedSum(_Base):
    def forward(self, hidden_states):
        residual = hidden_states
        h = self.fc(hidden_states)
        h += residual
        h = self.norm(h)
        return h


class NormCalledTwice(_Base):
    def forward(self, hidden_states):
        residual = hidden_states
        h = self.fc(hidden_states)
        h = residual + h
        h = self.norm(h)
        return self.norm(h)


class TupleAssignedResidual(_Base):
    def forward(self, hidden_states):
        residual, h = self.fc2(hidden_states), self.fc(hidden_states)
        h = residual + h
        h = self.norm(h)
        return h


class ThreeTerms(_Base):
    def forward(self, hidden_states):
        residual = hidden_states
        h, g = self.fc(hidden_states), self.fc2(hidden_states)
        h = residual + h + g
        h = self.norm(h)
        return h


class NormWithKeyword(_Base):
    def forward(self, hidden_states):
        residual = hidden_states
        h = self.fc(hidden_states)
        h = residual + h
        h = self.norm(input=h)
        return h


class WalrusStatement(_Base):
    def forward(self, hidden_states):
        residual = hidden_states
        h = self.fc(hidden_states)
        (residual := self.fc2(hidden_states))
        h = residual + h
        h = self.norm(h)
        return h


class SumNotEnteringTheNorm(_Base):
    def forward(self, hidden_states):
        residual = hidden_states
        h = self.fc(hidden_states)
        s = residual + h
        out = self.norm(h)
        return out + s


class BothOperandsStream(_Base):
    def forward(self, hidden_states):
        residual = hidden_states
        h = hidden_states
        h = residual + h
        h = self.norm(h)
        return h


class WithAsResidual(_Base):
    """``with ... as residual`` binds residual to fc2(x): the sum is fc2(x) + fc(x), no residual stream in it."""

    def forward(self, hidden_states):
        residual = hidden_states
        with contextlib.nullcontext(self.fc2(hidden_states)) as residual:
            h = self.fc(hidden_states)
        h = residual + h
        h = self.norm(h)
        return h


class WalrusInIfTest(_Base):
    def forward(self, hidden_states):
        residual = hidden_states
        if (residual := self.fc2(hidden_states)) is not None:
            h = self.fc(hidden_states)
        h = residual + h
        h = self.norm(h)
        return h


class WalrusInWithItem(_Base):
    def forward(self, hidden_states):
        residual = hidden_states
        with contextlib.nullcontext(residual := self.fc2(hidden_states)):
            h = self.fc(hidden_states)
        h = residual + h
        h = self.norm(h)
        return h


class SandwichNorm(_Base):
    """A LayerNorm on the sublayer's output (NormFormer's / a sandwich norm): its output is f, not the stream; the
    stream operand is a copy the proof cannot follow (``clone``)."""

    def forward(self, hidden_states):
        residual = hidden_states.clone()
        h = self.fc(hidden_states)
        h = self.side_norm(h)
        h = residual + h
        h = self.norm(h)
        return h


class SelfRebound(_Base):
    """``self`` rebound: ``self.norm`` after that is another module's norm."""

    def forward(self, hidden_states):
        residual = hidden_states
        h = self.fc(hidden_states)
        self = self.other
        h = self.norm(residual + h)
        return h


class NormInComprehension(_Base):
    """The sum inside a comprehension, whose ``hidden_states`` is its own variable (fc2(h), then h), not the input;
    and the norm called twice."""

    def forward(self, hidden_states):
        h = self.fc(hidden_states)
        outs = [self.norm(hidden_states + h) for hidden_states in (self.fc2(h), h)]
        return outs[0] + outs[1]


class NormInGenerator(_Base):
    """The sum in a generator expression, run after ``residual`` is rebound."""

    def forward(self, hidden_states):
        residual = hidden_states
        h = self.fc(hidden_states)
        lazy = (self.norm(residual + h) for _ in (0,))
        residual = self.fc2(hidden_states)
        return next(lazy)


class ImportRebinds(_Base):
    """``import ... as residual`` rebinds residual (to a number here: the sum is 1.0 + fc(x))."""

    def forward(self, hidden_states):
        residual = hidden_states
        h = self.fc(hidden_states)
        from math import tau as residual
        h = residual + h
        h = self.norm(h)
        return h


REFUSED = [ImportRebinds, NormInComprehension, NormInGenerator, ResidualReassigned, OtherVariableOnOneBranch,
           AugmentedSum, NormCalledTwice, TupleAssignedResidual, ThreeTerms, NormWithKeyword, WalrusStatement,
           SumNotEnteringTheNorm, BothOperandsStream, WithAsResidual, WalrusInIfTest, WalrusInWithItem, SandwichNorm,
           SelfRebound]


@pytest.mark.parametrize("cls", REFUSED, ids=lambda c: c.__name__)
def test_look_alikes_that_are_not_the_admin_sum_are_refused(cls):
    m = cls()
    if cls is SelfRebound:
        m.other = _Base()
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = m(x)
    assert rewrite(m, ["norm"], (0,))[0] is None
    assert install(m, ["norm"], [OmegaResidual(1.7)]) is None
    assert "forward" not in vars(m)
    with torch.no_grad():
        torch.testing.assert_close(m(x), stock)


def test_sandwich_norm_layer_converted_by_a_kind_computes_what_the_hooks_compute():
    """End to end (a described layer given Admin by `install_hooks`): the fused forward must be the hooks' function
    ``norm(omega x + side_norm(fc(x)))``, not ``norm(x + omega side_norm(fc(x)))``."""
    kind = LayerKind((Sublayer("norm", ("fc",), capture="fc"),), last_norm="norm", mechanism="hooks")
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
    outs = []
    for fused in (True, False):
        m = SandwichNorm()
        m.admin_omegas = nn.ModuleList([OmegaResidual(1.7)])
        with (contextlib.nullcontext() if fused else _hooks_only()):
            install_hooks(m, kind, list(m.admin_omegas))
        with torch.no_grad():
            outs.append(m(x))
    m = SandwichNorm()  # (the same weights, no hook)
    with torch.no_grad():
        expected = m.norm(1.7 * x + m.side_norm(m.fc(x)))
    torch.testing.assert_close(outs[1], expected)
    torch.testing.assert_close(outs[0], expected)


class MidNorm(_Base):
    """Two sums; the second's residual is ``mid``'s output: the stream where ``mid`` is a LayerNorm (of the first
    sum), not where it is an Identity (then the sum is y + fc2(y), y = x + fc(x): no proof)."""

    def __init__(self, mid_norm):
        super().__init__()
        self.mid = nn.LayerNorm(D) if mid_norm else nn.Identity()

    def forward(self, hidden_states):
        residual = hidden_states
        h = self.fc(hidden_states)
        h = residual + h
        h = self.mid(h)
        residual = h
        h = self.fc2(h)
        h = residual + h
        h = self.norm(h)
        return h


def test_a_proof_about_one_instance_is_not_reused_for_another_of_the_same_class():
    """The proof reads the instance (which submodules are LayerNorms); an instance where it fails must be refused
    whatever was rewritten before for another instance of the class."""
    with_norm, without = MidNorm(True), MidNorm(False)
    assert rewrite(without, ["norm"], (0,))[0] is None  # alone: refused
    fused_sums._CACHE.pop(MidNorm, None)  # nothing cached for the class: the first proof below is a fresh one
    assert install(with_norm, ["norm"], [OmegaResidual(1.7)]) is not None
    assert rewrite(without, ["norm"], (0,))[0] is None
    assert install(without, ["norm"], [OmegaResidual(1.7)]) is None


class _PrivateGain(_Base):
    """A forward using a private (name-mangled) attribute, as classes do for their internals."""

    def __init__(self):
        super().__init__()
        self.__gain = 0.5

    def forward(self, hidden_states):
        residual = hidden_states
        h = self.fc(hidden_states) * self.__gain
        h = residual + h
        h = self.norm(h)
        return h


def test_a_forward_using_private_names_is_refused_or_right():
    m = _PrivateGain()
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = m.norm(1.7 * x + 0.5 * m.fc(x))
        handle = install(m, ["norm"], [OmegaResidual(1.7)])
        if handle is not None:
            torch.testing.assert_close(m(x), expected)


_STALE = '''
import torch
from torch import nn


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.fc2, self.norm = nn.Linear(8, 8), nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, hidden_states):
        residual = hidden_states
        h = self.fc(hidden_states)
        h = residual + h
        h = self.norm(h)
        return h
'''


def test_a_class_whose_source_file_changed_since_import_is_refused_or_right(tmp_path, monkeypatch):
    """The rewrite reads the class's source from disk: edited since the import (a notebook, a package upgraded in
    place), that text is not the code the class runs, and must not become the converted layer's forward."""
    name = "_admin_fused_stale_layer"
    (tmp_path / f"{name}.py").write_text(_STALE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    try:
        m = module.Layer()
        x = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = m.norm(1.7 * x + m.fc(x))
        (tmp_path / f"{name}.py").write_text(_STALE.replace("h = self.fc(hidden_states)",
                                                            "h = self.fc2(hidden_states) * 3"))
        with torch.no_grad():
            if install(m, ["norm"], [OmegaResidual(1.7)]) is not None:
                torch.testing.assert_close(m(x), expected)
    finally:
        sys.modules.pop(name, None)


# ----------------------------------------------------------------------------- copies, fold, remove_hooks

@pytest.mark.parametrize("family", ["bart", "bert", "distilbert"])
def test_deepcopy_pickle_and_fold_compute_the_converted_model(family):
    model, x = converted(family)
    with torch.no_grad():
        expected = out_of(model, x)
        for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert _fused(other) == _fused(model)
            for name in _fused(other):  # each copy's forward serves that copy, with its own omegas
                fused = vars(other.get_submodule(name))["forward"]
                assert fused.module is other.get_submodule(name)
                assert all(any(o is m for m in other.modules()) for o in fused.omegas)
            torch.testing.assert_close(out_of(other, x), expected)
            for m in _omegas(other):  # a copy's omegas are its own: changing them leaves the original
                m.set_omega_(3.0)
            assert not torch.allclose(out_of(other, x), expected)
            torch.testing.assert_close(out_of(model, x), expected)
        torch.testing.assert_close(out_of(fold(model), x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["bart", "distilbert"])
def test_remove_hooks_gives_the_stock_forward_back(family):
    stock, x = _build(family)
    model, _ = converted(family)
    with torch.no_grad():
        expected = out_of(stock, x)
        for layer in model.modules():
            if hasattr(layer, "admin_omegas"):
                remove_hooks(layer)
        assert not _fused(model) and not _hooks(model)
        torch.testing.assert_close(out_of(model, x), expected)


def test_save_pretrained_and_from_pretrained_give_the_fused_model_back(tmp_path):
    from admin_torch import from_pretrained, save_pretrained

    model, x = converted("bart")
    with torch.no_grad():
        expected = out_of(model, x)
    save_pretrained(model, tmp_path / "bart")
    loaded = from_pretrained(type(model), tmp_path / "bart").eval()
    assert _fused(loaded) == _fused(model) and not _hooks(loaded)
    with torch.no_grad():
        torch.testing.assert_close(out_of(loaded, x), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- gradient checkpointing

class _Calls:
    def __init__(self):
        self.n = 0

    def __call__(self, *args):
        self.n += 1


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("as_parameter", [False, True])
def test_gradient_checkpointing_on_bart_recomputes_and_gives_the_same_gradients(use_reentrant, as_parameter):
    grads, calls = [], []
    for checkpointing in (False, True):
        model, x = converted("bart", as_parameter=as_parameter)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            if use_reentrant:
                model.enable_input_require_grads()
        assert _fused(model)
        count = _Calls()
        model.model.encoder.layers[1].self_attn.register_forward_hook(count)
        loss = out_of(model, x).pow(2).mean()
        forward_calls = count.n
        loss.backward()
        calls.append((forward_calls, count.n))
        grads.append(_grads(model))
    assert calls[0] == (1, 1)
    assert calls[1] == (1, 2)  # checkpointed: the attention runs again in backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_still_happens_after_the_class_is_subclassed_as_fsdp2_does():
    """``torch.distributed.fsdp.fully_shard`` swaps each layer's class for ``FSDP<Layer>``, a subclass, which
    transformers wraps again (only the outermost wrapper checkpoints). The converted layer must still checkpoint,
    as the hooks path does."""
    calls, losses = [], []
    for fused in (True, False):
        model, x = converted("bart", fused)
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in list(model.model.encoder.layers) + list(model.model.decoder.layers):
            layer.__class__ = type(f"FSDP{type(layer).__name__}", (type(layer),), {})
        count = _Calls()
        model.model.encoder.layers[1].self_attn.register_forward_hook(count)
        loss = out_of(model, x).pow(2).mean()
        loss.backward()
        calls.append(count.n)
        losses.append(loss.detach())
    assert calls == [2, 2]
    torch.testing.assert_close(losses[0], losses[1])


# ------------------------------------------------------------------------------------------------ compile

def test_compile_bart_and_a_fullgraph_layer_match_eager():
    model, x = converted("bart", as_parameter=True)
    layer = model.model.encoder.layers[0]
    h = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, expected_layer = out_of(model, x), layer(h, None)
        torch._dynamo.reset()
        try:
            torch.testing.assert_close(out_of(torch.compile(model, backend="eager"), x), expected)
            torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(h, None),
                                       expected_layer)
        finally:
            torch._dynamo.reset()


@pytest.mark.parametrize("path", ["model.encoder.layers.0", "model.decoder.layers.1"])
def test_torch_export_of_a_converted_layer_equals_the_layer(path):
    """``torch.export`` of a converted layer as the root module (it reads ``module.forward.__code__``)."""
    model, _ = converted("bart")
    layer = model.get_submodule(path)
    assert "forward" in vars(layer)
    h = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(10))
    program = torch.export.export(layer, (h, None))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(h, None), layer(h, None))


# ------------------------------------------------------------------------------------------------ monitor

@pytest.mark.parametrize("checkpointing", [False, True])
def test_stability_monitor_on_bart_reads_what_it_reads_on_the_hooks_path(checkpointing):
    from stability_toolbox import StabilityMonitor

    readings, outputs = [], []
    for fused in (True, False):
        model, x = converted("bart", fused)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        mon = StabilityMonitor(model, every=1, rules={}, signal_rules=[])
        mon.begin_step()
        y = out_of(model, x)
        loss = y.pow(2).mean()
        loss.backward()
        mon.end_step(loss)
        q = mon.history[-1]["quantities"]
        readings.append(q)
        outputs.append(y.detach())
        mon.close()
        with torch.no_grad():
            torch.testing.assert_close(out_of(model, x), y)  # detached: the same function
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    assert readings[0]["beta"] and readings[0]["beta"].keys() == readings[1]["beta"].keys()
    assert len(readings[0]["beta"]) == 10  # 2 encoder layers x 2 sums + 2 decoder layers x 3
    for key in readings[0]["beta"]:
        assert readings[0]["beta"][key] == pytest.approx(readings[1]["beta"][key], rel=1e-4), key


@pytest.mark.parametrize("family", ["bart", "bert", "distilbert"])
def test_profile_omegas_equals_the_hooks_path(family):
    from admin_torch import profile_omegas

    found = []
    for fused in (True, False):
        model, x = converted(family, fused)
        omegas = profile_omegas(model, lambda: model(**x), chains=None)
        with torch.no_grad():
            found.append((omegas, out_of(model, x)))
    assert found[0][0].keys() == found[1][0].keys() and found[0][0]
    for name in found[0][0]:
        assert found[0][0][name] == pytest.approx(found[1][0][name], rel=1e-5), name
    torch.testing.assert_close(found[0][1], found[1][1], rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------- bad input, signature

@pytest.mark.parametrize("path", ["model.encoder.layers.0", "model.decoder.layers.1"])
def test_a_converted_layer_fails_on_bad_input_as_the_stock_layer_does(path):
    stock, _ = _build("bart")
    model, _ = converted("bart")
    a, b = stock.get_submodule(path), model.get_submodule(path)
    assert "forward" in vars(b)
    assert inspect.signature(b.forward) == inspect.signature(a.forward)
    for bad in (torch.randn(2, 5, 7), torch.randn(2, 5), torch.randn(2, 5, 16, dtype=torch.float64), "text"):
        with pytest.raises(Exception) as stock_error:
            a(bad, None)
        with pytest.raises(type(stock_error.value)):
            b(bad, None)
    with pytest.raises(TypeError):
        b()
    with pytest.raises(TypeError, match="hidden_states"):
        b(None, None)


def test_output_module_without_its_residual_input_raises_type_error():
    model, _ = converted("bert")
    out = model.encoder.layer[0].output
    assert isinstance(vars(out).get("forward"), FusedForward)
    f = torch.randn(2, 5, 32)
    for call in (lambda: out(f), lambda: out(f, None), lambda: out(hidden_states=f), lambda: out(f, input_tensor=None)):
        with pytest.raises(TypeError, match="input_tensor"):
            call()


# ------------------------------------------------------------------------------------------------ add_scaled

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_add_scaled_is_the_module_function(dtype):
    g = torch.Generator().manual_seed(6)
    x, f = torch.randn(3, 4, D, generator=g).to(dtype), torch.randn(3, 4, D, generator=g).to(dtype)
    for om in (OmegaResidual(1.7), OmegaResidual(1.7, as_parameter=True, embed_dim=D)):
        om = om.to(dtype) if dtype == torch.float64 else om
        exact = x.double() * om.omega.double() + f.double()
        got = om.add_scaled(f, x)
        assert got.dtype == dtype
        if dtype == torch.bfloat16:  # one rounding (the module's: three); as close to the exact sum
            assert (got.double() - exact).abs().max() <= (om(x, f).double() - exact).abs().max()
        else:
            torch.testing.assert_close(got, om(x, f))
        # broadcasting: as the module
        torch.testing.assert_close(om.add_scaled(f, x[:1]), om(x[:1], f))
    with pytest.raises(ValueError, match="embed_dim"):
        OmegaResidual(1.7, as_parameter=True, embed_dim=D).add_scaled(torch.randn(3, 5), torch.randn(3, 5))


class _AddScaled(nn.Module):
    def __init__(self, res):
        super().__init__()
        self.res = res

    def forward(self, f, x):
        return self.res.add_scaled(f, x)


def test_add_scaled_gives_a_buffer_omega_that_requires_grad_its_gradient():
    """A 1-element omega made trainable (``omega.requires_grad_()``, or a tensor handed in by
    ``torch.func.functional_call``): the module's function, gradient included, as ``self(x, f_x)`` gives it."""
    g = torch.Generator().manual_seed(7)
    x, f = torch.randn(3, D, generator=g), torch.randn(3, D, generator=g)
    om = OmegaResidual(1.7)
    om.omega.requires_grad_(True)
    expected, = torch.autograd.grad(om(x, f).pow(2).sum(), om.omega)
    y = om.add_scaled(f, x)
    assert y.requires_grad
    got, = torch.autograd.grad(y.pow(2).sum(), om.omega)
    torch.testing.assert_close(got, expected)
    omega = torch.tensor([1.7], requires_grad=True)
    y = torch.func.functional_call(_AddScaled(OmegaResidual(1.0)), {"res.omega": omega}, (f, x))
    torch.testing.assert_close(y, 1.7 * x + f)
    assert y.requires_grad
    got, = torch.autograd.grad(y.sum(), omega)
    torch.testing.assert_close(got, x.sum().reshape(1))


# ------------------------------------------------------------------------------ HuggingFace's other call paths

@pytest.mark.parametrize("as_parameter", [False, True])
def test_functional_call_with_other_omegas_and_weights_equals_the_hooks_path(as_parameter):
    model, x = converted("bart", as_parameter=as_parameter)
    ref, _ = converted("bart", False, as_parameter)
    with torch.no_grad():
        out_of(model, x)  # the cached numbers of the model's own omegas are made
    results = []
    for m in (model, ref):
        state = {n: t.detach().clone() for n, t in list(m.named_parameters()) + list(m.named_buffers())}
        for n in state:
            if n.endswith(".omega"):
                state[n] = state[n] * 0 + 3.0
            elif n.endswith("fc1.weight"):
                state[n] = state[n] * 2
        state = {n: t.requires_grad_() if t.is_floating_point() else t for n, t in state.items()}
        y = H.output(torch.func.functional_call(m, state, (), dict(x)))
        grads = torch.autograd.grad(y.pow(2).mean(), [t for n, t in state.items() if t.requires_grad],
                                    allow_unused=True)
        results.append((y.detach(), dict(zip([n for n, t in state.items() if t.requires_grad], grads))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(results[0][0], out_of(model, x))
    for n, g in results[0][1].items():
        g_ref = results[1][1][n]
        assert (g is None) == (g_ref is None) or n.endswith(".omega"), n
        if g is not None and g_ref is not None:
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6, msg=n)

@pytest.mark.parametrize("family", ["bart", "marian", "blenderbot_small"])
def test_generate_with_the_cache_equals_the_hooks_path(family):
    model, x = converted(family)
    ref, _ = converted(family, fused=False)
    kw = dict(input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=6, do_sample=False,
              num_beams=1, use_cache=True)
    with torch.no_grad():
        got, expected = model.generate(**kw), ref.generate(**kw)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["bart", "distilbert"])
def test_attentions_hidden_states_and_inference_mode_equal_the_hooks_path(family):
    model, x = converted(family)
    ref, _ = converted(family, fused=False)
    for m in (model, ref):
        m.set_attn_implementation("eager")  # (sdpa returns no attention weights)
    with torch.no_grad():
        got = model(**x, output_attentions=True, output_hidden_states=True)
        expected = ref(**x, output_attentions=True, output_hidden_states=True)
    for key in expected:
        if key.endswith("attentions") or key.endswith("hidden_states"):
            assert len(got[key]) == len(expected[key]) > 0, key
            for a, b in zip(got[key], expected[key]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
    with torch.inference_mode():
        torch.testing.assert_close(out_of(model, x), out_of(ref, x), rtol=1e-5, atol=1e-6)
    model.train()  # after inference mode: trains (the cached numbers are not inference tensors)
    out_of(model, x).pow(2).mean().backward()


def test_a_layer_called_with_keywords_equals_positional():
    model, _ = converted("bart")
    layer = model.model.decoder.layers[0]
    g = torch.Generator().manual_seed(8)
    h, enc = torch.randn(2, 6, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        expected = layer(h, None, enc)
        torch.testing.assert_close(layer(hidden_states=h, encoder_hidden_states=enc), expected)
        torch.testing.assert_close(layer(h, encoder_hidden_states=enc, attention_mask=None), expected)


def test_add_scaled_on_nested_tensors_is_the_module_function():
    om = OmegaResidual(2.0)
    x = torch.nested.nested_tensor([torch.ones(2, 4), torch.ones(3, 4)])
    f = torch.nested.nested_tensor([torch.full((2, 4), 0.5), torch.full((3, 4), 0.5)])
    for got, expected in zip(om.add_scaled(f, x).unbind(), om(x, f).unbind()):
        torch.testing.assert_close(got, expected)


def test_output_module_with_a_residual_of_another_shape_raises_what_the_stock_module_raises():
    stock, _ = _build("bert")
    model, _ = converted("bert")
    a, b = stock.encoder.layer[0].output, model.encoder.layer[0].output
    g = torch.Generator().manual_seed(9)
    f = torch.randn(2, 5, 32, generator=g)
    for x in (torch.randn(2, 4, 16, generator=g), torch.randn(3, 5, 16, generator=g)):
        with pytest.raises(Exception) as stock_error:
            a(f, x)
        with pytest.raises(type(stock_error.value)):
            b(f, x)
    x = torch.randn(1, 5, 16, generator=g)  # broadcasts: as the stock module
    with torch.no_grad():
        torch.testing.assert_close(b(f, x), b(f, x.expand(2, 5, 16)))
