"""Polynomial programming (ReinMax paper, Sec. 6.1) for every estimator, scaled to a small CPU budget.

128 binary latents z_i ~ Bernoulli(softmax(theta_i)[1]), loss = mean_i |z_i - 0.45|^p, p in {1.5, 2, 3};
theta ~ U(-0.01, 0.01); Adam lr 1e-3, batch 64, tau 1.0. All seeds and all p run at once as one
batched parameter (Adam is element-wise, so this equals independent runs). The loss is separable,
so the exact gradient of the expected loss is known in closed form per latent:
d/dtheta E[loss] = (0.55^p - 0.45^p) / 128 * dpi1/dtheta, with dpi1/dtheta = pi0 pi1 (-1, +1).

Reports: last-epoch training loss (mean of the sampled loss over the last epoch), the exact expected loss
at the end, and the gradient bias (||E[g_hat] - g|| / ||g||, cosine) at initialization and at
theta ~ N(0, 1), with E[g_hat] averaged over many samples.

    python benchmarks/reinmax_polynomial.py --quick
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from reinmax import estimate  # noqa: E402

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 steps x 2 epochs, 3 seeds")
    ap.add_argument("--epochs", type=int, default=10, help="paper: 40")
    ap.add_argument("--steps-per-epoch", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--k", type=int, default=10, help="Gumbel-Rao samples")
    ap.add_argument("--bias-samples", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.bias_samples = 2, 3, 4000
    torch.set_num_threads(args.threads)
    tau, batch, lr = 1.0, 64, 1e-3
    p_vec = torch.tensor(PS)
    results = {}
    t_start = time.process_time()
    for name in NAMES:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        theta = torch.nn.Parameter(torch.empty(len(PS), args.seeds, LATENTS, 2).uniform_(-0.01, 0.01))
        init = theta.detach().clone()
        opt = torch.optim.Adam([theta], lr=lr)
        t0 = time.time()
        for epoch in range(args.epochs):
            running = torch.zeros(len(PS), args.seeds)
            for _ in range(args.steps_per_epoch):
                loss = sampled_loss(name, theta, p_vec, batch, tau, gen, args.k)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                running += loss.detach()
            print(f"{name:24s} epoch {epoch + 1}/{args.epochs} loss " +
                  " ".join(f"p={p}:{float(running[i].mean() / args.steps_per_epoch):.5f}" for i, p in enumerate(PS)) +
                  f"  ({time.time() - t0:.0f}s)", flush=True)
        last = running / args.steps_per_epoch
        r = {}
        for i, p in enumerate(PS):
            exp_loss = expected_loss(theta.detach()[i], p)
            rel0, cos0 = bias(name, init[i, 0], p, tau, args.bias_samples, args.k, gen)
            rel1, cos1 = bias(name, torch.randn(LATENTS, 2, generator=torch.Generator().manual_seed(1)), p, tau,
                              args.bias_samples, args.k, gen)
            r[str(p)] = {"train_loss_mean": float(last[i].mean()), "train_loss_std": float(last[i].std()),
                         "expected_loss_mean": float(exp_loss.mean()), "optimum": 0.45 ** p,
                         "bias_rel_init": rel0, "cos_init": cos0, "bias_rel_randn": rel1, "cos_randn": cos1}
        results[name] = r
    cpu_s = time.process_time() - t_start
    lines = [f"Polynomial programming, 128 binary latents, tau {tau}, Adam lr {lr}, batch {batch}, "
             f"{args.epochs} epochs x {args.steps_per_epoch} steps, {args.seeds} seeds (paper: 40 epochs, 10 seeds), "
             f"Gumbel-Rao k={args.k}; bias from {args.bias_samples} samples; CPU time {cpu_s:.0f}s", "",
             "| estimator | p | last-epoch train loss (mean ± sd over seeds) | exact expected loss | optimum 0.45^p "
             "| rel. bias at init | cos at init | rel. bias at theta~N(0,1) | cos at N(0,1) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for p, v in r.items():
            lines.append(f"| {name} | {p} | {v['train_loss_mean']:.5f} ± {v['train_loss_std']:.5f} | "
                         f"{v['expected_loss_mean']:.5f} | {v['optimum']:.5f} | {v['bias_rel_init']:.3f} | "
                         f"{v['cos_init']:.3f} | {v['bias_rel_randn']:.3f} | {v['cos_randn']:.3f} |")
    table = "\n".join(lines)
    print(table, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reinmax_polynomial.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                                  "results": results}, indent=1))
    (args.out / "reinmax_polynomial.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    w = 0.15
    for j, name in enumerate(NAMES):
        xs = [i + (j - 2) * w for i in range(len(PS))]
        gap = [results[name][str(p)]["expected_loss_mean"] - 0.45 ** p for p in PS]
        axes[0].bar(xs, gap, w, label=name)
        axes[1].bar(xs, [results[name][str(p)]["bias_rel_randn"] for p in PS], w, label=name)
    for ax, title in zip(axes, ["expected loss - optimum (lower is better)", "relative gradient bias at theta~N(0,1)"]):
        ax.set_xticks(range(len(PS)), [f"p={p}" for p in PS])
        ax.set_title(title, fontsize=9)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "reinmax_polynomial.png", dpi=120)
    print(f"wrote {args.out}/reinmax_polynomial.{{json,md,png}}", flush=True)


if __name__ == "__main__":
    main()
