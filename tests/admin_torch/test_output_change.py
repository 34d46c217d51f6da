"""The output-change estimator against a closed form, and its growth with depth per kind."""

import pytest
import torch
from torch import nn

from admin_torch import make_stack, output_change, residual_betas


def test_linear_model_closed_form():
    # F(x) = W x with delta_W = s * rms(W) * eps: E||delta_W x||^2 = out_dim * s^2 * rms(W)^2 * ||x||^2
    lin = nn.Linear(5, 3, bias=False)
    x = torch.randn(4, 5)
    s = 0.1
    rms2 = lin.weight.detach().pow(2).mean().item()
    expected = 3 * s * s * rms2 * x.pow(2).sum(-1).mean().item()
    got = output_change(lin, x, delta_scale=s, num_samples=1500, seed=1)
    assert got == pytest.approx(expected, rel=0.08)


def test_weights_restored_and_deterministic():
    model = make_stack("post_ln", 2, 8, seed=0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8)
    a = output_change(model, x, num_samples=2, seed=5)
    b = output_change(model, (x,), num_samples=2, seed=5)
    assert a == b > 0
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_scales_with_delta_squared():
    model = make_stack("post_ln", 3, 16, seed=0)
    x = torch.randn(2, 4, 16)
    small, large = (output_change(model, x, delta_scale=s, num_samples=4, seed=0) for s in (1e-3, 2e-3))
    assert large / small == pytest.approx(4.0, rel=0.02)


@pytest.fixture(scope="module")
def growth():
    """Output change at depth 6 and 48 (FFN stacks, N = depth sublayers) for each kind."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 32)
    out = {}
    for name, kind, scale in [("post_ln", "post_ln", "O(n)"), ("pre_ln", "pre_ln", "O(n)"),
                              ("admin_logn", "admin", "O(logn)"), ("admin_1", "admin", "O(1)")]:
        out[name] = [output_change(make_stack(kind, d, 32, scale=scale, sublayers="ffn", seed=d), x,
                                   num_samples=4, seed=0) for d in (6, 48)]
    return out


def test_growth_ordering(growth):
    ratio = {k: v[1] / v[0] for k, v in growth.items()}
    # theory for 8x the depth: O(N) -> ~8, O(log N) -> ~ln(49)/ln(7) = 2, O(1) -> ~1
    assert ratio["post_ln"] > 4
    assert ratio["admin_1"] < 1.5
    assert ratio["admin_1"] < ratio["admin_logn"] < ratio["post_ln"]
    assert ratio["pre_ln"] < ratio["post_ln"]
    # at depth 48 Admin's output change is far below Post-LN's
    assert growth["admin_logn"][1] < growth["post_ln"][1] / 4


def test_bad_input():
    with pytest.raises(TypeError, match="model"):
        output_change(lambda x: x, torch.randn(2))
    with pytest.raises(ValueError, match="num_samples"):
        output_change(nn.Linear(2, 2), torch.randn(2), num_samples=0)
    with pytest.raises(ValueError, match="delta_scale"):
        output_change(nn.Linear(2, 2), torch.randn(2), delta_scale=-1)
    with pytest.raises(ValueError, match="param_filter"):
        output_change(nn.LayerNorm(2), torch.randn(2))


def test_residual_betas_by_hand():
    model = make_stack("admin", 2, 8, sublayers="ffn", seed=0)
    x = torch.randn(3, 4, 8)
    betas = residual_betas(model, x)
    expected = []
    with torch.no_grad():
        h = model.input_norm(x)
        for f, res, ln in zip(model.sublayers, model.residuals, model.norms):
            fx = f(h)
            s = h * res.omega + fx
            expected.append(fx.var(unbiased=False).item() / s.var(unbiased=False).item())
            h = ln(s)
    assert betas == pytest.approx(expected, rel=1e-5)


def test_theorem_output_change_tracks_beta_sum():
    # Admin paper, Theorem 3: output change ~ C * delta^2 * sum_i beta_i. For ReLU FFN sublayers
    # (homogeneous: a relative perturbation delta of W1 or of W2 changes f by delta^2 Var f per
    # feature) the constant is C = 2 * dim, the same for every kind and depth.
    dim = 64
    x = torch.randn(4, 8, dim)
    for kind, scale, depth in [("post_ln", "O(n)", 6), ("pre_ln", "O(n)", 24), ("admin", "O(logn)", 24),
                               ("admin", "O(1)", 6), ("deepnorm", "O(n)", 12)]:
        model = make_stack(kind, depth, dim, scale=scale, sublayers="ffn", seed=depth)
        c = output_change(model, x, num_samples=4, seed=0) / (1e-4 * sum(residual_betas(model, x)))
        assert 0.8 < c / (2 * dim) < 1.25, (kind, scale, c)


def test_benchmark_command_runs(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "output_change.py"
    spec = importlib.util.spec_from_file_location("bench_output_change", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--depths", "2", "4", "--seeds", "1", "--samples", "1", "--dim", "16", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "output_change.json").read_text())
    assert data["N"] == [2, 4] and {r["variant"] for r in data["rows"]} >= {"Post-LN", "Pre-LN", "Admin O(1)"}
    assert (tmp_path / "output_change.png").stat().st_size > 10_000
    assert (tmp_path / "output_change.md").exists()
