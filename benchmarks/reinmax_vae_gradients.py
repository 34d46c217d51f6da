"""How close each estimator's gradient is to the exact one, in the 8x4 categorical VAE (C^L = 4096 codes).

The exact gradient of the -ELBO of an image with respect to its encoder logits ``theta`` (L x C) is computed by
enumeration, in float64 NumPy, without the estimators' code: with ``pi = softmax(theta)``,
``q(z) = prod_l pi[l, z_l]`` and ``f(z)`` the decoder's summed BCE for code ``z``::

    d E_q[f] / d theta[l, c] = sum_{z: z_l = c} q(z) f(z)  -  pi[l, c] E_q[f]
    d KL(q || uniform) / d theta[l, c] = pi[l, c] (log pi[l, c] - sum_c' pi[l, c'] log pi[l, c'])

(:func:`exact_gradient`; tested against finite differences on a tiny case). An estimator's sample is the gradient
training would get: its one-hot ``y_hard`` fed to the decoder, the KL taken from ``y_soft`` (exact for every
estimator). Because ``y_hard`` is exactly one-hot, the decoder's gradient at it is that of the sampled code, so
the decoder is run once over all 4096 codes (values ``f`` and input gradients ``G``) and each estimator sample
looks its code up (:func:`estimator_samples`; tested equal to backpropagating through the decoder).

Per (model, estimator, tau), over ``--samples`` draws (``--sweep-samples`` for the taus of the sweep) of the whole
batch's latents (one training step's gradient each), relative to the exact gradient ``g`` of the batch:

- cosine: of a single draw to ``g`` (mean, 95% CI over draws), and of the mean of all draws;
- relative bias ``||mean - g|| / ||g||`` with its Monte Carlo noise ``sqrt(tr Cov / S) / ||g||`` (a bias not above
  about twice the noise is not distinguishable from 0);
- relative variance ``E||draw - mean||^2 / ||g||^2`` (95% CI over draws).

The unbiased control is the score-function (REINFORCE) estimator with the exact E_q[f] as baseline, written
here in NumPy: its measured bias must be at the noise level, which checks the measurement itself.

Models: each estimator's seed-1 run of :mod:`benchmarks.reinmax_vae_long` at the epochs kept (``e{epoch}.pt``).

    python -m benchmarks.reinmax_vae_gradients --work work/vae_long --epochs 0,10,20,30,40,50
"""

import argparse
import copy
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import mnist
from benchmarks.harness import machine
from benchmarks.reinmax_vae_long import GR_K, LABELS, member_dir
from benchmarks.reinmax_vae_mnist import VAE, splits
from benchmarks.reinmax_vae_paper import NAMES, PAPER
from benchmarks.sweep import parse_list, recorded_command, write_json
from reinmax import estimate

REPO = Path(__file__).resolve().parents[1]
TAUS = [0.3, 0.5, 0.7, 1.0, 1.3, 1.5, 2.0]
CONTROL = "score_function"


# --------------------------------------------------------------------------------------------------------------
# the exact gradient, by enumeration (NumPy, float64; nothing from the estimators)


def codes(C: int, L: int) -> np.ndarray:
    """All C^L codes as (C^L, L) integers, the first latent most significant (code k = sum_l z_l C^(L-1-l))."""
    return np.array(list(itertools.product(range(C), repeat=L)), dtype=np.int64).reshape(-1, L)


