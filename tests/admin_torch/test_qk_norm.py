"""qk-layernorm against a written-out formula: QKNorm, QKNormMultiheadAttention (masks, fast paths),
add_qk_norm on torch.nn layers and the reference stacks, convert(qk_norm=True), fold, the monitor; and
torch.nn.MultiheadAttention's call contract: with identity norms, torch's numbers for every accepted mask,
layout and path; what torch refuses refused by name; fully masked queries; finite differences; compile."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import admin_torch
from admin_torch import QKNorm, QKNormMultiheadAttention, add_qk_norm, convert, fold, make_stack
from admin_torch.folding import fold_reference_stack


def _ln(x, g, b, eps=1e-5):
    """LayerNorm over the last dimension, written out in float64."""
    x = x.double()
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * g.double() + b.double()


def _randomize_norms(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, QKNorm):
            with torch.no_grad():
                m.norm.weight.copy_(torch.rand(m.norm.weight.shape, generator=gen) + 0.5)
                m.norm.bias.copy_(torch.randn(m.norm.bias.shape, generator=gen) * 0.3)


def _formula(mha, query, key, value, mask=None):
    """softmax(LN(q_h) LN(k_h)^T / sqrt(d_h) + mask) v_h, out_proj; batch-first (b, t, e), float64."""
    e, h = mha.embed_dim, mha.num_heads
    dh = e // h
    wq, wk, wv = mha.in_proj_weight.double().chunk(3)
    bq, bk, bv = mha.in_proj_bias.double().chunk(3)
    q = query.double() @ wq.T + bq
    k = key.double() @ wk.T + bk
    v = value.double() @ wv.T + bv
    b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    qh = _ln(q.view(b, tq, h, dh), mha.q_norm.norm.weight, mha.q_norm.norm.bias).transpose(1, 2)
    kh = _ln(k.view(b, tk, h, dh), mha.k_norm.norm.weight, mha.k_norm.norm.bias).transpose(1, 2)
    vh = v.view(b, tk, h, dh).transpose(1, 2)
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(dh)
    if mask is not None:
        logits = logits + mask.double()
    y = (logits.softmax(-1) @ vh).transpose(1, 2).reshape(b, tq, e)
    return y @ mha.out_proj.weight.double().T + mha.out_proj.bias.double()


def test_qknorm_is_a_layernorm_per_head():
    torch.manual_seed(0)
    norm = QKNorm(12, 3)
    _randomize_norms(norm)
    x = torch.randn(2, 5, 12) * 4 + 1
    want = _ln(x.view(2, 5, 3, 4), norm.norm.weight, norm.norm.bias).view(2, 5, 12)
    torch.testing.assert_close(norm(x).double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_matches_the_formula_with_masks(batch_first):
    torch.manual_seed(1)
    mha = QKNormMultiheadAttention(16, 4, batch_first=batch_first)
    _randomize_norms(mha)
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    attn_mask = torch.randn(3, 5)
    kpm = torch.tensor([[False] * 5, [False, False, False, True, True]])
    full = attn_mask.view(1, 1, 3, 5) + torch.where(kpm, float("-inf"), 0.0).view(2, 1, 1, 5)
    args = (q, kv, kv) if batch_first else (q.transpose(0, 1), kv.transpose(0, 1), kv.transpose(0, 1))
    for need_weights in (True, False):
        out, w = mha(*args, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights)
        out = out if batch_first else out.transpose(0, 1)
        torch.testing.assert_close(out.double(), _formula(mha, q, kv, kv, full), atol=1e-5, rtol=1e-5)
        assert (w is not None) == need_weights


# ---------------------------------------------------------------- the call contract of torch's MultiheadAttention

E, H, N, L, S = 8, 2, 2, 3, 5  # L != S and N != S: a transposed mask has no accepted shape


@pytest.fixture
def stock_and_mine():
    """A stock ``nn.MultiheadAttention`` per layout and a qk-norm copy whose norms are identities: where the
    module claims torch's plumbing (masks, layouts, paths, dropout), the two must agree."""
    def make(batch_first, dropout=0.0):
        torch.manual_seed(10)
        stock = nn.MultiheadAttention(E, H, dropout=dropout, batch_first=batch_first)
        mine = QKNormMultiheadAttention(E, H, dropout=dropout, batch_first=batch_first)
        mine.load_state_dict(stock.state_dict(), strict=False)
        mine.q_norm, mine.k_norm = nn.Identity(), nn.Identity()
        return stock, mine
    return make


