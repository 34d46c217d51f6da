"""Admin wherever transformers are built: the drop-in torch.nn layers, convert and fold for torch.nn and
HuggingFace models (tiny random configs, nothing downloaded), profiling across distributed ranks."""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import admin_torch
from admin_torch import TransformerDecoderLayer, TransformerEncoderLayer, calculate_init, convert, fold
from admin_torch.stacks import admin_stacks


# ---------------------------------------------------------------- the drop-in layers

def test_encoder_layer_is_admin_post_ln_written_out():
    """norm2(w * a + ff(a)) with a = norm1(w * x + sa(x)): the formula, from the stock submodules."""
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(16, 2, 32, dropout=0.0, num_res_layers=12).eval()
    assert isinstance(layer, nn.TransformerEncoderLayer)
    assert [type(m) for m in (layer.omega_sa, layer.omega_ff)] == [admin_torch.OmegaResidual] * 2
    w = calculate_init(12)
    x = torch.randn(5, 3, 16)
    sa = layer.self_attn(x, x, x, need_weights=False)[0]
    a = layer.norm1(w * x + sa)
    expected = layer.norm2(w * a + layer.linear2(F.relu(layer.linear1(a))))
    torch.testing.assert_close(layer(x), expected)


def test_decoder_layer_has_three_omegas_and_refuses_pre_ln():
    layer = TransformerDecoderLayer(16, 2, 32, num_res_layers=9, output_change_scale="O(1)", as_parameter=True)
    assert [m.omega.shape for m in (layer.omega_sa, layer.omega_mha, layer.omega_ff)] == [(16,)] * 3
    torch.testing.assert_close(layer.omega_sa.omega, torch.full((16,), 3.0))
    assert layer(torch.randn(4, 2, 16), torch.randn(6, 2, 16)).shape == (4, 2, 16)
    with pytest.raises(ValueError, match="norm_first=True"):
        TransformerEncoderLayer(16, 2, norm_first=True, num_res_layers=4)
    with pytest.raises(TypeError):
        TransformerEncoderLayer(16, 2)  # num_res_layers is required


def test_drop_in_layers_compile_fully():
    torch._dynamo.reset()
    layer = TransformerEncoderLayer(16, 2, 32, dropout=0.0, num_res_layers=4).eval()
    x = torch.randn(5, 3, 16)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), layer(x))
    torch._dynamo.reset()


# ---------------------------------------------------------------- convert and fold: torch.nn

class Seq2Seq(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.src, self.tgt = nn.Embedding(30, d), nn.Embedding(30, d)
        self.model = nn.Transformer(d, 2, num_encoder_layers=3, num_decoder_layers=2, dim_feedforward=32,
                                    dropout=0.0)

    def forward(self, s, t):
        return self.model(self.src(s), self.tgt(t))


def test_convert_counts_n_per_stack_and_fold_restores_stock():
    torch.manual_seed(0)
    model = Seq2Seq().eval()
    s, t = torch.randint(0, 30, (6, 2)), torch.randint(0, 30, (5, 2))
    stock_out = model(s, t)
    assert convert(model) is model
    enc, dec = model.model.encoder.layers[0], model.model.decoder.layers[0]
    assert isinstance(enc, TransformerEncoderLayer) and isinstance(dec, TransformerDecoderLayer)
    assert enc.omega_sa.omega.item() == pytest.approx(calculate_init(2 * 3))
    assert dec.omega_ff.omega.item() == pytest.approx(calculate_init(3 * 2))
    admin_out = model(s, t)
    assert (admin_out - stock_out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="embedding="):
        fold(model)
    folded = fold(model, embedding={"model.encoder": model.src, "model.decoder": model.tgt})
    assert type(folded.model.encoder.layers[0]) is nn.TransformerEncoderLayer
    assert not any(isinstance(m, admin_torch.OmegaResidual) for m in folded.modules())
    assert (folded(s, t) - admin_out).abs().max() <= 1e-5
    assert isinstance(model.model.encoder.layers[0], TransformerEncoderLayer)  # the original is untouched


def test_convert_refuses_pre_ln_and_nothing_to_convert_without_changes():
    mixed = nn.ModuleList([nn.TransformerEncoderLayer(8, 2, 16), nn.TransformerEncoderLayer(8, 2, 16, norm_first=True)])
    with pytest.raises(ValueError, match="Pre-LN"):
        convert(mixed)
    assert type(mixed[0]) is nn.TransformerEncoderLayer  # validated first: nothing changed
    with pytest.raises(ValueError, match="no supported Post-LN layer"):
        convert(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="output_change_scale"):
        convert(nn.TransformerEncoderLayer(8, 2), output_change_scale="O(2)")


# ---------------------------------------------------------------- HuggingFace

transformers = pytest.importorskip("transformers")


def tiny(family):
    t = transformers
    if family == "bert":
        return t.BertModel(t.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                        intermediate_size=32, max_position_embeddings=32)), None
    if family == "roberta":
        return t.RobertaModel(t.RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                              num_attention_heads=2, intermediate_size=32,
                                              max_position_embeddings=40)), None
    common = dict(vocab_size=50, d_model=16, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    if family == "bart":
        return t.BartModel(t.BartConfig(**common)), None
    model = t.MarianMTModel(t.MarianConfig(**common, pad_token_id=0, decoder_start_token_id=0))
    m = model.model
    return model, {"model.encoder": [m.encoder.embed_tokens, m.encoder.embed_positions],
                   "model.decoder": [m.decoder.embed_tokens, m.decoder.embed_positions]}


def inputs(family):
    ids = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids) if family in ("bert", "roberta") else dict(input_ids=ids, decoder_input_ids=ids)


