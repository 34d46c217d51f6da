"""The exact-gradient measurement of benchmarks.reinmax_vae_gradients: the enumeration against finite
differences, the decoder lookup against backpropagation, the statistics against known answers."""

import numpy as np
import torch

from benchmarks import reinmax_vae_gradients as vg
from benchmarks.reinmax_vae_mnist import VAE
from reinmax import estimate


def _tiny(B=2, L=2, C=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, L, C)) * 1.5, rng.normal(size=(B, C ** L)) * 10 + 50


def test_exact_gradient_is_the_finite_difference_of_the_enumerated_neg_elbo():
    theta, f = _tiny()
    grad = vg.exact_gradient(theta, f)
    fd = np.zeros_like(theta)
    h = 1e-6
    for idx in np.ndindex(theta.shape):
        up, down = theta.copy(), theta.copy()
        up[idx] += h
        down[idx] -= h
        fd[idx] = (vg.neg_elbo(up, f).sum() - vg.neg_elbo(down, f).sum()) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6)
    assert np.abs(grad).max() > 0.1  # not a trivially small case


def test_neg_elbo_by_explicit_loops():
    theta, f = _tiny(B=1, L=2, C=3, seed=1)
    pi = np.exp(theta[0]) / np.exp(theta[0]).sum(-1, keepdims=True)
    expected = sum(pi[0, a] * pi[1, b] * f[0, 3 * a + b] for a in range(3) for b in range(3))  # first latent major
    kl = sum(pi[l, c] * np.log(3 * pi[l, c]) for l in range(2) for c in range(3))
    np.testing.assert_allclose(vg.neg_elbo(theta, f)[0], expected + kl, rtol=1e-12)
    assert vg.codes(3, 2)[5].tolist() == [1, 2]


def test_lookup_samples_are_the_gradients_of_backpropagating_through_the_decoder():
    torch.manual_seed(0)
    model = VAE(3, 2)
    x = torch.rand(3, 784)
    with torch.no_grad():
        theta = model.logits(x)
    f, G = vg.decoder_table(model, x)
    for name, tau in (("reinmax", 1.3), ("gumbel_rao", 0.5), ("gapped_straight_through", 1.0)):
        got = vg.estimator_samples(name, theta, tau, f, G, 4, torch.Generator().manual_seed(5))
        rep = theta.unsqueeze(0).expand(4, 3, 2, 3).clone().requires_grad_()
        y_hard, q = estimate(name, rep, tau, generator=torch.Generator().manual_seed(5),
                             **({"k": vg.GR_K} if name == "gumbel_rao" else {}))
        kl = (q * (q.clamp_min(1e-20).log() + np.log(3))).sum()
        (want,) = torch.autograd.grad(model.reconstruction(y_hard, x).sum() + kl, rep)
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)
    # the table's values are the model's own -log p(x|z)
    z = torch.nn.functional.one_hot(torch.tensor(vg.codes(3, 2)), 3).float()
    torch.testing.assert_close(f.float(), torch.stack([model.reconstruction(z, xi) for xi in x]), rtol=1e-5, atol=1e-3)


def test_the_control_is_unbiased_and_straight_through_is_exact_for_a_linear_decoder():
    theta, f = _tiny(B=1, L=2, C=3, seed=2)
    exact = vg.exact_gradient(theta, f)
    q = vg.quality(vg.score_function_samples(theta, f, 100_000, np.random.default_rng(0)), exact)
    assert q["bias_rel"] < 3 * q["bias_noise"] and q["var_rel"] > 0.01
    # a biased estimator is seen as biased: the control without its KL term
    biased = vg.score_function_samples(theta, f, 100_000, np.random.default_rng(0)) * 0.9
    assert vg.quality(biased, exact)["bias_rel"] > 10 * q["bias_noise"]
    # f(z) = a . onehot(z): straight-through at tau 1 has the exact gradient J(pi) a in every draw
    a = np.random.default_rng(3).normal(size=(1, 2, 3)) * 5
    fa = (a[0][np.arange(2)[None, :], vg.codes(3, 2)]).sum(-1)[None]  # (1, 9)
    G = torch.from_numpy(a).reshape(1, 1, 6).expand(1, 9, 6)
    draws = vg.estimator_samples("straight_through", torch.from_numpy(theta).float(), 1.0, torch.from_numpy(fa), G,
                                 50, torch.Generator().manual_seed(0)).numpy()
    st = vg.quality(draws, vg.exact_gradient(theta, fa))
    assert st["bias_rel"] < 1e-5 and st["var_rel"] < 1e-10 and st["cos"] > 1 - 1e-6


def test_quality_numbers_on_known_draws():
    e = np.array([3.0, 4.0])
    v = np.array([1.0, 0.0])
    draws = np.stack([e + v, e - v] * 50)  # mean exactly e, every deviation ||v|| = 1
    q = vg.quality(draws, e)
    assert q["bias_rel"] < 1e-12 and abs(q["var_rel"] - 100 / 99 / 25) < 1e-12
    assert abs(q["cos_of_mean"] - 1) < 1e-12 and q["cos"] < 1
    shifted = vg.quality(draws + np.array([0.0, 0.5]), e)
    assert abs(shifted["bias_rel"] - 0.1) < 1e-12


def test_the_study_end_to_end_on_kept_snapshots(tmp_path, shared_data):
    """main() on two runs' snapshots: the shared initialisation measured once, every point in the table, the
    control's bias at the noise level, and a second call served from the cache."""
    from benchmarks.reinmax_vae_long import Member

    for name in ("reinmax", "straight_through"):
        m = Member("8x4", name, 1, tmp_path / "work", snapshot_epochs=(0, 1))
        torch.manual_seed(9)
        with torch.no_grad():
            for p in m.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        m.epoch = 1
        m.save()
    argv = ["--data", str(shared_data / "mnist"), "--work", str(tmp_path / "work"), "--epochs", "0,1",
            "--sweep-epochs", "0", "--estimators", "reinmax,straight_through", "--taus", "1.0", "--images", "2",
            "--samples", "400", "--sweep-samples", "50", "--out", str(tmp_path / "out")]
    res = vg.main(argv)
    assert sorted((p["run"], p["epoch"]) for p in res["points"]) == [("reinmax", 0), ("reinmax", 1),
                                                                     ("straight_through", 0), ("straight_through", 1)]
    init = [p for p in res["points"] if p["epoch"] == 0]
    assert init[0]["estimators"] == init[1]["estimators"]  # one measurement of the common initialisation
    assert set(init[0]["estimators"]["reinmax"]) == {"1", "1.3"}  # the sweep (1.0) and the Table-8 tau
    later = next(p for p in res["points"] if p["run"] == "straight_through" and p["epoch"] == 1)
    assert set(later["estimators"]["straight_through"]) == {"1.3"}  # no sweep there
    ctrl = later["estimators"][vg.CONTROL]["-"]
    assert ctrl["bias_rel"] < 3 * ctrl["bias_noise"]
    text = (tmp_path / "out" / "vae_gradients.md").read_text()
    assert "| 1 | ST (1.3) |" in text and "| 0 | ReinMax (1.3) |" in text
    assert len(list((tmp_path / "work" / "gradients_8x4").glob("*.json"))) == 3
    again = vg.main(argv)
    assert again["points"] == res["points"]