def _strided(*shape, gen):
    """A non-contiguous tensor of ``shape`` (every other element of a wider one)."""
    return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)[..., ::2]


def _masks(case, gen, tq=L, tk=S, n=N):
    """(attn_mask, key_padding_mask, is_causal) of a named case; no query loses every key (torch's
    need_weights path is NaN there, a case tested on its own below)."""
    keep = torch.zeros(tq, tk, dtype=torch.bool)
    keep[:, 0] = True  # key 0 always visible
    bool2 = (torch.rand(tq, tk, generator=gen) > 0.6) & ~keep
    bool3 = (torch.rand(n * H, tq, tk, generator=gen) > 0.6) & ~keep
    kpm = torch.zeros(n, tk, dtype=torch.bool)
    kpm[-1, -2:] = True
    return {
        "none": (None, None, False),
        "2d-float": (torch.randn(tk, tq, generator=gen).T, None, False),  # a transposed view: any strides
        "2d-bool": (bool2, None, False),
        "3d-float": (torch.randn(n * H, tq, tk, generator=gen), None, False),
        "3d-bool": (bool3, None, False),
        "kpm-bool": (None, kpm, False),
        "kpm-float": (None, torch.where(kpm, -1e4, 0.0), False),
        "2d-bool+kpm": (bool2, kpm, False),
        "3d-float+kpm-float": (torch.randn(n * H, tq, tk, generator=gen), torch.where(kpm, -1e4, 0.0), False),
        "causal-hint": (torch.ones(tq, tk, dtype=torch.bool).triu(1), None, True),
        "causal-hint+kpm": (torch.ones(tq, tk, dtype=torch.bool).triu(1), kpm, True),
    }[case]


MASK_CASES = ["none", "2d-float", "2d-bool", "3d-float", "3d-bool", "kpm-bool", "kpm-float", "2d-bool+kpm",
              "3d-float+kpm-float", "causal-hint", "causal-hint+kpm"]


@pytest.mark.filterwarnings("ignore:Support for mismatched")
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights, average", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("case", MASK_CASES)
def test_identity_norms_agree_with_torch_on_every_accepted_mask(stock_and_mine, batch_first, need_weights,
                                                                 average, case):
    stock, mine = stock_and_mine(batch_first)
    gen = torch.Generator().manual_seed(MASK_CASES.index(case))
    tq = tk = S if case.startswith("causal") else None
    tq, tk = tq or L, tk or S
    shape = (lambda t: (N, t, E)) if batch_first else (lambda t: (t, N, E))
    q, kv = _strided(*shape(tq), gen=gen), _strided(*shape(tk), gen=gen)
    attn_mask, kpm, causal = _masks(case, gen, tq, tk)
    kw = dict(attn_mask=attn_mask, key_padding_mask=kpm, is_causal=causal, need_weights=need_weights,
              average_attn_weights=average)
    want, want_w = stock(q, kv, kv, **kw)
    got, got_w = mine(q, kv, kv, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-5)
    else:
        assert got_w is None and want_w is None


@pytest.mark.filterwarnings("ignore:Support for mismatched")
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["2d", "3d+kpm"])
def test_unbatched_calls_agree_with_torch(stock_and_mine, need_weights, masks):
    stock, mine = stock_and_mine(False)
    gen = torch.Generator().manual_seed(11)
    q, kv = torch.randn(L, E, generator=gen), torch.randn(S, E, generator=gen)
    kw = dict(attn_mask=torch.randn(L, S, generator=gen)) if masks == "2d" else \
        dict(attn_mask=torch.randn(H, L, S, generator=gen), key_padding_mask=torch.tensor([False, True] * 2 + [False]))
    want, want_w = stock(q, kv, kv, need_weights=need_weights, **kw)
    got, got_w = mine(q, kv, kv, need_weights=need_weights, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("need_weights", [True, False])
def test_training_dropout_draws_what_torch_draws(stock_and_mine, need_weights):
    """Same seed, same dropped weights and output (the weights returned are the dropped ones, as torch's)."""
    stock, mine = stock_and_mine(True, dropout=0.5)
    gen = torch.Generator().manual_seed(12)
    q, kv = torch.randn(N, L, E, generator=gen), torch.randn(N, S, E, generator=gen)
    kpm = torch.tensor([[False] * S, [False] * 3 + [True] * 2])
    torch.manual_seed(0)
    want, want_w = stock.train()(q, kv, kv, key_padding_mask=kpm, need_weights=need_weights)
    torch.manual_seed(0)
    got, got_w = mine.train()(q, kv, kv, key_padding_mask=kpm, need_weights=need_weights)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-5)


