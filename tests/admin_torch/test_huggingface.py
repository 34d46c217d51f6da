"""admin_torch.convert / fold across HuggingFace Post-LN families (tiny random configs, nothing downloaded):
exact Admin, exact fold with padding masks, gradient checkpointing in both modes, save / reload,
torch.compile, and the refusal of Pre-LN families."""

import copy
import os

import pytest
import torch

import admin_torch
from admin_torch import calculate_init, convert, fold
from admin_torch.hf_architectures import UNSUPPORTED_MODEL_TYPES

from benchmarks import hf_families as H  # the family builders, shared with benchmarks.bench_admin_hf

transformers = pytest.importorskip("transformers")

FAMILIES = list(H.families())
FAST = ["bert", "bert_decoder", "bart", "bart_causal"]  # the rest of the matrix is marked slow


def _params(fams):
    return [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in fams]


def _omegas(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, admin_torch.OmegaResidual)}


@torch.no_grad()
def _distinct_omegas(model, step=0.1):
    """Give every omega of ``model`` its own value (``omega * (1 + step * i)``), as training would: an omega
    that is dropped or swapped then shows in the outputs."""
    for i, m in enumerate(_omegas(model).values()):
        m.omega.mul_(1.0 + step * i)


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_is_admin_and_fold_is_exact_with_padding(family):
    """omega = calculate_init(N) with N per stack; omega = 1 is the stock model; fold gives stock
    classes computing the Admin function (padding mask in the inputs)."""
    model, x, n_per_stack = H.build(family)
    with torch.no_grad():
        stock = H.output(model(**x))
    one = convert(copy.deepcopy(model), output_change_scale="O(n)")  # omega = 1: the stock function
    with torch.no_grad():
        torch.testing.assert_close(H.output(one(**x)), stock, rtol=1e-5, atol=1e-5)
    classes = {type(m) for m in model.modules()}
    convert(model)
    ns = sorted(n_per_stack.values())
    values = sorted({round(m.omega.item(), 4) for m in _omegas(model).values()})
    assert values == sorted({round(calculate_init(n), 4) for n in ns})
    assert len(_omegas(model)) == sum(ns)
    with torch.no_grad():
        admin = H.output(model(**x))
    assert (admin - stock).abs().max() > 1e-4
    folded = fold(model)
    assert {type(m) for m in folded.modules()} == classes
    assert not _omegas(folded) and not any(m._forward_pre_hooks or m._forward_hooks for m in folded.modules())
    with torch.no_grad():
        err = (H.output(folded(**x)) - admin).abs().max().item()
    assert err <= 1e-5, err


def _loss(model, x):
    return H.output(model(**x)).float().pow(2).mean()


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("family", _params(FAMILIES))
def test_gradient_checkpointing_gives_the_same_gradients(family, use_reentrant):
    """model.gradient_checkpointing_enable() on a converted model: loss and every gradient (trainable
    omegas included) equal those without checkpointing."""
    model, x, _ = H.build(family)
    if not model.supports_gradient_checkpointing:
        pytest.skip(f"{type(model).__name__} does not support gradient checkpointing in transformers itself")
    convert(model, as_parameter=True)
    _distinct_omegas(model)
    model.train()
    ref_model = copy.deepcopy(model)
    ref_loss = _loss(ref_model, x)
    ref_loss.backward()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    loss = _loss(model, x)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    ref = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        if ref[name].grad is None:
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    assert all(m.omega.grad is not None and m.omega.grad.abs().sum() > 0 for m in _omegas(model).values())


