"""stability_toolbox.attention_stats against hand computations of max |q.k|/sqrt(d_head): the projection
styles (batch-first q_proj/k_proj, BERT's query/key, fairseq's time-first inputs), qk-layernorm, the largest
value over a step's calls, and nothing kept on a probe pass."""

import math

import pytest
import torch
from torch import nn

from stability_toolbox.attention_stats import AttentionLogits
from stability_toolbox.quantities import Recorder
from stability_toolbox.sites import attention_style

D, HEADS = 8, 2


class _Attention(nn.Module):
    """Projections named ``q`` / ``k``; the forward only runs them (what the hooks read)."""

    def __init__(self, q="q_proj", k="k_proj", qk_norm=False, time_first=False):
        super().__init__()
        self.q_name, self.k_name, self.time_first = q, k, time_first
        setattr(self, q, nn.Linear(D, D))
        setattr(self, k, nn.Linear(D, D))
        self.num_heads = HEADS
        if qk_norm:
            self.q_norm, self.k_norm = nn.LayerNorm(D), nn.LayerNorm(D)

    def forward(self, query, key=None):
        if self.time_first:  # fairseq hands the weights to a functional call: the projections are not called
            return query
        q = getattr(self, self.q_name)(query)
        k = getattr(self, self.k_name)(query if key is None else key)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k


_Fairseq = type("MultiheadAttention", (_Attention,), {"__module__": "fairseq.modules.multihead_attention"})


def _by_hand(module, query, key):
    """max |q.k|/sqrt(d_head) with batch-first ``query`` / ``key``."""
    with torch.no_grad():
        q, k = getattr(module, module.q_name)(query), getattr(module, module.k_name)(key)
        if hasattr(module, "q_norm"):
            q, k = module.q_norm(q), module.k_norm(k)
        qh = q.view(*q.shape[:2], HEADS, D // HEADS).transpose(1, 2)
        kh = k.view(*k.shape[:2], HEADS, D // HEADS).transpose(1, 2)
        return (qh @ kh.transpose(-1, -2)).abs().max().item() / math.sqrt(D // HEADS)


def _run(module, *calls, phase=None):
    rec = Recorder(probe_rows=2)
    stats, handles = AttentionLogits([("attn", module, attention_style(module))], rec), []
    stats.arm(handles)
    try:
        with torch.no_grad():
            for args in calls:
                if phase == "probe":
                    with rec.probing():
                        module(*args)
                else:
                    module(*args)
    finally:
        for h in handles:
            h.remove()
    return stats


@pytest.mark.parametrize("make", [lambda: _Attention(), lambda: _Attention("query", "key"),
                                  lambda: _Attention(qk_norm=True), lambda: _Attention("query", "key", qk_norm=True)])
def test_projection_styles_and_qk_norm_by_hand(make):
    torch.manual_seed(0)
    module = make()
    x, y = torch.randn(2, 5, D), torch.randn(2, 3, D) * 4
    stats = _run(module, (x,), (x, y))  # self- and cross-attention: the larger over the step
    want = max(_by_hand(module, x, x), _by_hand(module, x, y))
    assert stats.maxima["attn"].item() == pytest.approx(want, rel=1e-5)
    stats.clear()
    assert stats.maxima == {}


def test_fairseq_attention_is_projected_from_its_time_first_inputs():
    torch.manual_seed(0)
    module = _Fairseq(time_first=True)
    assert attention_style(module) == "fairseq"
    x, y = torch.randn(5, 2, D), torch.randn(3, 2, D)  # (time, batch, features)
    stats = _run(module, (x, y))
    want = _by_hand(module, x.transpose(0, 1), y.transpose(0, 1))
    assert stats.maxima["attn"].item() == pytest.approx(want, rel=1e-5)
    assert _run(module, (x,)).maxima["attn"].item() == pytest.approx(
        _by_hand(module, x.transpose(0, 1), x.transpose(0, 1)), rel=1e-5)  # key=None: self-attention


def test_torch_mha_with_separate_projection_weights():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, HEADS, kdim=4, vdim=4, batch_first=True)  # kdim != d: q_proj_weight / k_proj_weight
    x, y = torch.randn(2, 5, D), torch.randn(2, 3, 4)
    stats = _run(mha, (x, y, y))
    with torch.no_grad():
        q = nn.functional.linear(x, mha.q_proj_weight, mha.in_proj_bias[:D]).view(2, 5, HEADS, 4).transpose(1, 2)
        k = nn.functional.linear(y, mha.k_proj_weight, mha.in_proj_bias[D:2 * D]).view(2, 3, HEADS, 4).transpose(1, 2)
        want = (q @ k.transpose(-1, -2)).abs().max().item() / 2.0
    assert stats.maxima["attn"].item() == pytest.approx(want, rel=1e-5)


def test_nothing_is_kept_on_a_probe_pass():
    module = _Attention()
    stats = _run(module, (torch.randn(2, 5, D),), phase="probe")
    assert stats.maxima == {"attn": None}