def _bad_calls():
    """(name, call kwargs, what must be named): each refused by torch too (with a bare RuntimeError or
    AssertionError), and by this module as ValueError/TypeError naming the argument and what it accepts."""
    q, kv = torch.randn(N, L, E), torch.randn(N, S, E)
    return [
        ("transposed 2-D attn_mask", dict(attn_mask=torch.zeros(S, L)), (ValueError, "attn_mask", "(L, S) = (3, 5)")),
        ("transposed key_padding_mask", dict(key_padding_mask=torch.zeros(S, N, dtype=torch.bool)),
         (ValueError, "key_padding_mask", "(N, S) = (2, 5)")),
        ("3-D attn_mask of one batch", dict(attn_mask=torch.zeros(H, L, S)),
         (ValueError, "attn_mask", "(N * num_heads, L, S) = (4, 3, 5)")),
        ("3-D attn_mask transposed", dict(attn_mask=torch.zeros(N * H, S, L)), (ValueError, "attn_mask", "(4, 3, 5)")),
        ("4-D attn_mask", dict(attn_mask=torch.zeros(N, H, L, S)), (ValueError, "attn_mask", "(L, S)")),
        ("1-D key_padding_mask", dict(key_padding_mask=torch.zeros(S, dtype=torch.bool)),
         (ValueError, "key_padding_mask", "(N, S)")),
        ("integer attn_mask", dict(attn_mask=torch.zeros(L, S, dtype=torch.long)), (TypeError, "attn_mask", "bool")),
        ("integer key_padding_mask", dict(key_padding_mask=torch.zeros(N, S, dtype=torch.long)),
         (TypeError, "key_padding_mask", "bool")),
        ("4-D query", dict(query=q[None]), (ValueError, "query", "3-D (N, L, E)")),
        ("2-D key with 3-D query", dict(key=kv[0], value=kv[0]), (ValueError, "key and value", "3-D")),
        ("key and value differ", dict(value=kv[:, :-1]), (ValueError, "key and value", "same shape")),
        ("wrong embedding", dict(query=torch.randn(N, L, E + 1)), (ValueError, "query", f"embed_dim={E}")),
        ("batch sizes differ", dict(key=kv[:1], value=kv[:1]), (ValueError, "key", "batch size N=2")),
        ("half query in a float module", dict(query=q.half()), (TypeError, "query", "torch.float32")),
        ("a list for a query", dict(query=q.tolist()), (TypeError, "query", "tensor")),
    ], q, kv


@pytest.mark.parametrize("index", range(15), ids=[c[0] for c in _bad_calls()[0]])
def test_what_torch_refuses_is_refused_by_name_and_changes_nothing(stock_and_mine, index):
    cases, q, kv = _bad_calls()
    _, kw, (error, name, accepted) = cases[index]
    stock, mine = stock_and_mine(True)
    call = {**dict(query=q, key=kv, value=kv), **kw}
    with pytest.raises(Exception):  # torch refuses it too (in its own words)
        stock(**call)
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    with pytest.raises(error) as err:
        mine(**call)
    assert name in str(err.value) and accepted in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in mine.state_dict().items())
    assert all(p.grad is None for p in mine.parameters())


