"""transformer_admin: in-process unit tests of the model and of folding (fast)."""

import argparse
import json
import math
from types import SimpleNamespace

import pytest
import torch

import admin_torch
import fairseq_plugins  # noqa: F401  (registers the model)
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY
from fairseq_plugins.flags import check_args
from fairseq.models.transformer import TransformerModel
from fairseq_plugins.fold_checkpoint import NotAdminCheckpointError, fold_admin_model, fold_checkpoint, main, stock_args
from fairseq_plugins.models.transformer_admin import (
    TransformerAdminModel,
    decoder_sublayers,
    encoder_sublayers,
    residual_modules,
)

VOCAB = 24


def _task():
    d = Dictionary()
    for i in range(VOCAB - len(d)):
        d.add_symbol(f"w{i}")
    return SimpleNamespace(source_dictionary=d, target_dictionary=d)


def build(*extra, enc=2, dec=3, dim=16, arch="transformer_admin", share=True):
    """A tiny transformer_admin model built as fairseq-train builds it (add_args, arch, the flag checks that end
    parse_args_and_arch, build_model)."""
    # fairseq's model argument group suppresses unset arguments, so the arch function fills them
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    TransformerAdminModel.add_args(parser)
    argv = ["--encoder-layers", str(enc), "--decoder-layers", str(dec),
            "--encoder-embed-dim", str(dim), "--decoder-embed-dim", str(dim),
            "--encoder-ffn-embed-dim", str(2 * dim), "--decoder-ffn-embed-dim", str(2 * dim),
            "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--dropout", "0.1"]
    if share:
        argv.append("--share-all-embeddings")
    args = parser.parse_args(argv + [str(a) for a in extra])
    args.arch = arch
    ARCH_CONFIG_REGISTRY[arch](args)
    check_args(args)
    return TransformerAdminModel.build_model(args, _task())


def batch(bsz=3, src_len=7, tgt_len=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, VOCAB, (bsz, src_len), generator=g)
    src[0, :2] = 1  # left padding, as fairseq's default left_pad_source
    prev = torch.randint(4, VOCAB, (bsz, tgt_len), generator=g)
    prev[:, 0] = 2
    prev[1, -2:] = 1
    lengths = src.ne(1).sum(1)
    return src, lengths, prev


def omega_closed_form(n, scale):
    # written out separately from admin_torch.calculate_init (REFERENCE section 1)
    if scale in ("O(logn)", "default"):
        return math.sqrt((n + 1) / math.log(n + 1) - 1)
    return {"O(n)": 1.0, "O(1)": math.sqrt(n)}[scale]


def test_architectures_registered():
    for arch in ("transformer_admin", "transformer_admin_wmt_en_de", "transformer_admin_wmt_en_de_18_18",
                 "transformer_admin_wmt_en_fr_60_12", "transformer_admin_iwslt_de_en",
                 "transformer_admin_vaswani_wmt_en_de_big"):
        assert ARCH_MODEL_REGISTRY[arch] is TransformerAdminModel
    sizes = {}
    for arch in ("transformer_admin_wmt_en_de_18_18", "transformer_admin_wmt_en_fr_60_12",
                 "transformer_admin_iwslt_de_en", "transformer_admin_vaswani_wmt_en_de_big"):
        a = argparse.Namespace()
        ARCH_CONFIG_REGISTRY[arch](a)
        sizes[arch] = (a.encoder_layers, a.decoder_layers, a.encoder_embed_dim, a.encoder_ffn_embed_dim)
        assert (a.admin_init, a.admin_output_change_scale) == ("admin", "O(logn)")
    assert sizes == {"transformer_admin_wmt_en_de_18_18": (18, 18, 512, 2048),
                     "transformer_admin_wmt_en_fr_60_12": (60, 12, 512, 2048),
                     "transformer_admin_iwslt_de_en": (6, 6, 512, 1024),
                     "transformer_admin_vaswani_wmt_en_de_big": (6, 6, 1024, 4096)}


