"""qk-layernorm against a written-out formula: QKNorm, QKNormMultiheadAttention (masks, fast paths),
add_qk_norm on torch.nn layers and the reference stacks, convert(qk_norm=True), fold, the monitor."""

import math

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


def test_without_its_norms_it_is_torch_multihead_attention():
    """The mask / causal / weights plumbing is torch's: with identity norms the outputs are torch's."""
    torch.manual_seed(2)
    stock = nn.MultiheadAttention(16, 4, batch_first=True)
    mine = add_qk_norm(nn.Sequential(stock_copy := nn.MultiheadAttention(16, 4, batch_first=True)))[0]
    mine.load_state_dict(stock.state_dict(), strict=False)
    mine.q_norm, mine.k_norm = nn.Identity(), nn.Identity()
    x = torch.randn(2, 6, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    bool_mask = torch.rand(6, 6) > 0.7
    bool_mask.fill_diagonal_(False)
    kpm = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    for kw in (dict(attn_mask=causal, is_causal=True), dict(attn_mask=bool_mask), dict(key_padding_mask=kpm),
               dict(attn_mask=causal, key_padding_mask=kpm, average_attn_weights=False)):
        want, want_w = stock(x, x, x, **kw)
        got, got_w = mine(x, x, x, **kw)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)
    assert stock_copy is mine


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