@pytest.mark.parametrize("norm_first", [False, True])
def test_torch_layers_pass_their_masks_through_unchanged(norm_first):
    """An encoder-decoder layer pair given every mask torch's layers take: with identity norms, torch's numbers
    (grad mode on, so torch takes its plain path too)."""
    torch.manual_seed(18)
    kw = dict(d_model=E, nhead=H, dim_feedforward=16, dropout=0.0, batch_first=True, norm_first=norm_first)
    enc, dec = nn.TransformerEncoderLayer(**kw), nn.TransformerDecoderLayer(**kw)
    stock = nn.ModuleList([enc, dec])
    mine = add_qk_norm(__import__("copy").deepcopy(stock))
    for m in mine.modules():
        if isinstance(m, QKNormMultiheadAttention):
            m.q_norm, m.k_norm = nn.Identity(), nn.Identity()
    src, tgt = torch.randn(N, S, E), torch.randn(N, L, E)
    src_kpm = torch.tensor([[False] * S, [False] * 3 + [True] * 2])
    tgt_mask = torch.ones(L, L, dtype=torch.bool).triu(1)
    tgt_kpm = torch.tensor([[False] * L, [False, False, True]])

    def run(layers):
        memory = layers[0](src, src_key_padding_mask=src_kpm)
        return layers[1](tgt, memory, tgt_mask=tgt_mask, tgt_key_padding_mask=tgt_kpm, memory_key_padding_mask=src_kpm,
                         tgt_is_causal=True)
    torch.testing.assert_close(run(mine), run(stock), atol=1e-5, rtol=1e-5)


def test_is_causal_without_a_mask_is_the_causal_mask():
    """torch raises for ``is_causal=True`` without ``attn_mask``; this module applies the causal mask itself
    (query i sees keys j <= i), on both paths, with or without a padding mask."""
    torch.manual_seed(13)
    mha = QKNormMultiheadAttention(E, H, batch_first=True)
    _randomize_norms(mha)
    x = torch.randn(N, S, E)
    kpm = torch.tensor([[False] * S, [False] * 4 + [True]])
    causal = torch.full((S, S), float("-inf")).triu(1)
    for pad in (None, kpm):
        full = causal.view(1, 1, S, S) + (0 if pad is None else torch.where(pad, float("-inf"), 0.0).view(N, 1, 1, S))
        for need_weights in (True, False):
            out, _ = mha(x, x, x, is_causal=True, key_padding_mask=pad, need_weights=need_weights)
            torch.testing.assert_close(out.double(), _formula(mha, x, x, x, full), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("need_weights", [True, False])
def test_a_query_with_every_key_masked_attends_nothing(need_weights):
    """Zero weights and output ``out_proj(0)`` (scaled_dot_product_attention's convention), finite gradients;
    the other queries are untouched."""
    torch.manual_seed(14)
    mha = QKNormMultiheadAttention(E, H, batch_first=True)
    _randomize_norms(mha)
    q, kv = torch.randn(N, L, E, requires_grad=True), torch.randn(N, S, E)
    attn_mask = torch.zeros(L, S, dtype=torch.bool)
    attn_mask[1] = True  # query 1 may see no key
    kpm = torch.tensor([[False] * S, [True] * S])  # batch 1 has no key at all
    out, w = mha(q, kv, kv, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=need_weights)
    dead = torch.tensor([[False, True, False], [True, True, True]])
    torch.testing.assert_close(out[dead], mha.out_proj.bias.expand(int(dead.sum()), E))
    if need_weights:
        assert torch.equal(w[dead], torch.zeros(int(dead.sum()), S))
    mask = torch.where(attn_mask, float("-inf"), 0.0)
    want = _formula(mha, q[:1].detach(), kv[:1], kv[:1], mask)
    torch.testing.assert_close(out[0, [0, 2]].double(), want[0, [0, 2]], atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad[dead].abs().max() == 0


@pytest.mark.parametrize("need_weights", [True, False])
def test_gradients_match_finite_differences(need_weights):
    torch.manual_seed(15)
    mha = QKNormMultiheadAttention(4, 2, batch_first=True, dtype=torch.float64)
    _randomize_norms(mha)
    q = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    attn_mask = torch.randn(2, 3, dtype=torch.float64)
    kpm = torch.tensor([[False, False, True], [False, False, False]])
    assert torch.autograd.gradcheck(
        lambda q, kv: mha(q, kv, kv, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=need_weights)[0],
        (q, kv))


def test_low_precision_and_autocast():
    """bf16 module and inputs: the formula to bf16 accuracy; float module under CPU autocast: any input dtype,
    as torch's module under the same autocast."""
    torch.manual_seed(16)
    mha = QKNormMultiheadAttention(16, 4, batch_first=True)
    _randomize_norms(mha)
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 4, 16)
    kpm = torch.tensor([[False] * 4, [False, False, True, True]])
    full = torch.where(kpm, float("-inf"), 0.0).view(2, 1, 1, 4)
    low = QKNormMultiheadAttention(16, 4, batch_first=True, dtype=torch.bfloat16)
    low.load_state_dict(mha.state_dict())
    for need_weights in (True, False):
        out, _ = low(q.bfloat16(), kv.bfloat16(), kv.bfloat16(), key_padding_mask=kpm, need_weights=need_weights)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), _formula(mha, q, kv, kv, full), atol=5e-2, rtol=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = mha(q.bfloat16(), kv, kv, key_padding_mask=kpm)
    torch.testing.assert_close(out.double(), _formula(mha, q, kv, kv, full), atol=5e-2, rtol=5e-2)


