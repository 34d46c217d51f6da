"""stability_toolbox.sites: which sublayers, attention modules and parameter groups a SitePlan finds in real
models (torch.nn's encoder Post-LN and Pre-LN, the reference stacks, a tiny HuggingFace BERT, a norms-only
model), the residual sums its hooks hand to a Recorder, and register_layer_kind."""

import pytest
import torch
from torch import nn

from admin_torch import make_stack
from admin_torch.architectures import LayerKind, Sublayer
from stability_toolbox import sites
from stability_toolbox.quantities import Recorder
from stability_toolbox.sites import SitePlan, attention_style, heads, qk_normed, register_layer_kind


def _encoder(norm_first: bool) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True,
                                                            norm_first=norm_first), 2, enable_nested_tensor=False)


def _armed_pass(plan: SitePlan, model: nn.Module, x: torch.Tensor) -> None:
    """One forward pass of ``model`` with the plan's hooks in; no hook stays behind."""
    handles = []
    plan.arm(Recorder(probe_rows=4), handles)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("norm_first", [False, True])
def test_torch_encoder_sites_from_the_layer_descriptions(norm_first):
    model = _encoder(norm_first)
    plan = SitePlan(model)
    assert plan.names() == ["layers.0.norm1", "layers.0.norm2", "layers.1.norm1", "layers.1.norm2"]
    assert plan.mechanism("auto") == "layer descriptions"
    assert [pre for _, _, _, pre, _ in plan.layer_plans] == [norm_first, norm_first]
    assert [(n, s) for n, _, s in plan.attention] == [("layers.0.self_attn", "torch_mha"),
                                                      ("layers.1.self_attn", "torch_mha")]
    assert [row for row, _ in plan.groups] == ["layers.0", "layers.1"]
    # every trainable parameter in exactly one group
    grouped = [p for _, params in plan.groups for _, p in params]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))


@pytest.mark.parametrize("norm_first", [False, True])
def test_the_hooks_hand_each_sublayers_branch_and_sum_to_the_recorder(norm_first):
    """Post-LN: s is the norm's input, x the sublayer's input stream; Pre-LN: s is the next norm's input (or
    the layer's output); beta = Var[s - x] / Var[s] against a hand computation."""
    model = _encoder(norm_first)
    plan = SitePlan(model)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    _armed_pass(plan, model, x)
    layer = model.layers[0]
    with torch.no_grad():
        if norm_first:
            s1 = x + layer._sa_block(layer.norm1(x), None, None)
            s2 = s1 + layer._ff_block(layer.norm2(s1))
            sums = [(x, s1), (s1, s2)]
        else:
            s1 = x + layer._sa_block(x, None, None)
            h1 = layer.norm1(s1)
            sums = [(x, s1), (h1, h1 + layer._ff_block(h1))]
    for site, (inp, s) in zip(plan.all_sites()[:2], sums):
        assert site.calls == 1
        want = (s - inp).var(unbiased=False) / s.var(unbiased=False)
        torch.testing.assert_close(site.beta_sum, want, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(site.amax, torch.maximum((s - inp).abs().amax(), s.abs().amax()))


def test_reference_stack_sites_from_the_residual_modules():
    plan = SitePlan(make_stack("admin", depth=2, dim=16, seed=0))
    assert plan.names() == ["residuals.0", "residuals.1", "residuals.2", "residuals.3"]
    assert plan.mechanism("auto") == "residual modules"
    assert [(n, s) for n, _, s in plan.attention] == [("sublayers.0", "batch_first"), ("sublayers.2", "batch_first")]
    # no known layer: the parameter groups are the elements of the longest ModuleList, the rest "(other)"
    assert [row for row, _ in plan.groups] == ["sublayers.0", "sublayers.1", "sublayers.2", "sublayers.3", "(other)"]


def test_tiny_bert_sites_and_attention():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    plan = SitePlan(model)
    assert plan.names() == [f"encoder.layer.{i}.{norm}" for i in (0, 1)
                            for norm in ("attention.output.LayerNorm", "output.LayerNorm")]
    assert plan.mechanism("auto") == "layer descriptions"
    assert [(n, s) for n, _, s in plan.attention] == [("encoder.layer.0.attention.self", "hf_bert"),
                                                      ("encoder.layer.1.attention.self", "hf_bert")]
    assert heads(plan.attention[0][1]) == 2 and not qk_normed(plan.attention[0][1])
    assert [row for row, _ in plan.groups] == ["encoder.layer.0", "encoder.layer.1", "(other)"]
    _armed_pass(plan, model, torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0)))
    assert all(site.calls == 1 and 0 < site.beta_sum.item() for site in plan.all_sites())