@pytest.mark.parametrize("family", _params(FAMILIES))
def test_save_and_reload(family, tmp_path):
    """save_pretrained folds on save: the stock from_pretrained gives the same function; the Admin form
    (trained vector omegas) comes back exactly with admin_torch.from_pretrained; convert of the stock
    reload is refused."""
    model, x, _ = H.build(family)
    convert(model, as_parameter=True)
    _distinct_omegas(model, step=0.05)  # "trained" omegas
    with torch.no_grad():
        admin = H.output(model(**x))
    model.save_pretrained(tmp_path)
    cls = type(model)
    stock = cls.from_pretrained(tmp_path).eval()
    assert not _omegas(stock)
    with torch.no_grad():
        assert (H.output(stock(**x)) - admin).abs().max().item() <= 1e-5
    before = copy.deepcopy(stock.state_dict())
    with pytest.raises(ValueError, match="saved from an Admin model"):
        convert(stock)
    assert all(torch.equal(before[k], v) for k, v in stock.state_dict().items()) and not _omegas(stock)
    back = admin_torch.from_pretrained(cls, tmp_path).eval()
    own = model.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, own[k]), k
    with torch.no_grad():
        torch.testing.assert_close(H.output(back(**x)), admin, rtol=0, atol=0)


def test_trainer_style_resume_loads_the_admin_form(tmp_path):
    """Trainer resumes with model.load_state_dict(file, strict=False): the Admin tensors are swapped in."""
    from safetensors.torch import load_file
    model, x, _ = H.build("bert")
    convert(model, as_parameter=True)
    with torch.no_grad():
        next(iter(_omegas(model).values())).omega.mul_(1.3)
    model.save_pretrained(tmp_path)
    fresh, _, _ = H.build("bert")
    torch.manual_seed(5)
    fresh.apply(fresh._init_weights)
    convert(fresh, as_parameter=True)
    result = fresh.load_state_dict(load_file(os.path.join(tmp_path, "model.safetensors")), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


@pytest.mark.parametrize("family", _params(FAMILIES))
def test_compile_matches_eager(family):
    model, x, _ = H.build(family)
    convert(model)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = H.output(model(**x))
        compiled = H.output(torch.compile(model, backend="aot_eager")(**x))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def _pre_ln():
    t = transformers
    return {
        "mbart": lambda: t.MBartModel(t.MBartConfig(**H.SEQ2SEQ)),
        "t5": lambda: t.T5Model(t.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)),
        "gpt2": lambda: t.GPT2Model(t.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2)),
        "llama": lambda: t.LlamaModel(t.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=2, num_attention_heads=2)),
        "megatron_bert": lambda: t.MegatronBertModel(t.MegatronBertConfig(**H.COMMON)),
    }


@pytest.mark.parametrize("family", ["mbart", "t5", "gpt2", "llama", "megatron_bert"])
def test_pre_ln_families_are_refused_unchanged(family):
    torch.manual_seed(0)
    model = _pre_ln()[family]()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="Pre-LN"):
        convert(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not _omegas(model) and "save_pretrained" not in model.__dict__
    assert not hasattr(model.config, "admin_torch")


def test_bert_decoder_cross_attention_is_written_out():
    """LN(w x + f(x)) at all three residuals of a BERT decoder layer, from stock modules (N = 3 per layer)."""
    model, x, _ = H.build("bert_decoder")
    layer = model.bert.encoder.layer[0]
    stock = copy.deepcopy(layer)
    convert(model)
    w = calculate_init(6)
    h, enc = torch.randn(2, 5, 16), x["encoder_hidden_states"]
    with torch.no_grad():
        a = stock.attention.output.LayerNorm(stock.attention.output.dense(stock.attention.self(h)[0]) + w * h)
        c = stock.crossattention.output.LayerNorm(
            stock.crossattention.output.dense(stock.crossattention.self(a, encoder_hidden_states=enc)[0]) + w * a)
        out = stock.output.LayerNorm(stock.output.dense(stock.intermediate(c)) + w * c)
        got = layer(h, encoder_hidden_states=enc)
    torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, out, rtol=1e-5, atol=1e-5)


def test_bart_causal_lm_applies_every_omega():
    """BartForCausalLM: two residuals per layer (no cross-attention runs), both scaled, N = 2 per layer."""
    model, x, _ = H.build("bart_causal")
    layer = model.model.decoder.layers[0]
    stock = copy.deepcopy(layer)
    convert(model)
    assert len(layer.admin_omegas) == 2
    w = calculate_init(4)
    h = torch.randn(2, 5, 16)
    with torch.no_grad():
        a = stock.self_attn_layer_norm(w * h + stock.self_attn(hidden_states=h)[0])
        out = stock.final_layer_norm(w * a + stock.fc2(stock.activation_fn(stock.fc1(a))))
        got = layer(h)
    torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, out, rtol=1e-5, atol=1e-5)