FAMILIES = ["bert", "roberta", "bart", "marian"]


@pytest.mark.parametrize("family", FAMILIES)
def test_huggingface_convert_and_fold(family):
    torch.manual_seed(0)
    model, embedding = tiny(family)
    model.eval()
    x = inputs(family)
    stock_out = model(**x)[0]
    convert(model)
    stacks = {name: len(layers) for name, _, layers in admin_stacks(model)}
    per_layer = {"encoder": 2, "decoder": 3}
    for name, n in stacks.items():
        side = "decoder" if "decoder" in name else "encoder"
        layer = admin_stacks(model)[list(stacks).index(name)][2][0][1]
        assert layer.admin_omegas[0].omega.item() == pytest.approx(calculate_init(per_layer[side] * n))
    admin_out = model(**x)[0]
    assert (admin_out - stock_out).abs().max() > 1e-3
    folded = fold(model, embedding=embedding)
    assert not any(hasattr(m, "admin_omegas") for m in folded.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in folded.modules())
    diff = (folded(**x)[0] - admin_out).abs().max().item()
    assert diff <= 1e-5, diff


def test_bert_layer_is_admin_written_out():
    """LN(dense(.) + w x) for both BERT sublayers, computed from the stock submodules (eval: no dropout)."""
    torch.manual_seed(0)
    model, _ = tiny("bert")
    model.eval()
    stock = copy.deepcopy(model.encoder.layer[0])  # the formula uses stock modules (no hooks)
    convert(model)
    w = calculate_init(2 * 3)
    h = torch.randn(2, 5, 16)
    attn = stock.attention.self(h)[0]
    a = stock.attention.output.LayerNorm(stock.attention.output.dense(attn) + w * h)
    out = stock.output.LayerNorm(stock.output.dense(stock.intermediate(a)) + w * a)
    got = model.encoder.layer[0](h)
    torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, out, rtol=1e-5, atol=1e-5)


def test_huggingface_omega_one_is_stock_and_training_steps_work():
    torch.manual_seed(0)
    model, _ = tiny("bart")
    x = inputs("bart")
    model.eval()
    stock_out = model(**x)[0]
    convert(model, output_change_scale="O(n)")  # omega = 1
    torch.testing.assert_close(model(**x)[0], stock_out, rtol=1e-5, atol=1e-6)
    model.train()
    model(**x)[0].sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "layers.0.fc1" in n)


def test_profile_a_converted_huggingface_model():
    torch.manual_seed(0)
    model, _ = tiny("bart")
    convert(model)
    omegas = admin_torch.profile_omegas(model, lambda: model(**inputs("bart")),
                                        chains=[model.encoder, model.decoder])
    assert len(omegas) == 2 * 2 + 3 * 3 and all(math.isfinite(v) and v >= 1.0 for v in omegas.values())
    assert list(omegas.values())[0] == 1.0 and max(omegas.values()) > 1.0