def softmax(theta: np.ndarray) -> np.ndarray:
    e = np.exp(theta - theta.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def code_probabilities(theta: np.ndarray) -> np.ndarray:
    """q(z) for every code: (B, C^L) from logits (B, L, C)."""
    B, L, C = theta.shape
    pi = softmax(theta)
    z = codes(C, L)
    return np.prod(pi[:, np.arange(L)[None, :], z], axis=-1)


def neg_elbo(theta: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(B,) exact -ELBO: E_q[f] + KL(q || uniform), from logits (B, L, C) and code values f (B, C^L)."""
    B, L, C = theta.shape
    pi = softmax(theta)
    kl = (pi * np.log(pi * C)).sum((-1, -2))
    return (code_probabilities(theta) * f).sum(-1) + kl


def exact_gradient(theta: np.ndarray, f: np.ndarray) -> np.ndarray:
    """d(sum_b -ELBO_b)/d theta, (B, L, C), by enumeration over the C^L codes (see the module docstring)."""
    theta = np.asarray(theta, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    B, L, C = theta.shape
    pi = softmax(theta)
    q = code_probabilities(theta)  # (B, K)
    z = codes(C, L)  # (K, L)
    qf = q * f
    expected = qf.sum(-1)  # (B,)
    grad = np.zeros_like(theta)
    for l in range(L):
        for c in range(C):
            grad[:, l, c] = qf[:, z[:, l] == c].sum(-1)
    grad -= pi * expected[:, None, None]
    logpi = np.log(pi)
    grad += pi * (logpi - (pi * logpi).sum(-1, keepdims=True))
    return grad


def score_function_samples(theta: np.ndarray, f: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """The unbiased control: (S, B, L, C) draws of (f(z) - E_q[f]) d log q(z)/d theta + the exact KL gradient."""
    B, L, C = theta.shape
    pi = softmax(theta)
    expected = (code_probabilities(theta) * f).sum(-1)
    u = rng.random((samples, B, L, 1))
    z = np.minimum((u > np.cumsum(pi, -1)[None]).sum(-1), C - 1)  # (S, B, L) inverse-CDF draws
    k = (z * C ** np.arange(L - 1, -1, -1)).sum(-1)  # (S, B)
    fz = f[np.arange(B)[None, :], k]  # (S, B)
    onehot = np.eye(C)[z]  # (S, B, L, C)
    logpi = np.log(pi)
    kl_grad = pi * (logpi - (pi * logpi).sum(-1, keepdims=True))
    return (fz - expected[None])[..., None, None] * (onehot - pi[None]) + kl_grad[None]


# --------------------------------------------------------------------------------------------------------------
# the model's side: code values, input gradients, estimator samples


def decoder_table(model: VAE, x: torch.Tensor):
    """``f`` (B, K): summed BCE of each image under each code; ``G`` (B, K, L*C): its gradient with respect to
    the decoder's input at that one-hot code. float64."""
    C, L = model.C, model.L
    decoder = copy.deepcopy(model.decoder).double()
    z = F.one_hot(torch.from_numpy(codes(C, L)), C).double().flatten(-2).requires_grad_()  # (K, L*C)
    out = decoder(z)  # (K, 784) logits
    xd = x.double()
    f = F.softplus(out).sum(-1)[None] - xd @ out.T  # BCE with logits summed over pixels: (B, K)
    G = torch.stack([torch.autograd.grad(f[b].sum(), z, retain_graph=b < len(x) - 1)[0] for b in range(len(x))])
    return f.detach(), G


def estimator_samples(name: str, theta: torch.Tensor, tau: float, f: torch.Tensor, G: torch.Tensor, samples: int,
                      gen: torch.Generator, chunk: int = 250) -> torch.Tensor:
    """(S, B, L, C) float64 draws of the -ELBO gradient (summed over the batch) that estimator ``name`` gives
    training, with logits ``theta`` (B, L, C): the decoder's gradient at the sampled code from the table ``G``,
    the KL from ``y_soft`` as in :meth:`VAE.neg_elbo`."""
    B, L, C = theta.shape
    weights = C ** torch.arange(L - 1, -1, -1)
    opts = {"k": GR_K} if name == "gumbel_rao" else {}
    out = []
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        rep = theta.detach().float().unsqueeze(0).expand(n, B, L, C).clone().requires_grad_()
        y_hard, q = estimate(name, rep, tau, generator=gen, **opts)
        k = (y_hard.detach().argmax(-1) * weights).sum(-1)  # (n, B)
        g = G[torch.arange(B)[None, :], k].view(n, B, L, C).float()
        kl = (q * (q.clamp_min(1e-20).log() + math.log(C))).sum()
        (grad,) = torch.autograd.grad((y_hard * g).sum() + kl, rep)
        out.append(grad.double())
    return torch.cat(out)


def quality(draws: np.ndarray, exact: np.ndarray) -> dict:
    """The statistics of the module docstring, from draws (S, ...) and the exact gradient (...)."""
    S = len(draws)
    d = draws.reshape(S, -1)
    e = exact.reshape(-1)
    en = np.linalg.norm(e)
    mean = d.mean(0)
    dev2 = ((d - mean) ** 2).sum(1) * S / max(S - 1, 1)  # unbiased per-draw squared deviation
    cos = d @ e / (np.linalg.norm(d, axis=1) * en + 1e-300)
    var_rel = dev2.mean() / en ** 2
    noise = math.sqrt(dev2.mean() / S) / en
    bias = float(np.linalg.norm(mean - e) / en)
    return {"samples": S, "cos": float(cos.mean()), "cos_ci": float(1.96 * cos.std(ddof=1) / math.sqrt(S)),
            "cos_of_mean": float(mean @ e / (np.linalg.norm(mean) * en + 1e-300)),
            "bias_rel": bias, "bias_noise": noise,
            "bias_rel_debiased": math.sqrt(max(bias ** 2 - noise ** 2, 0.0)),
            "var_rel": float(var_rel), "var_ci": float(1.96 * (dev2 / en ** 2).std(ddof=1) / math.sqrt(S)),
            "exact_norm": float(en)}


def measure_model(model: VAE, x: torch.Tensor, plan: Dict[str, Dict[float, int]], control_samples: int, seed: int
                  ) -> dict:
    """Every estimator at each of its taus, with the number of draws ``plan[name][tau]``, and the control (if
    ``control_samples``) on ``model`` for the images ``x``."""
    with torch.no_grad():
        theta = model.logits(x).double()
    f, G = decoder_table(model, x)
    exact = exact_gradient(theta.numpy(), f.numpy())
    out = {"exact_norm": float(np.linalg.norm(exact)), "neg_elbo": float(neg_elbo(theta.numpy(), f.numpy()).mean()),
           "entropy": float(-(softmax(theta.numpy()) * np.log(softmax(theta.numpy()))).sum(-1).mean()),
           "estimators": {}}
    for name, taus in plan.items():
        for tau, samples in taus.items():
            gen = torch.Generator().manual_seed(seed)
            draws = estimator_samples(name, theta, tau, f, G, samples, gen).numpy()
            out["estimators"].setdefault(name, {})[f"{tau:g}"] = quality(draws, exact)
    if control_samples:
        draws = score_function_samples(theta.numpy(), f.numpy(), control_samples, np.random.default_rng(seed))
        out["estimators"][CONTROL] = {"-": quality(draws, exact)}
    return out


# --------------------------------------------------------------------------------------------------------------
# report


def _fmt(v: dict) -> str:
    return (f"{v['cos']:.3f} +- {v['cos_ci']:.3f} | {v['cos_of_mean']:.3f} | {v['bias_rel']:.3f} (noise "
            f"{v['bias_noise']:.3f}) | {v['var_rel']:.2f} +- {v['var_ci']:.2f}")


def tables(results: dict, cfg: str, command: str) -> str:
    points = results["points"]
    names = [n for n in NAMES if any(n == p["run"] for p in points)]
    epochs = sorted({p["epoch"] for p in points})
    lines = [f"Gradient of the {cfg} VAE's -ELBO with respect to the encoder logits, each estimator against the exact "
             f"gradient (enumeration over all {results['codes']} codes, KL analytic), {results['images']} test images "
             f"as one batch, {results['samples']} draws per (model, estimator) at the Table-8 tau and for the control, "
             f"{results['sweep_samples']} per point of the tau sweep. Models: each estimator's own "
             f"seed-1 run of `benchmarks.reinmax_vae_long` at the epoch named (epoch 0: the common initialisation). "
             "cos: of one draw (what one training step sees; mean +- 95% CI); cos(mean): of the mean of all draws; "
             "bias: ||mean - exact|| / ||exact||, with the Monte Carlo noise of that number (bias at or below ~2x noise "
             "is indistinguishable from 0); var: E||draw - mean||^2 / ||exact||^2 (+- 95% CI). "
             f"Control: the score-function estimator with the exact baseline (unbiased by construction). Gumbel-Rao "
             f"k={GR_K}.", "",
             "**1. Each estimator at its Table-8 tau, on its own training run**", "",
             "| epoch | estimator (tau) | cos (one draw) | cos(mean) | rel. bias | rel. variance |", "|---|---|---|---|---|---|"]
    for ep in epochs:
        for n in names:
            p = next((p for p in points if p["run"] == n and p["epoch"] == ep), None)
            if p is None:
                continue
            tau = PAPER[cfg][n][1]
            lines.append(f"| {ep} | {LABELS[n]} ({tau:g}) | {_fmt(p['estimators'][n][f'{tau:g}'])} |")
        p = next((p for p in points if p["run"] == "reinmax" and p["epoch"] == ep), None)
        if p is not None and CONTROL in p["estimators"]:
            lines.append(f"| {ep} | control: score function (on ReinMax's run) | {_fmt(p['estimators'][CONTROL]['-'])} |")
    lines += ["", "**2. The same model for everyone: all estimators at their Table-8 tau on ReinMax's run** (and on "
              "straight-through's)", "",
              "| run | epoch | estimator (tau) | cos (one draw) | cos(mean) | rel. bias | rel. variance |",
              "|---|---|---|---|---|---|---|"]
    for run in ("reinmax", "straight_through"):
        for ep in epochs:
            p = next((p for p in points if p["run"] == run and p["epoch"] == ep), None)
            if p is None or (ep == 0 and run != "reinmax"):
                continue
            for n in names + [CONTROL]:
                if n not in p["estimators"]:
                    continue
                if n == CONTROL:
                    lines.append(f"| {LABELS[run]} | {ep} | control | {_fmt(p['estimators'][n]['-'])} |")
                    continue
                tau = PAPER[cfg][n][1]
                lines.append(f"| {LABELS[run]} | {ep} | {LABELS[n]} ({tau:g}) | {_fmt(p['estimators'][n][f'{tau:g}'])} |")
    taus = results["taus"]
    for key, title in (("bias_rel", "relative bias"), ("cos", "cosine of one draw")):
        lines += ["", f"**3{'ab'[key == 'cos']}. Tau sweep, {title}** (each estimator on its own run; Table-8 tau in bold)",
                  "", "| estimator | epoch | " + " | ".join(f"tau {t:g}" for t in taus) + " |",
                  "|---|---|" + "---|" * len(taus)]
        for n in names:
            for ep in epochs:
                p = next((p for p in points if p["run"] == n and p["epoch"] == ep), None)
                if p is None:
                    continue
                if len(p["estimators"][n]) < 2:
                    continue  # this point was measured at the Table-8 tau only
                cells = []
                for t in taus:
                    v = p["estimators"][n].get(f"{t:g}")
                    txt = "" if v is None else f"{v[key]:.3f}"
                    cells.append(f"**{txt}**" if v is not None and abs(t - PAPER[cfg][n][1]) < 1e-9 else txt)
                lines.append(f"| {LABELS[n]} | {ep} | " + " | ".join(cells) + " |")
    unique = [p for p in points if p["epoch"] > 0 or p["run"] == points[0]["run"]]
    walls = [p["wall_s"] for p in unique]
    lines += ["", "exact gradient norm, exact -ELBO of these images and mean latent entropy (max log C) per point: "
              + "; ".join(f"{'init' if p['epoch'] == 0 else LABELS[p['run']] + ' e' + str(p['epoch'])}: |g| "
                          f"{p['exact_norm']:.2f}, -ELBO {p['neg_elbo']:.1f}, entropy {p['entropy']:.2f}" for p in unique),
              f"wall: {sum(walls) / 60:.0f} min for {len(unique)} points ({min(walls) / 60:.1f}-{max(walls) / 60:.1f} min "
              "each, one thread on a shared 2-core machine; a point with the tau sweep costs the most)",
              f"command: {command}", f"machine: {machine()}"]
    return "\n".join(lines)


def plot(results: dict, cfg: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = results["points"]
    names = [n for n in NAMES if any(n == p["run"] for p in points)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for j, n in enumerate(names):
        tau = f"{PAPER[cfg][n][1]:g}"
        own = sorted((p for p in points if p["run"] == n), key=lambda p: p["epoch"])
        ep = [p["epoch"] for p in own]
        vals = [p["estimators"][n][tau] for p in own]
        axes[0].errorbar(ep, [v["cos"] for v in vals], yerr=[v["cos_ci"] for v in vals], color=f"C{j}", marker="o",
                         capsize=2, label=f"{LABELS[n]} (tau {tau})")
        axes[1].errorbar(ep, [v["bias_rel"] for v in vals], yerr=[2 * v["bias_noise"] for v in vals], color=f"C{j}",
                         marker="o", capsize=2)
        axes[2].errorbar(ep, [v["var_rel"] for v in vals], yerr=[v["var_ci"] for v in vals], color=f"C{j}",
                         marker="o", capsize=2)
    ctrl = sorted((p for p in points if p["run"] == "reinmax" and CONTROL in p["estimators"]), key=lambda p: p["epoch"])
    if ctrl:
        axes[1].plot([p["epoch"] for p in ctrl], [p["estimators"][CONTROL]["-"]["bias_rel"] for p in ctrl], "k--",
                     label="unbiased control")
        axes[1].legend(fontsize=7)
    axes[0].set(xlabel="epoch of the estimator's own run", ylabel="cosine to exact (one draw)", title="cosine")
    axes[1].set(xlabel="epoch", ylabel="||mean - exact|| / ||exact||", title="relative bias (+- 2x MC noise)")
    axes[2].set(xlabel="epoch", ylabel="E||draw - mean||^2 / ||exact||^2", title="relative variance", yscale="log")
    for ax in axes:
        ax.title.set_fontsize(9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=mnist.DEFAULT_ROOT)
    ap.add_argument("--work", type=Path, default=REPO.parent / "runs" / "vae_long", help="the long run's folder")
    ap.add_argument("--config", default="8x4")
    ap.add_argument("--epochs", default="0,10,20,30,40,50", help="training points (those kept by the long run)")
    ap.add_argument("--seed-run", type=int, default=1, help="which seed's runs are the models")
    ap.add_argument("--estimators", default=",".join(NAMES))
    ap.add_argument("--taus", default=",".join(map(str, TAUS)), help="the sweep (the Table-8 tau is always added)")
    ap.add_argument("--sweep-epochs", default="0,10,50", help="training points that get the tau sweep (the others: "
                    "every estimator at its Table-8 tau only)")
    ap.add_argument("--images", type=int, default=32, help="test images in the batch")
    ap.add_argument("--samples", type=int, default=10000, help="draws per (model, estimator) at its Table-8 tau")
    ap.add_argument("--sweep-samples", type=int, default=2000, help="draws per (model, estimator, tau) of the sweep")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "reinmax")
    args = ap.parse_args(argv)
    names = parse_list(ap, "--estimators", args.estimators, str, positive=False)
    epochs = parse_list(ap, "--epochs", args.epochs, int, positive=False)
    sweep_epochs = set(parse_list(ap, "--sweep-epochs", args.sweep_epochs, int, positive=False))
    taus = parse_list(ap, "--taus", args.taus)
    if args.config not in PAPER or not set(names) <= set(NAMES):
        ap.error(f"--config / --estimators: choose from {', '.join(PAPER)} / {', '.join(NAMES)}")
    C, L = (int(v) for v in args.config.split("x"))
    if C ** L > 20000:
        ap.error(f"--config {args.config}: {C ** L} codes are too many to enumerate")
    reason = mnist.missing(args.data)
    if reason is not None:
        print(f"skipped: {reason}; pass --data", flush=True)
        return None
    torch.set_num_threads(args.threads)
    _, _, test = splits(args.data, "cpu")
    x = test[:args.images]
    t0 = time.time()
    cache = args.work / f"gradients_{args.config}"
    cache.mkdir(parents=True, exist_ok=True)
    points = []
    all_taus = sorted(set(taus) | {PAPER[args.config][n][1] for n in names})
    for ep in epochs:  # training point by training point, so that an early stop leaves whole epochs
        for n in names:
            snap = member_dir(args.work, args.config, n, args.seed_run) / f"e{ep}.pt"
            sweep = ep in sweep_epochs
            stem = f"{n}-s{args.seed_run}-e{ep}-{args.images}-{args.samples}"
            done = cache / (stem + (f"-sweep{args.sweep_samples}" if sweep else "") + ".json")
            with_sweep = cache / f"{stem}-sweep{args.sweep_samples}.json"  # a superset of the point without it
            if done.exists() or with_sweep.exists():
                points.append(json.loads((done if done.exists() else with_sweep).read_text()))
                continue
            if not snap.exists():
                print(f"  {n} epoch {ep}: no snapshot yet ({snap})", flush=True)
                continue
            if ep == 0 and any(p["epoch"] == 0 for p in points):
                shared = next(p for p in points if p["epoch"] == 0)  # the common initialisation: measured once
                points.append({**shared, "run": n})
                continue
            model = VAE(C, L)
            model.load_state_dict(torch.load(snap, weights_only=True))
            t1 = time.time()
            plan = {m: {**{t: args.sweep_samples for t in (all_taus if sweep else [])},
                        PAPER[args.config][m][1]: args.samples} for m in names}
            r = measure_model(model, x, plan, args.samples, seed=2)
            r.update(run=n, epoch=ep, seed=args.seed_run, wall_s=time.time() - t1)
            write_json(done, r)
            points.append(r)
            tau = f"{PAPER[args.config][n][1]:g}"
            print(f"[{time.strftime('%H:%M:%S')}] {n} epoch {ep} ({r['wall_s']:.0f} s): own estimator cos "
                  f"{r['estimators'][n][tau]['cos']:.3f} bias {r['estimators'][n][tau]['bias_rel']:.3f}; control bias "
                  f"{r['estimators'][CONTROL]['-']['bias_rel']:.3f} (noise {r['estimators'][CONTROL]['-']['bias_noise']:.3f})",
                  flush=True)
    results = {"config": args.config, "codes": C ** L, "images": args.images, "samples": args.samples,
               "sweep_samples": args.sweep_samples,
               "taus": all_taus, "points": points, "wall_s": time.time() - t0}
    command = recorded_command("benchmarks.reinmax_vae_gradients", argv if argv is not None else sys.argv[1:])
    text = tables(results, args.config, command)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "vae_gradients.json", results)
    (args.out / "vae_gradients.md").write_text(text + "\n")
    plot(results, args.config, args.out / "vae_gradients.png")
    print(text, flush=True)
    return results


if __name__ == "__main__":
    main()