def _check_admin_form_save(model, x, path):
    """``model.save_pretrained(path)`` of a model that cannot be folded: the Admin form. The stock loader refuses
    it with the way to load it; admin_torch.from_pretrained and a Trainer-style resume restore it bit for bit."""
    from safetensors.torch import load_file
    with torch.no_grad():
        admin = H.output(model(**x))
    model.save_pretrained(path)
    assert {"model.safetensors", "admin_torch_config.json", "config.json", "README.md"} <= set(os.listdir(path))
    saved = load_file(os.path.join(path, "model.safetensors"))
    assert saved and all(k.startswith("admin_torch.") for k in saved)  # nothing under a stock name
    cls = type(model)
    with pytest.raises(Exception, match=rf"admin_torch.from_pretrained\(transformers.{cls.__name__}, path\)"):
        cls.from_pretrained(path)
    with pytest.raises(Exception, match="Admin form"):
        transformers.AutoConfig.from_pretrained(path)
    back = admin_torch.from_pretrained(cls, path).eval()
    own = model.state_dict()
    assert back.state_dict().keys() == own.keys()
    assert all(torch.equal(v, own[k]) for k, v in back.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(H.output(back(**x)), admin, rtol=0, atol=0)
    # Trainer's resume: load_state_dict(file, strict=False) on a converted model (of other weights)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    result = fresh.load_state_dict(saved, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(v, own[k]) for k, v in fresh.state_dict().items())
    # Trainer reads config.json with the base config class: it must load
    transformers.PretrainedConfig.from_json_file(os.path.join(path, "config.json"))


def test_a_fold_save_after_an_admin_form_save_to_the_same_directory(tmp_path):
    """Saving a foldable model where an Admin-form save was: the stock loader and admin_torch.from_pretrained
    read the new, folded save (the Admin-form config and README are gone)."""
    unfoldable, x_u, _ = H.build("albert_shared")
    convert(unfoldable, as_parameter=True)
    _per_feature_omegas(unfoldable)  # shared layers with per-feature omegas: no stock model, the Admin form
    unfoldable.save_pretrained(tmp_path)
    model, x, _ = H.build("albert")
    convert(model)
    with torch.no_grad():
        admin = H.output(model(**x))
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "admin_torch_config.json").exists() and not (tmp_path / "README.md").exists()
    with torch.no_grad():
        assert (H.output(type(model).from_pretrained(tmp_path).eval()(**x)) - admin).abs().max() <= 1e-5
        torch.testing.assert_close(H.output(admin_torch.from_pretrained(type(model), tmp_path).eval()(**x)), admin,
                                   rtol=0, atol=0)


def test_marian_saves_its_admin_form(tmp_path):
    """Marian: one token table shared by stacks with different first omegas, and sinusoidal positions that are
    not saved: no stock model computes the Admin function, so save_pretrained writes the Admin form."""
    torch.manual_seed(0)
    model = transformers.MarianMTModel(transformers.MarianConfig(**H.SEQ2SEQ)).eval()
    ids, mask = H._ids()
    dec, _ = H._ids(seed=3, shape=(2, 6))
    x = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    convert(model, as_parameter=True)
    with pytest.raises(ValueError, match="pass embedding="):  # fold needs to be told where its input comes from
        fold(model)
    _check_admin_form_save(model, x, tmp_path / "m")
    with pytest.raises(ValueError, match="push_to_hub"):  # the Admin form is not for the Hub; nothing written
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    assert not (tmp_path / "hub").exists()