# ---------------------------------------------------------------- profiling across ranks

def _profile_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same model on every rank
    model = admin_torch.make_stack("admin", depth=2, dim=8, seed=0)
    batch = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(100 + rank))  # a batch per rank
    omegas = admin_torch.profile_omegas(model, lambda: model(batch))
    torch.save(omegas, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_profile_averages_over_two_gloo_ranks(tmp_path):
    torch.multiprocessing.spawn(_profile_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert got[0] == got[1]  # every rank ends with the same omegas
    singles = []
    for rank in range(2):
        model = admin_torch.make_stack("admin", depth=2, dim=8, seed=0)
        batch = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(100 + rank))
        singles.append(admin_torch.profile_omegas(model, lambda: model(batch)))
    for name in got[0]:
        assert got[0][name] == pytest.approx((singles[0][name] + singles[1][name]) / 2, rel=1e-9)


# ---------------------------------------------------------------- issue 21: edges of convert and fold

class SharedVocab(nn.Module):
    """nn.Transformer whose encoder and decoder read ONE embedding table (a shared vocabulary), with
    an output projection tied to it, and padding masks."""

    def __init__(self, enc, dec, d=16, vocab=30):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.model = nn.Transformer(d, 2, num_encoder_layers=enc, num_decoder_layers=dec, dim_feedforward=32,
                                    dropout=0.0)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, s, t):
        s_pad, t_pad = s.eq(0).T, t.eq(0).T
        causal = nn.Transformer.generate_square_subsequent_mask(t.shape[0]).bool()
        h = self.model(self.emb(s), self.emb(t), tgt_mask=causal, src_key_padding_mask=s_pad,
                       tgt_key_padding_mask=t_pad, memory_key_padding_mask=s_pad)
        return self.out(h)


def shared_batch(seed):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randint(1, 30, (7, 3), generator=g), torch.randint(1, 30, (6, 3), generator=g)
    s[5:, 0] = 0  # padding
    t[4:, 1] = 0
    return s, t


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# (3 encoder, 2 decoder layers): N = 6 in both stacks, the same omega; (2, 2): N = 4 and 6
@pytest.mark.parametrize("enc, dec, as_parameter, exact", [
    (3, 2, False, True), (3, 2, True, True), (6, 4, False, True), (2, 2, False, False), (6, 6, True, False)])
@pytest.mark.parametrize("seed", [0, 1])
def test_fold_shared_embedding_is_exact_or_refused(enc, dec, as_parameter, exact, seed):
    torch.manual_seed(seed)
    model = SharedVocab(enc, dec).eval()
    convert(model, as_parameter=as_parameter)
    s, t = shared_batch(seed)
    with torch.no_grad():
        admin_out = model(s, t)
    embedding = {"model.encoder": model.emb, "model.decoder": [model.emb]}
    if exact:
        folded = fold(model, embedding=embedding)
        assert not any(isinstance(m, admin_torch.OmegaResidual) for m in folded.modules())
        with torch.no_grad():
            diff = (folded(s, t) - admin_out).abs().max().item()
        assert diff <= 1e-5, diff  # scaled twice, this was about omega**2 off
        # the tied output projection keeps the unscaled table
        torch.testing.assert_close(folded.out.weight, model.emb.weight, rtol=0, atol=0)
    else:
        before = snapshot(model)
        with pytest.raises(ValueError, match=r"embedding: 'emb' feeds stacks 'model.encoder' .* 'model.decoder'"):
            fold(model, embedding=embedding)
        after = snapshot(model)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert model.out.weight is model.emb.weight
        with torch.no_grad():
            torch.testing.assert_close(model(s, t), admin_out, rtol=0, atol=0)


def test_fold_shared_embedding_with_trained_vector_omegas():
    """Equal vectors (the same training) fold exactly; different ones are refused."""
    torch.manual_seed(3)
    model = SharedVocab(3, 2).eval()
    convert(model, as_parameter=True)
    s, t = shared_batch(3)
    enc0, dec0 = model.model.encoder.layers[0], model.model.decoder.layers[0]
    vec = torch.rand(16) * 2 + 0.5
    enc0.omega_sa.set_omega_(vec)
    dec0.omega_sa.set_omega_(vec)
    with torch.no_grad():
        ref = model(s, t)
        folded = fold(model, embedding={"model.encoder": model.emb, "model.decoder": model.emb})
        assert (folded(s, t) - ref).abs().max().item() <= 1e-5
        dec0.omega_sa.set_omega_(vec.flip(0))
    with pytest.raises(ValueError, match="vector of 16"):
        fold(model, embedding={"model.encoder": model.emb, "model.decoder": model.emb})