@pytest.mark.parametrize("enc,dec", [(2, 3), (1, 1)])
def test_sublayer_counts_and_calls(enc, dec):
    model = build(enc=enc, dec=dec).eval()
    assert encoder_sublayers(model.legacy_args) == 2 * enc and decoder_sublayers(model.legacy_args) == 3 * dec
    assert [len(layer.residuals) for layer in model.encoder.layers] == [2] * enc
    assert [len(layer.residuals) for layer in model.decoder.layers] == [3] * dec
    calls = {}
    for name, m in residual_modules(model):
        m.register_forward_hook(lambda mod, inp, out, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    model(*batch())
    # each residual module is called exactly once per forward pass: 2 per encoder, 3 per decoder layer
    assert len(calls) == 2 * enc + 3 * dec and set(calls.values()) == {1}


@pytest.mark.parametrize("scale", ["O(logn)", "default", "O(1)", "O(n)"])
@pytest.mark.parametrize("as_parameter", [False, True])
def test_closed_form_omegas(scale, as_parameter):
    extra = ["--admin-output-change-scale", scale] + (["--encoder-as-parameter", "--decoder-as-parameter"] if as_parameter else [])
    enc, dec = 3, 2
    model = build(*extra, enc=enc, dec=dec)
    for name, m in residual_modules(model):
        n = 2 * enc if name.startswith("encoder.") else 3 * dec   # decoder counts its own sublayers only
        assert isinstance(m, admin_torch.OmegaResidual)
        assert m.omega.shape == ((16,) if as_parameter else (1,))
        assert isinstance(m.omega, torch.nn.Parameter) == as_parameter
        torch.testing.assert_close(m.omega, torch.full_like(m.omega, omega_closed_form(n, scale)))
        assert m.omega[0].item() == pytest.approx(admin_torch.calculate_init(n, scale), rel=1e-6)


def test_default_scale_is_ologn():
    model = build(enc=6, dec=6)
    assert model.encoder.layers[0].residuals[0].omega.item() == pytest.approx(omega_closed_form(12, "O(logn)"), rel=1e-6)
    assert model.encoder.layers[0].residuals[0].omega.item() == pytest.approx(2.017, abs=1e-3)


def test_deepnorm_constants_and_scaling():
    enc, dec, dim = 4, 2, 64
    torch.manual_seed(0)
    model = build("--admin-init", "deepnorm", enc=enc, dec=dec, dim=dim)
    # DeepNet's encoder-decoder constants for N=4, M=2, evaluated by hand: 0.81 * 2^(9/16), 0.87 * 2^(-9/16),
    # 6^(1/4), 24^(-1/4)
    enc_alpha, enc_beta, dec_alpha, dec_beta = 1.1962, 0.5891, 1.5651, 0.4518
    for name, m in residual_modules(model):
        assert isinstance(m, admin_torch.DeepNormResidual)
        assert m.alpha.item() == pytest.approx(enc_alpha if name.startswith("encoder.") else dec_alpha, abs=1e-4)

    def gain(w):  # xavier normal: std = gain * sqrt(2 / (fan_in + fan_out))
        return w.std().item() / math.sqrt(2.0 / (w.shape[0] + w.shape[1]))

    for stack, beta in ((model.encoder, enc_beta), (model.decoder, dec_beta)):
        scaled = [w for layer in stack.layers for w in (layer.fc1.weight, layer.fc2.weight,
                  layer.self_attn.v_proj.weight, layer.self_attn.out_proj.weight)]
        if stack is model.decoder:
            scaled += [w for layer in stack.layers for w in (layer.encoder_attn.v_proj.weight, layer.encoder_attn.out_proj.weight)]
        gains = torch.tensor([gain(w) for w in scaled])
        assert gains.mean().item() == pytest.approx(beta, rel=0.05)
        # q and k keep fairseq's own init (xavier uniform, gain 1/sqrt(2)): not scaled
        q = torch.tensor([gain(layer.self_attn.q_proj.weight) for layer in stack.layers])
        assert q.mean().item() == pytest.approx(2 ** -0.5, rel=0.05)


def test_deepnorm_refuses_as_parameter():
    with pytest.raises(ValueError, match="as-parameter"):
        build("--admin-init", "deepnorm", "--encoder-as-parameter")


@pytest.mark.parametrize("flag", ["--encoder-normalize-before", "--decoder-normalize-before"])
def test_refuses_pre_ln(flag):
    with pytest.raises(ValueError, match="not accepted by transformer_admin"):
        build(flag)


def test_profiled_first_training_forward(tmp_path):
    path = tmp_path / "profile.json"
    torch.manual_seed(0)
    model = build("--admin-init", "profiled", "--admin-profile", path, "--decoder-as-parameter", enc=3, dec=2)
    assert model.admin_profiled.item() == 0 and model.needs_profiling()
    model.train()
    model(*batch())
    assert model.admin_profiled.item() == 1 and path.exists()
    saved = admin_torch.load_profile(path)
    assert list(saved) == [n for n, _ in residual_modules(model)]
    # each stack is its own chain starting at 1 (Transformer-Clinic's encoder_ratio / decoder_ratio)
    assert saved["encoder.layers.0.residuals.0"] == 1.0 and saved["decoder.layers.0.residuals.0"] == 1.0
    assert all(v > 1.0 for n, v in saved.items() if not n.endswith("layers.0.residuals.0"))
    for name, m in residual_modules(model):
        torch.testing.assert_close(m.omega.double(), torch.full_like(m.omega, saved[name]).double(), rtol=1e-6, atol=0)
    # the flag is in the state_dict, so a resumed model does not profile again
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert state["admin_profiled"].item() == 1
    before = {n: m.omega.clone() for n, m in residual_modules(model)}
    model(*batch(seed=1))
    assert all(torch.equal(before[n], m.omega) for n, m in residual_modules(model))
    # a new model with an existing profile file loads it at build time
    again = build("--admin-init", "profiled", "--admin-profile", path, "--decoder-as-parameter", enc=3, dec=2)
    assert again.admin_profiled.item() == 1 and not again.train().needs_profiling()
    for (n, m), (_, m2) in zip(residual_modules(model), residual_modules(again)):
        torch.testing.assert_close(m2.omega, m.omega)
    json.loads(path.read_text())  # plain JSON


def _perturb_(model, seed=0):
    """Make the model look trained: every parameter (LayerNorms and omegas included) moves."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))


FOLD_CASES = {
    "admin": [],
    "admin-as-parameter": ["--encoder-as-parameter", "--decoder-as-parameter"],
    "profiled-as-parameter": ["--admin-init", "profiled", "--encoder-as-parameter", "--decoder-as-parameter"],
    "deepnorm": ["--admin-init", "deepnorm"],
    "admin-layernorm-embedding": ["--layernorm-embedding", "--encoder-as-parameter"],
    "admin-O(1)-learned-pos-unshared": ["--admin-output-change-scale", "O(1)", "--encoder-learned-pos",
                                        "--decoder-learned-pos", "--decoder-as-parameter"],
}


@pytest.mark.parametrize("case", list(FOLD_CASES))
def test_fold_in_process_matches(case):
    torch.manual_seed(0)
    model = build(*FOLD_CASES[case], enc=3, dec=2, share="unshared" not in case)
    if "profiled" in case:
        model.train()
        model(*batch(seed=5))  # profiles
        assert model.admin_profiled.item() == 1
    _perturb_(model)
    model.eval()
    stock = fold_admin_model(model).eval()
    assert type(stock) is TransformerModel
    assert not any(isinstance(m, (admin_torch.OmegaResidual, admin_torch.DeepNormResidual)) for m in stock.modules())
    src, lengths, prev = batch(seed=3)
    with torch.no_grad():
        ref, _ = model(src, lengths, prev)
        out, _ = stock(src, lengths, prev)
        # the encoder output (read by cross-attention) is unchanged too
        enc_ref = model.encoder(src, lengths)["encoder_out"][0]
        enc_out = stock.encoder(src, lengths)["encoder_out"][0]
    assert (out - ref).abs().max().item() <= 1e-5
    assert (enc_out - enc_ref).abs().max().item() <= 1e-5
    # folding did something: the omegas are not 1
    assert any((m.omega if hasattr(m, "omega") else m.alpha).ne(1).any() for _, m in residual_modules(model))


def test_fold_incremental_decoding_matches():
    torch.manual_seed(0)
    model = build("--decoder-as-parameter", enc=2, dec=2)
    _perturb_(model)
    model.eval()
    stock = fold_admin_model(model).eval()
    src, lengths, prev = batch(seed=4)
    with torch.no_grad():
        outs = []
        for m in (model, stock):
            enc = m.encoder(src, lengths)
            state, steps = {}, []
            for t in range(prev.shape[1]):
                logits, _ = m.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state)
                steps.append(logits)
            outs.append(torch.cat(steps, 1))
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5


def test_stock_args_rewrite():
    model = build("--encoder-as-parameter")
    new = stock_args(model.legacy_args)
    assert new.arch == "transformer"
    assert not any(hasattr(new, k) for k in ("admin_init", "admin_output_change_scale", "encoder_as_parameter",
                                              "decoder_as_parameter", "admin_profile"))
    assert new.share_all_embeddings is False and new.encoder_learned_pos and new.decoder_learned_pos
    assert model.legacy_args.share_all_embeddings is True  # the input is not modified


def test_fold_admin_model_refuses_stock_model():
    model = build()
    stock = fold_admin_model(model)
    with pytest.raises(TypeError, match="transformer_admin"):
        fold_admin_model(stock)


def test_fold_checkpoint_refuses_non_admin(tmp_path, capsys):
    path = tmp_path / "stock.pt"
    torch.save({"args": None, "cfg": {"model": {"arch": "transformer", "_name": "transformer"}, "common": {}},
                "model": {}, "optimizer_history": [{"criterion_name": "CrossEntropyCriterion",
                "optimizer_name": "Adam", "lr_scheduler_state": {"best": None}, "num_updates": 0}],
                "extra_state": {"train_iterator": {"epoch": 1}}}, path)
    with pytest.raises(NotAdminCheckpointError, match="not a transformer_admin or transformer_lm_admin checkpoint"):
        fold_checkpoint(str(path), str(tmp_path / "out.pt"))
    assert main([str(path), str(tmp_path / "out.pt")]) == 2
    assert "not a transformer_admin or transformer_lm_admin checkpoint" in capsys.readouterr().err