def test_compiles_without_graph_breaks():
    """The training path (need_weights=False, as torch's layers call it) with both masks, fullgraph: the checks
    read shapes only."""
    torch.manual_seed(17)
    mha = QKNormMultiheadAttention(E, H, batch_first=True)
    _randomize_norms(mha)
    q, kv = torch.randn(N, L, E), torch.randn(N, S, E)
    kw = dict(attn_mask=torch.randn(L, S), key_padding_mask=torch.tensor([[False] * S, [False] * 3 + [True] * 2]),
              need_weights=False)
    compiled = torch.compile(mha, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, kv, kv, **kw)[0], mha(q, kv, kv, **kw)[0])


def test_add_qk_norm_on_a_pre_ln_torch_layer_keeps_weights_and_blocks_the_fast_path():
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=True)
    stock = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=True)
    stock.load_state_dict(layer.state_dict())
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert add_qk_norm(layer) is layer
    for k, v in before.items():
        assert torch.equal(layer.state_dict()[k], v)
    _randomize_norms(layer)
    x = torch.randn(2, 5, 16)
    layer.eval()
    with torch.no_grad():  # torch's fused inference path would skip the norms
        fast = layer(x)
    with torch.enable_grad():
        slow = layer(x)
    torch.testing.assert_close(fast, slow.detach(), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        want = x.double() + _formula(layer.self_attn, *(stock.norm1(x),) * 3)
        want = want + stock._ff_block(stock.norm2(want.float())).double()
    torch.testing.assert_close(fast.double(), want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(fast, stock.eval()(x), atol=1e-3)  # the norms do something


def test_convert_with_qk_norm_and_fold_keeps_the_norms_where_they_are():
    torch.manual_seed(4)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0), 3, enable_nested_tensor=False)
    model = nn.Sequential(nn.Embedding(50, 16), enc)
    convert(model, qk_norm=True)
    assert all(isinstance(layer.self_attn, QKNormMultiheadAttention) for layer in enc.layers)
    assert isinstance(enc.layers[0], admin_torch.TransformerEncoderLayer)
    _randomize_norms(model)
    tokens = torch.randint(0, 50, (7, 2))
    folded = fold(model, embedding=model[0])
    assert type(folded[1].layers[0]) is nn.TransformerEncoderLayer
    norms = {n: m for n, m in model.named_modules() if isinstance(m, QKNorm)}
    kept = {n: m for n, m in folded.named_modules() if isinstance(m, QKNorm)}
    assert sorted(kept) == sorted(norms) and len(norms) == 6
    for n, a in norms.items():  # qk-norm parameters: neither folded nor dropped
        assert torch.equal(a.norm.weight, kept[n].norm.weight) and torch.equal(a.norm.bias, kept[n].norm.bias)
    torch.testing.assert_close(folded.eval()(tokens), model.eval()(tokens), atol=1e-5, rtol=1e-5)