@pytest.mark.parametrize("embedding, match", [
    (lambda m: {"model.encoder": m.src, "decoder": m.tgt}, r"'decoder' is not a stack"),
    (lambda m: {"model.encoder": m.src, "model.decoder": []}, "empty list"),
    (lambda m: [], "empty list"),
])
def test_fold_refuses_bad_embedding_argument(embedding, match):
    model = Seq2Seq().eval()
    convert(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        fold(model, embedding=embedding(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fold_embedding_listed_twice_is_scaled_once():
    torch.manual_seed(0)
    model = Seq2Seq().eval()
    convert(model)
    s, t = torch.randint(0, 30, (6, 2)), torch.randint(0, 30, (5, 2))
    with torch.no_grad():
        ref = model(s, t)
        folded = fold(model, embedding={"model.encoder": [model.src, model.src], "model.decoder": model.tgt})
        assert (folded(s, t) - ref).abs().max().item() <= 1e-5


def _raise(*_):
    raise RuntimeError("simulated failure inside the layer")


def _fail_in_layer(model, family, where):
    """A forward that raises inside the first layer, after the hooks captured x (a non-leaf tensor)."""
    layer = model.encoder.layer[0] if family in ("bert", "roberta") else model.get_encoder().layers[0]
    if where == "shape":  # a wrong hidden size: the first sublayer's q/k/v projection raises
        x = torch.randn(2, 5, 17, requires_grad=True) * 2
        with pytest.raises(RuntimeError):
            layer(x, attention_mask=None) if family in ("bert", "roberta") else layer(x, None)
        return
    reader = layer.intermediate.dense if family in ("bert", "roberta") else layer.fc1
    handle = reader.register_forward_pre_hook(_raise)  # the second sublayer, after its x was captured
    try:
        with pytest.raises(RuntimeError, match="simulated failure"):
            model(**inputs(family))
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("where", ["shape", "inside"])
def test_fold_and_deepcopy_after_a_failed_forward(family, where):
    torch.manual_seed(0)
    model, embedding = tiny(family)
    model.eval()
    x = inputs(family)
    convert(model)
    with torch.no_grad():
        admin_out = model(**x)[0]
    _fail_in_layer(model, family, where)
    clone = copy.deepcopy(model)  # raised "Only Tensors created explicitly by the user" before
    folded = fold(model, embedding=embedding)
    with torch.no_grad():
        assert (folded(**x)[0] - admin_out).abs().max().item() <= 1e-5
        torch.testing.assert_close(model(**x)[0], admin_out, rtol=0, atol=0)  # nothing leaked into it
        torch.testing.assert_close(clone(**x)[0], admin_out, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["bert", "bart"])
def test_converted_model_deepcopies_and_pickles_with_working_hooks(family, tmp_path):
    """The hooks are removed through their RemovableHandles: a copy (deep or pickled) folds on its own,
    and folding a copy leaves the original's hooks in place."""
    torch.manual_seed(0)
    model, embedding = tiny(family)
    model.eval()
    x = inputs(family)
    with torch.no_grad():
        stock_out = model(**x)[0]
    convert(model)
    with torch.no_grad():
        admin_out = model(**x)[0]
    torch.save(model, tmp_path / "m.pt")
    copies = [copy.deepcopy(model), torch.load(tmp_path / "m.pt", weights_only=False)]
    for c in copies:
        with torch.no_grad():
            torch.testing.assert_close(c(**x)[0], admin_out, rtol=0, atol=0)
        folded = fold(c)
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in folded.modules())
        with torch.no_grad():
            assert (folded(**x)[0] - admin_out).abs().max().item() <= 1e-5
            torch.testing.assert_close(c(**x)[0], admin_out, rtol=0, atol=0)  # fold copies: c keeps Admin
    with torch.no_grad():
        torch.testing.assert_close(model(**x)[0], admin_out, rtol=0, atol=0)
        assert (admin_out - stock_out).abs().max() > 1e-3