def test_albert_shared_layer_is_admin_at_every_application():
    """ALBERT's one layer applied at every depth: one omega per residual of the shared layer, N = 2 per
    application, the whole encoder written out from stock modules."""
    model, x, _ = H.build("albert_shared")
    albert = model.albert
    stock = copy.deepcopy(albert)
    convert(model)
    layer = albert.encoder.albert_layer_groups[0].albert_layers[0]
    assert len(_omegas(model)) == 2 and len(layer.admin_omegas) == 2
    w = calculate_init(4)  # 2 layers (applications) x 2 residuals
    assert all(abs(m.omega.item() - w) < 1e-6 for m in _omegas(model).values())
    s = stock.encoder.albert_layer_groups[0].albert_layers[0]
    with torch.no_grad():
        emb = stock.embeddings(input_ids=x["input_ids"])
        h = stock.encoder.embedding_hidden_mapping_in(emb)
        # the padding mask as AlbertModel passes it: additive, (batch, 1, 1, seq)
        bias = (1.0 - x["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
        for _ in range(2):
            q, k, v = (m(h).view(2, 8, 2, 8).transpose(1, 2)
                       for m in (s.attention.query, s.attention.key, s.attention.value))
            att = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5 + bias, dim=-1) @ v
            a = s.attention.LayerNorm(w * h + s.attention.dense(att.transpose(1, 2).reshape(2, 8, 16)))
            h = s.full_layer_layer_norm(w * a + s.ffn_output(s.activation(s.ffn(a))))
        got = albert(**x).last_hidden_state
    torch.testing.assert_close(got, h, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def _per_feature_omegas(model, seed=0):
    """Trained as_parameter omegas whose entries differ per feature."""
    gen = torch.Generator().manual_seed(seed)
    for m in _omegas(model).values():
        m.omega.mul_(1 + 0.1 * torch.rand(m.omega.shape, generator=gen))


@pytest.mark.parametrize("family", list(H.fold_refused()))
def test_fold_refused_families_convert_and_refuse_fold_unchanged(family, tmp_path):
    """Convert is Admin (omega = 1 is the stock function, N per stack); fold is refused with the reason, before
    anything is copied or changed; save_pretrained writes the Admin form (the stock loader refuses it). A shared
    ALBERT layer is refused with per-feature omegas (with scalar ones it folds:
    test_shared_albert_folds_with_one_omega_per_residual)."""
    model, x, n_per_stack = H.build(family)
    per_feature = family == "albert_shared"
    with torch.no_grad():
        stock = H.output(model(**x))
    one = convert(copy.deepcopy(model), output_change_scale="O(n)")
    with torch.no_grad():
        torch.testing.assert_close(H.output(one(**x)), stock, rtol=1e-5, atol=1e-5)
    convert(model, as_parameter=per_feature)
    assert sorted({round(m.omega.reshape(-1)[0].item(), 4) for m in _omegas(model).values()}) == \
        sorted({round(calculate_init(n), 4) for n in n_per_stack.values()})
    if per_feature:
        _per_feature_omegas(model)
    with torch.no_grad():
        admin = H.output(model(**x))
    assert (admin - stock).abs().max() > 1e-4
    before = copy.deepcopy(model.state_dict())
    message = H.fold_refused()[family][1]
    with pytest.raises(ValueError, match=message):
        fold(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():  # still the converted model, hooks in place
        torch.testing.assert_close(H.output(model(**x)), admin, rtol=0, atol=0)
    _check_admin_form_save(model, x, tmp_path / "m")


def test_a_family_listed_as_unsupported_is_refused_unchanged(monkeypatch):
    """UNSUPPORTED_MODEL_TYPES (empty today) is where a Post-LN family whose residuals cannot be described goes:
    convert refuses it with the reason and changes nothing."""
    model, _, _ = H.build("bert")
    monkeypatch.setitem(UNSUPPORTED_MODEL_TYPES, "bert", "a reason given here")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="model_type 'bert'.* is not supported by admin_torch.convert: a reason given "
                                         "here. Nothing was changed"):
        convert(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not _omegas(model) and "save_pretrained" not in model.__dict__
    assert not hasattr(model.config, "admin_torch")


#: the output projection(s) f ends with, per sublayer: (f's last linear map, as attribute paths of a layer)
_OUTPUT_PROJECTIONS = {
    "xlnet": ("rel_attn.o", "ff.layer_2.weight", "ff.layer_2.bias"),
    "xlnet_two_stream": ("rel_attn.o", "ff.layer_2.weight", "ff.layer_2.bias"),
    "funnel_base": ("attention.post_proj.weight", "attention.post_proj.bias", "ffn.linear_2.weight",
                    "ffn.linear_2.bias"),
}


@pytest.mark.parametrize("family", list(_OUTPUT_PROJECTIONS))
def test_admin_equals_stock_with_output_projections_divided_by_omega(family):
    """An independent check of where omega goes, with no hook: with LayerNorm eps = 0 (scale invariance),
    LN(w x + f(x)) = LN(x + f(x) / w), so a converted model with scalar omega w equals the stock model whose
    sublayer output projections are divided by w -- XLNet's two streams (one LayerNorm per sublayer for h and
    g) and Funnel's pooled queries included."""
    model, x, n = H.build(family)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 0.0
    stock = copy.deepcopy(model)
    convert(model)
    w = calculate_init(n[""])
    layers = [m for m in stock.modules() if type(m).__name__ in ("XLNetLayer", "FunnelLayer")]
    assert layers
    with torch.no_grad():
        for layer in layers:
            for path in _OUTPUT_PROJECTIONS[family]:
                obj = layer
                for part in path.split("."):
                    obj = getattr(obj, part)
                (obj.weight if isinstance(obj, torch.nn.Module) else obj).div_(w)
        torch.testing.assert_close(H.output(model(**x)), H.output(stock(**x)), rtol=1e-5, atol=1e-5)


def test_funnel_model_encoder_and_decoder_are_one_stack(tmp_path):
    """FunnelModel: the decoder continues the encoder's residual stream (N counts both); fold and save are exact
    with the initial omegas, and refused with the reason (nothing written) once the omega of block 1's first
    layer and the decoder's first omega differ, since the decoder adds block 0's output to its input (then
    save_pretrained writes the Admin form)."""
    torch.manual_seed(0)
    model = transformers.FunnelModel(transformers.FunnelConfig(**H.FUNNEL)).eval()
    ids, mask = H._ids()
    x = dict(input_ids=ids, attention_mask=mask)
    convert(model, as_parameter=True)
    assert len(_omegas(model)) == 8  # 3 encoder layers + 1 decoder layer, 2 residuals each
    assert all(torch.allclose(m.omega, torch.full((16,), calculate_init(8))) for m in _omegas(model).values())
    with torch.no_grad():
        admin = model(**x).last_hidden_state
        assert (fold(model)(**x).last_hidden_state - admin).abs().max().item() <= 1e-5
    model.save_pretrained(tmp_path / "ok")
    with torch.no_grad():
        reloaded = transformers.FunnelModel.from_pretrained(tmp_path / "ok").eval()
        assert (reloaded(**x).last_hidden_state - admin).abs().max().item() <= 1e-5
        model.decoder.layers[0].admin_omegas[0].omega.mul_(1.1)
    with pytest.raises(ValueError, match="decoder adds the first block's output"):
        fold(model)
    _check_admin_form_save(model, x, tmp_path / "admin_form")


def test_xlnet_mems_of_the_folded_model_give_its_own_next_segment():
    """XLNet's mems are cached layer inputs: the folded model's mems (scaled like its layer inputs) fed back to
    the folded model give the Admin model's next-segment output."""
    model, x, _ = H.build("xlnet")
    convert(model, as_parameter=True)
    _distinct_omegas(model)
    with torch.no_grad():
        folded = fold(model)
        ids2 = torch.randint(3, H.V, (2, 5), generator=torch.Generator().manual_seed(7))
        a = model(input_ids=x["input_ids"], use_mems=True)
        f = folded(input_ids=x["input_ids"], use_mems=True)
        a2 = model(input_ids=ids2, mems=a.mems, use_mems=True).logits
        f2 = folded(input_ids=ids2, mems=f.mems, use_mems=True).logits
    assert (f2 - a2).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_compile_inductor_matches_eager_bert():
    """The default torch.compile backend (inductor) on a converted BERT with trainable omegas: outputs, loss and
    every gradient (omegas included) equal eager's."""
    model, x, _ = H.build("bert")
    convert(model, as_parameter=True)
    _distinct_omegas(model)
    model.train()
    ref = copy.deepcopy(model)
    ref_loss = _loss(ref, x)
    ref_loss.backward()
    torch._dynamo.reset()
    try:
        loss = _loss(torch.compile(model), x)
        loss.backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if grads[name].grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(m.omega.grad is not None and m.omega.grad.abs().sum() > 0 for m in _omegas(model).values())


@pytest.mark.parametrize("as_parameter", [False, True])
@pytest.mark.parametrize("layers,groups,inner", [(2, 1, 1), (4, 2, 1), (3, 1, 2)])
def test_shared_albert_folds_with_one_omega_per_residual(layers, groups, inner, as_parameter, tmp_path):
    """ALBERT with its layers shared across depth (num_hidden_groups < num_hidden_layers, inner groups too): with one
    number per residual omega (the default buffers, or as_parameter vectors still uniform, each residual's own
    value), fold divides each branch's output projection by its omega: a stock shared ALBERT computing the Admin
    function (<= 1e-5), which save_pretrained writes and the stock loader reads back."""
    torch.manual_seed(0)
    config = transformers.AlbertConfig(**{**H.COMMON, "num_hidden_layers": layers}, embedding_size=8,
                                       num_hidden_groups=groups, inner_group_num=inner)
    model = transformers.AlbertForMaskedLM(config).eval()
    x = dict(zip(("input_ids", "attention_mask"), H._ids()))
    convert(model, as_parameter=as_parameter)
    _distinct_omegas(model, step=0.2)  # each residual its own (uniform) omega
    assert len({round(m.omega.reshape(-1)[0].item(), 4) for m in _omegas(model).values()}) == 2 * groups * inner
    with torch.no_grad():
        admin = H.output(model(**x))
        folded = fold(model)
        assert not _omegas(folded) and type(folded) is type(model)
        assert (H.output(folded(**x)) - admin).abs().max().item() <= 1e-5
        model.save_pretrained(tmp_path)
        assert not (tmp_path / "admin_torch_config.json").exists()
        stock = transformers.AlbertForMaskedLM.from_pretrained(tmp_path).eval()
        assert stock.config.num_hidden_groups == groups
        assert (H.output(stock(**x)) - admin).abs().max().item() <= 1e-5
    back = admin_torch.from_pretrained(transformers.AlbertForMaskedLM, tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())


@pytest.mark.parametrize("eps", [1e-12, 1e-5, 1e-2, 1.0])
@pytest.mark.parametrize("w", [0.5, 1.7, 12.0])
def test_layernorm_scale_bound_of_the_shared_fold(eps, w):
    """The bound the shared-layer fold states: LN_eps(w y) and LN_eps(y) differ per element by at most
    |gamma * n| * eps * |1 - 1/w^2| / (2 Var[y]) for w >= 1 (twice that for w < 1), n the normalised value (float64,
    random y with a spread of scales)."""
    gen = torch.Generator().manual_seed(int(w * 100) + int(eps * 1e6))
    y = torch.randn(64, 32, generator=gen, dtype=torch.float64) * torch.logspace(-2, 1, 64, dtype=torch.float64)[:, None]
    ln = torch.nn.LayerNorm(32, eps=eps, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(32, generator=gen, dtype=torch.float64))
        ln.bias.zero_()
        exact, folded = ln(w * y), ln(y)
        var = y.var(-1, unbiased=False, keepdim=True)
        scale = eps * abs(1 - 1 / w ** 2) / ((2 if w >= 1 else 1) * var)
        bound = folded.abs() * scale * (1 + 1e-9) + 1e-13  # + float64 rounding
        assert ((exact - folded).abs() <= bound).all()