class _NormsOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.f1, self.f2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.n1, self.n2 = nn.LayerNorm(8), nn.LayerNorm(8)

    def forward(self, x):
        h = self.n1(x + self.f1(x))
        return self.n2(h + self.f2(h))


def test_fallback_norms_and_nothing_to_monitor():
    plan = SitePlan(_NormsOnly())
    assert plan.names() == ["n1", "n2"] and plan.mechanism("pre_ln") == "fallback (pre_ln)"
    assert [row for row, _ in plan.groups] == ["(other)"]
    _armed_pass(plan, plan.model, torch.randn(3, 8))
    first, second = plan.all_sites()
    # the first norm has no previous norm (no shortcut to read); the second keeps both readings
    assert first.calls == 0 and second.calls == 1 and second.alt_sum is not None
    with pytest.raises(ValueError, match="nothing to monitor"):
        SitePlan(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


class _MyLayer(nn.Module):
    """A Post-LN layer no table knows: h = norm(x + ff(x))."""

    def __init__(self):
        super().__init__()
        self.ff, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x + self.ff(x))


class _MySubLayer(_MyLayer):
    pass


def test_register_layer_kind_teaches_a_layer_type_and_its_subclasses(monkeypatch):
    from admin_torch import architectures

    monkeypatch.setattr(architectures, "_DESCRIBERS", {})  # registrations stay within this test
    model = nn.Sequential(_MyLayer(), _MySubLayer())
    assert SitePlan(model).mechanism("auto") == "fallback (auto)"
    kind = LayerKind(sublayers=(Sublayer(norm="norm", readers=("ff",)),), last_norm="norm", mechanism="hooks")
    register_layer_kind(f"{_MyLayer.__module__}.{_MyLayer.__qualname__}", lambda layer: kind)
    plan = SitePlan(model)
    assert plan.mechanism("auto") == "layer descriptions" and plan.names() == ["0.norm", "1.norm"]
    assert [row for row, _ in plan.groups] == ["0", "1"]
    x = torch.randn(4, 8)
    _armed_pass(plan, model, x)
    with torch.no_grad():
        f = model[0].ff(x)
    torch.testing.assert_close(plan.all_sites()[0].beta_sum, f.var(unbiased=False) / (x + f).var(unbiased=False))
    with pytest.raises(TypeError, match="key"):
        register_layer_kind(_MyLayer, lambda layer: kind)
    with pytest.raises(TypeError, match="describe"):
        register_layer_kind("mylib.MyLayer", "not a kind")
    # one registry: Admin converts what the monitor was taught
    assert architectures.layer_kind(_MySubLayer()) is kind


def test_attention_style_heads_and_qk_norm_of_plain_modules():
    class Proj(nn.Module):
        def __init__(self, q="q_proj", k="k_proj", **attrs):
            super().__init__()
            setattr(self, q, nn.Linear(8, 8))
            setattr(self, k, nn.Linear(8, 8))
            self.__dict__.update(attrs)

    assert attention_style(nn.MultiheadAttention(8, 2)) == "torch_mha"
    assert attention_style(Proj(num_heads=2)) == "batch_first"
    assert attention_style(Proj(q="query", k="key", num_attention_heads=2)) == "hf_bert"
    assert attention_style(Proj()) is None  # projections without a head count: not read
    assert attention_style(nn.Linear(8, 8)) is None
    fairseq_like = type("MultiheadAttention", (Proj,), {"__module__": "fairseq.modules.multihead_attention"})
    assert attention_style(fairseq_like(num_heads=2)) == "fairseq"
    assert heads(Proj(n_heads=4)) == 4 and heads(Proj(heads=0)) is None
    assert heads(Proj(config=type("Cfg", (), {"num_attention_heads": 3})())) == 3
    normed = Proj(num_heads=2)
    normed.q_norm, normed.k_norm = nn.LayerNorm(4), nn.LayerNorm(4)
    assert qk_normed(normed) and not qk_normed(Proj(num_heads=2))