def test_reference_stack_qk_norm_formula_seed_and_fold():
    plain = make_stack("admin", 3, 16, heads=4, seed=5)
    qk = make_stack("admin", 3, 16, heads=4, seed=5, qk_norm=True)
    for (n, p) in plain.named_parameters():  # same init: the norms draw no random numbers
        assert torch.equal(p, qk.get_parameter(n))
    _randomize_norms(qk)
    att = qk.sublayers[0]
    x = torch.randn(2, 6, 16)
    h = qk.input_norm(x)
    q, k, v = att.q_proj(h), att.k_proj(h), att.v_proj(h)
    qh = _ln(q.view(2, 6, 4, 4), att.q_norm.norm.weight, att.q_norm.norm.bias).transpose(1, 2)
    kh = _ln(k.view(2, 6, 4, 4), att.k_norm.norm.weight, att.k_norm.norm.bias).transpose(1, 2)
    y = ((qh @ kh.transpose(-1, -2) / 2.0).softmax(-1) @ v.double().view(2, 6, 4, 4).transpose(1, 2))
    want = y.transpose(1, 2).reshape(2, 6, 16) @ att.out_proj.weight.double().T + att.out_proj.bias.double()
    torch.testing.assert_close(att(h).double(), want, atol=1e-5, rtol=1e-5)
    folded = fold_reference_stack(qk)
    torch.testing.assert_close(folded(x), qk(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(folded.sublayers[0].q_norm.norm.weight, att.q_norm.norm.weight)


def test_causal_reference_stack_does_not_look_ahead():
    model = make_stack("pre_ln", 2, 16, heads=4, seed=6, causal=True, qk_norm=True)
    x = torch.randn(1, 6, 16)
    y = model(x)
    x2 = x.clone()
    x2[:, 4:] += torch.randn(1, 2, 16)
    torch.testing.assert_close(model(x2)[:, :4], y[:, :4])
    assert not torch.allclose(model(x2)[:, 4:], y[:, 4:])


def test_add_qk_norm_takes_an_attention_class_that_says_it_supports_it():
    """The reference stacks' SelfAttention is found by ``supports_qk_norm = True`` on its class, as any class
    that applies ``q_norm`` / ``k_norm`` once they are set can say (qk_norm imports no reference stack)."""
    from admin_torch.reference_stack import SelfAttention

    class Attention(SelfAttention):  # a subclass says so too
        pass

    class Unknown(nn.Module):  # q_proj and heads, but no word on q_norm / k_norm: left alone
        def __init__(self):
            super().__init__()
            self.q_proj, self.heads = nn.Linear(8, 8), 2

    model = nn.Sequential(SelfAttention(8, 2), Attention(8, 4), Unknown())
    add_qk_norm(model)
    assert [getattr(m, "q_norm", None) is not None for m in model] == [True, True, False]
    assert (model[0].q_norm.heads, model[1].k_norm.heads) == (2, 4)
    with pytest.raises(ValueError, match="no attention module"):
        add_qk_norm(Unknown())


def test_bad_input_is_named_and_changes_nothing():
    with pytest.raises(TypeError, match="model"):
        add_qk_norm("not a model")
    with pytest.raises(ValueError, match="no attention module"):
        add_qk_norm(nn.Linear(4, 4))
    bad = nn.Sequential(nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_bias_kv"):
        add_qk_norm(bad)
    assert type(bad[0]) is nn.MultiheadAttention and not hasattr(bad[0], "q_norm")  # nothing changed
    with pytest.raises(ValueError, match="heads must divide dim"):
        QKNorm(10, 3)
    with pytest.raises(ValueError, match="eps"):
        add_qk_norm(nn.MultiheadAttention(8, 2), eps=0.0)
    with pytest.raises(TypeError, match="qk_norm"):
        make_stack("pre_ln", 2, 8, heads=2, qk_norm="yes")
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 2, enable_nested_tensor=False)
    with pytest.raises(TypeError, match="qk_norm"):
        convert(enc, qk_norm="yes")
    assert type(enc.layers[0]) is nn.TransformerEncoderLayer
    add_qk_norm(enc)
    with pytest.raises(ValueError, match="no attention module without qk-layernorm"):
        add_qk_norm(enc)  # already there


def test_monitor_reads_the_normalised_attention_logits():
    from stability_toolbox import StabilityMonitor

    torch.manual_seed(7)
    for model in (make_stack("pre_ln", 1, 16, heads=4, seed=7, qk_norm=True),
                  add_qk_norm(nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 1,
                                                    enable_nested_tensor=False))):
        _randomize_norms(model)
        att = [m for m in model.modules() if hasattr(m, "q_norm")][0]
        with torch.no_grad():
            for p in att.parameters():
                if p.dim() == 2:
                    p.mul_(20)  # huge raw logits: the normalised ones stay bounded
        x = torch.randn(2, 5, 16)
        mon = StabilityMonitor(model, every=1, rules={})
        with mon.step():
            model(x)
        got = list(mon.history[-1]["quantities"]["attn_logit_max"].values())[0]
        h = model.input_norm(x) if hasattr(model, "input_norm") else x
        if isinstance(att, nn.MultiheadAttention):
            wq, wk, _ = att.in_proj_weight.chunk(3)
            bq, bk, _ = att.in_proj_bias.chunk(3)
            h = model.layers[0].norm1(x) if model.layers[0].norm_first else x
            q, k = F.linear(h, wq, bq), F.linear(h, wk, bk)
        else:
            h = model.norms[0](h)
            q, k = att.q_proj(h), att.k_proj(h)
        qh = _ln(q.view(2, 5, 4, 4), att.q_norm.norm.weight, att.q_norm.norm.bias).transpose(1, 2)
        kh = _ln(k.view(2, 5, 4, 4), att.k_norm.norm.weight, att.k_norm.norm.bias).transpose(1, 2)
        want = (qh @ kh.transpose(-1, -2)).abs().max().item() / 2.0
        assert got == pytest.approx(want, rel=1e-4)
        mon.close()


# ------------------------------------------------------------------- adversarial review: devices, dtypes, empties

def _review_calls():
    """(name, call kwargs, autocast, error, what must be named): each crashed with a bare RuntimeError (or
    computed on a meta mask) before the review."""
    q, kv = torch.randn(N, L, E), torch.randn(N, S, E)
    return [
        ("meta attn_mask", dict(attn_mask=torch.zeros(L, S, device="meta")), False, ValueError, "attn_mask"),
        ("meta key_padding_mask", dict(key_padding_mask=torch.zeros(N, S, dtype=torch.bool, device="meta")), False,
         ValueError, "key_padding_mask"),
        ("meta key and value", dict(key=kv.to("meta"), value=kv.to("meta")), False, ValueError, "key"),
        ("meta query", dict(query=q.to("meta")), False, ValueError, "query"),
        ("float64 key under autocast", dict(key=kv.double(), value=kv.double()), True, TypeError, "key"),
        ("float64 query under autocast", dict(query=q.double()), True, TypeError, "query"),
        ("broadcastable (1, L, S) attn_mask", dict(attn_mask=torch.zeros(1, L, S)), False, ValueError, "attn_mask"),
        ("broadcastable (1, S) key_padding_mask", dict(key_padding_mask=torch.zeros(1, S, dtype=torch.bool)), False,
         ValueError, "key_padding_mask"),
        ("0-d attn_mask", dict(attn_mask=torch.tensor(0.0)), False, ValueError, "attn_mask"),
        ("complex attn_mask", dict(attn_mask=torch.zeros(L, S, dtype=torch.complex64)), False, TypeError,
         "attn_mask"),
    ], q, kv


@pytest.mark.parametrize("index", range(10), ids=[c[0] for c in _review_calls()[0]])
def test_other_devices_and_dtypes_are_refused_by_name_and_change_nothing(stock_and_mine, index):
    cases, q, kv = _review_calls()
    _, kw, autocast, error, name = cases[index]
    _, mine = stock_and_mine(True)
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), pytest.raises(error) as err:
        mine(**{**dict(query=q, key=kv, value=kv), **kw})
    assert str(err.value).startswith(name)
    assert all(torch.equal(v, before[k]) for k, v in mine.state_dict().items())


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("n, tq, tk", [(0, L, S), (N, 0, S), (N, L, 0)])
def test_empty_batches_and_sequences_agree_with_torch(stock_and_mine, need_weights, n, tq, tk):
    """No batch, no query or no key: the shapes torch gives and no NaN (no key: output out_proj(0))."""
    stock, mine = stock_and_mine(True)
    q, kv = torch.randn(n, tq, E), torch.randn(n, tk, E)
    kpm = torch.zeros(n, tk, dtype=torch.bool)
    # torch's own module cannot reshape an empty padding mask on its fast path: compare to it without one (this
    # one masks nothing)
    want, want_w = stock(q, kv, kv, need_weights=need_weights)
    got, got_w = mine(q, kv, kv, key_padding_mask=kpm, need_weights=need_weights)
    assert got.shape == want.shape and not got.isnan().any()
    if tk == 0 and n * tq:
        torch.testing.assert_close(got, mine.out_proj.bias.expand_as(got).detach())
    else:
        torch.testing.assert_close(got, want.nan_to_num(), atol=1e-5, rtol=1e-5)
    assert (got_w is None) == (want_w is None) and (got_w is None or got_w.shape == want_w.shape)


