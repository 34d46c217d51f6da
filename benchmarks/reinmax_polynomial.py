"""Polynomial programming (ReinMax paper, Sec. 6.1) for every estimator, scaled to a small CPU budget.

128 binary latents z_i ~ Bernoulli(softmax(theta_i)[1]), loss = mean_i |z_i - 0.45|^p, p in {1.5, 2, 3};
theta ~ U(-0.01, 0.01); Adam lr 1e-3, batch 64, tau 1.0. All seeds and all p run at once as one
batched parameter (Adam is element-wise, so this equals independent runs). The loss is separable,
so the exact gradient of the expected loss is known in closed form per latent:
d/dtheta E[loss] = (0.55^p - 0.45^p) / 128 * dpi1/dtheta, with dpi1/dtheta = pi0 pi1 (-1, +1).

Reports: last-epoch training loss (mean of the sampled loss over the last epoch), the exact expected loss
at the end, and the gradient bias (||E[g_hat] - g|| / ||g||, cosine) at initialization and at
theta ~ N(0, 1), with E[g_hat] averaged over many samples.

    python -m benchmarks.reinmax_polynomial --quick
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks.sweep import recorded_args
from reinmax import estimate

REPO = Path(__file__).resolve().parents[1]

NAMES = ["reinmax", "straight_through", "gumbel_softmax", "gapped_straight_through", "gumbel_rao"]
PS = [1.5, 2.0, 3.0]
LATENTS = 128


def exact_grad(theta, p):
    """theta (..., 128, 2) -> exact gradient of E[mean_i |z_i - 0.45|^p]."""
    pi = torch.softmax(theta, -1)
    c = (0.55 ** p - 0.45 ** p) / LATENTS
    d = pi[..., 0] * pi[..., 1] * c
    return torch.stack([-d, d], -1)


def expected_loss(theta, p):
    pi1 = torch.softmax(theta, -1)[..., 1]
    return (pi1 * 0.55 ** p + (1 - pi1) * 0.45 ** p).mean(-1)


def sampled_loss(name, theta, p_vec, batch, tau, gen, k):
    """theta (P, S, 128, 2); p_vec (P,). Returns per-run losses (P, S)."""
    logits = theta.unsqueeze(2).expand(theta.shape[0], theta.shape[1], batch, LATENTS, 2)
    y_hard, _ = estimate(name, logits, tau, generator=gen, **({"k": k} if name == "gumbel_rao" else {}))
    z = y_hard[..., 1]
    loss = (z - 0.45).abs().pow(p_vec.view(-1, 1, 1, 1)).mean(-1)  # (P, S, batch)
    return loss.mean(-1)


def bias(name, theta, p, tau, samples, k, gen):
    x = theta.clone().requires_grad_()
    chunks = []
    for _ in range(samples // 2000):
        logits = x.unsqueeze(0).expand(2000, *x.shape)
        y_hard, _ = estimate(name, logits, tau, generator=gen, **({"k": k} if name == "gumbel_rao" else {}))
        loss = (y_hard[..., 1] - 0.45).abs().pow(p).mean(-1).sum()
        (g,) = torch.autograd.grad(loss, x)
        chunks.append(g / 2000)
    g_hat = torch.stack(chunks).mean(0)
    g = exact_grad(theta, p)
    rel = float((g_hat - g).norm() / g.norm())
    cos = float(torch.nn.functional.cosine_similarity(g_hat.flatten(), g.flatten(), dim=0))
    return rel, cos


TAUS = [0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0]


def train(name, tau, ps, seeds, seed_base, args):
    """Adam on theta (P, S, 128, 2) for every p in ``ps`` and ``seeds`` seeds at once.

    Returns (theta at the end, last-epoch mean sampled loss (P, S))."""
    p_vec = torch.tensor(ps, device=args.device)
    torch.manual_seed(seed_base)
    gen = torch.Generator(args.device).manual_seed(seed_base)
    theta = torch.nn.Parameter(torch.empty(len(ps), seeds, LATENTS, 2).uniform_(-0.01, 0.01).to(args.device))
    opt = torch.optim.Adam([theta], lr=args.lr)
    for _ in range(args.epochs):
        running = torch.zeros(len(ps), seeds, device=args.device)
        for _ in range(args.steps_per_epoch):
            loss = sampled_loss(name, theta, p_vec, args.batch, tau, gen, args.k)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            running += loss.detach()
    return theta.detach(), running / args.steps_per_epoch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 epochs, taus 0.5 1 1.5, 3 seeds")
    ap.add_argument("--epochs", type=int, default=10, help="paper: 40 (the scale option)")
    ap.add_argument("--steps-per-epoch", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=10, help="final runs at the chosen tau (paper: 10)")
    ap.add_argument("--tuning-seeds", type=int, default=3, help="runs per tau of the grid (other seeds)")
    ap.add_argument("--taus", default=",".join(map(str, TAUS)), help="the tau grid, the same for every estimator")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k", type=int, default=10, help="Gumbel-Rao samples")
    ap.add_argument("--bias-samples", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "reinmax")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.bias_samples, args.taus = 2, 3, 4000, "0.5,1.0,1.5"
    taus = [float(t) for t in args.taus.split(",")]
    torch.set_num_threads(args.threads)
    results, tuning = {}, {}
    t_start = time.process_time()
    for name in NAMES:
        # tuning: every tau of the grid on seeds 1000.., scored by the exact expected loss at the end
        scores = {}
        for tau in taus:
            theta, _ = train(name, tau, PS, args.tuning_seeds, 1000, args)
            scores[tau] = [float(expected_loss(theta[i], p).mean()) for i, p in enumerate(PS)]
        tuning[name] = {str(t): v for t, v in scores.items()}
        chosen = {p: min(taus, key=lambda t: scores[t][i]) for i, p in enumerate(PS)}
        print(f"{name:24s} chosen tau " + " ".join(f"p={p}:{chosen[p]}" for p in PS) +
              f"  ({time.process_time() - t_start:.0f} s CPU)", flush=True)
        r = {}
        for p in PS:  # final: fresh seeds 0.. at the chosen tau
            theta, last = train(name, chosen[p], [p], args.seeds, 0, args)
            exp_loss = expected_loss(theta[0], p)
            gen = torch.Generator(args.device).manual_seed(0)
            init = torch.empty(LATENTS, 2).uniform_(-0.01, 0.01, generator=torch.Generator().manual_seed(7))
            rel0, cos0 = bias(name, init.to(args.device), p, chosen[p], args.bias_samples, args.k, gen)
            rel1, cos1 = bias(name, torch.randn(LATENTS, 2, generator=torch.Generator().manual_seed(1)).to(args.device),
                              p, chosen[p], args.bias_samples, args.k, gen)
            r[str(p)] = {"tau": chosen[p], "train_loss_mean": float(last[0].mean()),
                         "expected_loss_mean": float(exp_loss.mean()), "expected_loss_std": float(exp_loss.std()),
                         "optimum": 0.45 ** p, "bias_rel_init": rel0, "cos_init": cos0, "bias_rel_randn": rel1,
                         "cos_randn": cos1}
        results[name] = r
    cpu_s = time.process_time() - t_start
    lines = [f"Polynomial programming, 128 binary latents, loss mean_i |z_i - 0.45|^p; Adam lr {args.lr}, batch "
             f"{args.batch}, {args.epochs} epochs x {args.steps_per_epoch} steps (paper: 40 epochs). Protocol: the "
             f"same tau grid {taus} for every estimator, {args.tuning_seeds} tuning seeds per tau, tau chosen per "
             f"(estimator, p) by the exact expected loss at the end; then {args.seeds} fresh seeds at that tau "
             f"(mean +- std). Gumbel-Rao k={args.k}; gradient bias from {args.bias_samples} samples at the chosen "
             f"tau; CPU time {cpu_s:.0f} s", "",
             "| estimator | p | tau | exact expected loss - optimum (mean +- std) | rel. bias at init | "
             "cos at init | rel. bias at theta~N(0,1) | cos at N(0,1) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for p, v in r.items():
            edge = " (grid edge)" if v["tau"] in (taus[0], taus[-1]) else ""
            lines.append(f"| {name} | {p} | {v['tau']}{edge} | {v['expected_loss_mean'] - v['optimum']:.2e} +- "
                         f"{v['expected_loss_std']:.1e} | {v['bias_rel_init']:.3f} | {v['cos_init']:.3f} | "
                         f"{v['bias_rel_randn']:.3f} | {v['cos_randn']:.3f} |")
    lines += ["", f"command: python -m benchmarks.reinmax_polynomial --epochs {args.epochs} --steps-per-epoch "
              f"{args.steps_per_epoch} --seeds {args.seeds} --tuning-seeds {args.tuning_seeds} --taus {args.taus} "
              f"--device {args.device}", f"machine: {platform.machine()}, {args.threads} thread(s), {args.device}"]
    table = "\n".join(lines)
    print(table, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reinmax_polynomial.json").write_text(json.dumps(
        {"args": recorded_args(args), "tuning": tuning, "results": results}, indent=1))
    (args.out / "reinmax_polynomial.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PS) + 1, figsize=(14, 3.4))
    for i, p in enumerate(PS):
        for j, name in enumerate(NAMES):
            gaps = [tuning[name][str(t)][i] - 0.45 ** p for t in taus]
            axes[i].plot(taus, gaps, "o-", ms=3, color=f"C{j}", label=name)
        axes[i].set(xlabel="tau", yscale="log", title=f"p={p}: expected loss - optimum (tuning seeds)")
        axes[i].title.set_fontsize(8)
    w = 0.15
    for j, name in enumerate(NAMES):
        xs = [i + (j - 2) * w for i in range(len(PS))]
        axes[-1].bar(xs, [results[name][str(p)]["expected_loss_mean"] - 0.45 ** p for p in PS], w,
                     yerr=[results[name][str(p)]["expected_loss_std"] for p in PS], color=f"C{j}", label=name)
    axes[-1].set_xticks(range(len(PS)), [f"p={p}" for p in PS])
    axes[-1].set(yscale="log", title=f"at the chosen tau, {args.seeds} seeds")
    axes[-1].title.set_fontsize(8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "reinmax_polynomial.png", dpi=120)
    print(f"wrote {args.out}/reinmax_polynomial.{{json,md,png}}", flush=True)


if __name__ == "__main__":
    main()