def test_a_float_mask_of_another_dtype_is_added_in_the_query_dtype(stock_and_mine):
    """A float64 / float16 additive mask on a float32 module (torch's weights path refuses it with a bare
    RuntimeError): the result of the same mask in float32."""
    _, mine = stock_and_mine(False)
    gen = torch.Generator().manual_seed(3)
    q, kv = torch.randn(L, N, E, generator=gen), torch.randn(S, N, E, generator=gen)
    mask = torch.randn(L, S, generator=gen).half().float()
    want, want_w = mine(q, kv, kv, attn_mask=mask)
    for dtype in (torch.float64, torch.float16):
        got, got_w = mine(q, kv, kv, attn_mask=mask.to(dtype))
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_w, want_w)


def test_state_dict_round_trip_with_stock_attention(stock_and_mine):
    """The stock module's state loads (the norms start as LayerNorm's defaults) and the stock keys come back
    unchanged; a pickled copy still keeps torch's fused fast path off."""
    stock, _ = stock_and_mine(False)
    mine = QKNormMultiheadAttention(E, H)
    missing, unexpected = mine.load_state_dict(stock.state_dict(), strict=False)
    assert not unexpected and all(k.split(".")[0] in ("q_norm", "k_norm") for k in missing)
    back = nn.MultiheadAttention(E, H)
    _, unexpected = back.load_state_dict(mine.state_dict(), strict=False)
    assert all(k.split(".")[0] in ("q_norm", "k_norm") for k in unexpected)
    assert all(torch.equal(v, stock.state_dict()[k]) for k, v in back.state_dict().items())
    import copy
    import pickle
    assert not pickle.loads(pickle.dumps(mine))._qkv_same_embed_dim and not copy.deepcopy(mine)._qkv_same_embed_dim


@pytest.mark.parametrize("need_weights", [True, False])
def test_a_float_mask_that_requires_grad_gets_the_finite_difference_gradient(need_weights):
    """A learned additive bias (ALiBi-like) as attn_mask: its gradient on both paths, a -inf entry and a query
    with every key masked included (zero gradient there, no NaN)."""
    torch.manual_seed(17)
    mha = QKNormMultiheadAttention(E, H, dtype=torch.float64)
    _randomize_norms(mha)
    q, kv = torch.randn(L, N, E, dtype=torch.float64), torch.randn(S, N, E, dtype=torch.float64)
    bias = torch.randn(L, S, dtype=torch.float64)
    bias[0, 1] = float("-inf")
    bias[2] = float("-inf")  # query 2 sees no key
    free = torch.isfinite(bias)

    def f(values):
        mask = torch.full((L, S), float("-inf"), dtype=torch.float64).masked_scatter(free, values)
        return mha(q, kv, kv, attn_mask=mask, need_weights=need_weights)[0]
    assert torch.autograd.gradcheck(f, (bias[free].clone().requires_grad_(),))


@pytest.mark.parametrize("x, error, message", [
    (torch.randn(3, 8, dtype=torch.float64), TypeError, "x must have the norm's dtype torch.float32"),
    (torch.randn(3, 8).long(), TypeError, "x must be a floating tensor"),
    (torch.randn(3, 8, device="meta"), ValueError, "x must be on the device of the norm's parameters"),
], ids=["float64", "int64", "meta"])
def test_qknorm_refuses_what_layer_norm_would_crash_on_by_name(x, error, message):
    """Before the review: a bare RuntimeError ('mixed dtype', 'not on the expected device')."""
    with pytest.raises(error, match=re.escape(message)):
        QKNorm(8, 2)(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qknorm_takes_half_inputs_against_float_parameters_as_layer_norm(dtype):
    torch.manual_seed(18)
    norm = QKNorm(8, 2)
    _randomize_norms(norm)
    x = torch.randn(3, 8).to(dtype)
    want = _ln(x.double().view(3, 2, 4), norm.norm.weight.double(), norm.norm.bias.double()).view(3, 8)
    torch.testing.assert_close(norm(x).double(), want, atol=2e-2, rtol=2e-2)
