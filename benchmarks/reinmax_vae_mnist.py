"""Categorical VAE on MNIST (ReinMax paper, Sec. 6.2) for every estimator, scaled to a small CPU budget.

Encoder 784-512-256-(L*C), decoder (L*C)-256-512-784 (ReLU; sigmoid output with summed binary
cross-entropy on the grey levels in [0, 1]); KL of q(z|x) to the uniform prior, computed from
``y_soft`` (so its gradient is exact for every estimator); batch 100. Configs (C x L, lr, tau,
optimizer) from the paper: 8x4 (5e-4, 1.3, Adam), 4x24 (5e-4, 1.5, RAdam), 10x30 (5e-4, 1.3, RAdam).
Every estimator gets the same number of steps. Reported: negative ELBO (one sample per image) on
10 000 training images and on the 10 000 test images.

For 8x4 the exact gradient of the reconstruction term w.r.t. the encoder logits is enumerated over
all C^L = 4096 codes for a few test images, at initialization and after training (the ReinMax-trained
model), and compared with each estimator's mean over many samples: relative bias
||E[g_hat] - g|| / ||g||, relative variance E||g_hat - E[g_hat]||^2 / ||g||^2, cosine.

    python benchmarks/reinmax_vae_mnist.py --quick
    python benchmarks/reinmax_vae_mnist.py --steps 1500 --data ../shared/data/mnist
"""

import argparse
import gzip
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from reinmax import ESTIMATORS, estimate  # noqa: E402

NAMES = ["reinmax", "straight_through", "gumbel_softmax", "gapped_straight_through", "gumbel_rao"]
# name: (C categories, L latents, lr, reinmax tau, optimizer)
CONFIGS = {"8x4": (8, 4, 5e-4, 1.3, "adam"), "4x24": (4, 24, 5e-4, 1.5, "radam"), "10x30": (10, 30, 5e-4, 1.3, "radam")}


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(root: Path):
    if not root.is_dir():
        raise SystemExit(f"MNIST not found at {root} (expected the four gz IDX files); pass --data")
    train = torch.from_numpy(read_idx(root / "train-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255)
    test = torch.from_numpy(read_idx(root / "t10k-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255)
    return train, test


class VAE(nn.Module):
    def __init__(self, C: int, L: int):
        super().__init__()
        self.C, self.L = C, L
        self.encoder = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, L * C))
        self.decoder = nn.Sequential(nn.Linear(L * C, 256), nn.ReLU(), nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 784))

    def logits(self, x):
        return self.encoder(x).view(*x.shape[:-1], self.L, self.C)

    def reconstruction(self, z, x):
        """Summed BCE per image; z (..., L, C) one-hot, x broadcastable to (..., 784)."""
        out = self.decoder(z.flatten(-2))
        return F.binary_cross_entropy_with_logits(out, x.expand_as(out), reduction="none").sum(-1)

    def neg_elbo(self, x, name, tau, gen=None, **kw):
        y_hard, q = estimate(name, self.logits(x), tau, generator=gen, **kw)
        kl = (q * (q.clamp_min(1e-20).log() + math.log(self.C))).sum((-1, -2))
        return self.reconstruction(y_hard, x) + kl


@torch.no_grad()
def evaluate(model, data, gen):
    total = 0.0
    for i in range(0, len(data), 1000):
        total += float(model.neg_elbo(data[i:i + 1000], "reinmax", 1.0, gen).sum())
    return total / len(data)


def options(name, k):
    return {"k": k} if name == "gumbel_rao" else {}


def exact_and_estimates(model, x, names, taus, samples, k, gen):
    """Bias/variance of each estimator's gradient of the reconstruction term w.r.t. the encoder logits."""
    C, L = model.C, model.L
    with torch.no_grad():
        theta = model.logits(x)  # (B, L, C)
        codes = torch.tensor(list(itertools.product(range(C), repeat=L)))  # (C^L, L)
        z_all = F.one_hot(codes, C).float()  # (C^L, L, C)
        f = torch.stack([model.reconstruction(z_all, xi) for xi in x])  # (B, C^L)
    th = theta.clone().requires_grad_()
    logp = torch.log_softmax(th, -1)  # (B, L, C)
    log_q = logp[:, torch.arange(L), codes].sum(-1)  # (B, C^L): log q(z) = sum_l log pi_l(z_l)
    (exact,) = torch.autograd.grad((log_q.exp() * f).sum(), th)
    out = {}
    for name in names:
        grads = []
        for _ in range(samples // 500):
            rep = theta.unsqueeze(0).expand(500, *theta.shape).clone().requires_grad_()
            y_hard, _ = estimate(name, rep, taus[name], generator=gen, **options(name, k))
            (g,) = torch.autograd.grad(model.reconstruction(y_hard, x).sum(), rep)
            grads.append(g)
        g = torch.cat(grads)  # (M, B, L, C)
        mean = g.mean(0)
        norm2 = float(exact.pow(2).sum())
        out[name] = {"bias_rel": float((mean - exact).norm()) / math.sqrt(norm2),
                     "var_rel": float((g - mean).pow(2).sum((1, 2, 3)).mean()) / norm2,
                     "cos": float(F.cosine_similarity(mean.flatten(), exact.flatten(), dim=0))}
        # Monte Carlo error of the mean, relative: bias values near it are indistinguishable from 0
        out[name]["mc_noise_rel"] = math.sqrt(out[name]["var_rel"] / g.shape[0])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    ap.add_argument("--steps", type=int, default=1500, help="training steps per run (batch 100)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--estimators", nargs="+", default=NAMES, choices=sorted(ESTIMATORS))
    ap.add_argument("--baseline-tau", type=float, default=1.0, help="tau of the baselines (ReinMax: the config's)")
    ap.add_argument("--k", type=int, default=10, help="Gumbel-Rao samples")
    ap.add_argument("--bias-images", type=int, default=8)
    ap.add_argument("--bias-samples", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="100 steps, 8x4 only, 500 bias samples")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.configs, args.bias_samples = 100, ["8x4"], 500
    torch.set_num_threads(args.threads)
    train, test = load_mnist(args.data)
    train_eval = train[:10000]
    results, bias_results = {}, {}
    cpu0 = time.process_time()
    for cfg in args.configs:
        C, L, lr, tau_rm, opt_name = CONFIGS[cfg]
        taus = {n: (tau_rm if n == "reinmax" else args.baseline_tau) for n in args.estimators}
        results[cfg] = {}
        init_state, trained_reinmax = None, None
        for name in args.estimators:
            torch.manual_seed(0)
            model = VAE(C, L)
            if init_state is None:
                init_state = {k_: v.clone() for k_, v in model.state_dict().items()}
            opt = (torch.optim.Adam if opt_name == "adam" else torch.optim.RAdam)(model.parameters(), lr=lr)
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
            gen = torch.Generator().manual_seed(0)
            t0 = time.time()
            for step in range(args.steps):
                j = (step * 100) % len(train)
                loss = model.neg_elbo(train[order[j:j + 100]], name, taus[name], gen, **options(name, args.k)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if (step + 1) % max(1, args.steps // 5) == 0:
                    print(f"[{cfg} {name}] step {step + 1}/{args.steps} -ELBO {float(loss):.1f} ({time.time() - t0:.0f}s)",
                          flush=True)
            eval_gen = torch.Generator().manual_seed(1)
            results[cfg][name] = {"train": evaluate(model, train_eval, eval_gen), "test": evaluate(model, test, eval_gen),
                                  "tau": taus[name]}
            print(f"[{cfg} {name}] train {results[cfg][name]['train']:.2f} test {results[cfg][name]['test']:.2f}", flush=True)
            if name == "reinmax":
                trained_reinmax = {k_: v.clone() for k_, v in model.state_dict().items()}
        if cfg == "8x4":
            x = test[:args.bias_images]
            model = VAE(C, L)
            for label, state in (("init", init_state), ("trained (reinmax)", trained_reinmax)):
                if state is None:
                    continue
                model.load_state_dict(state)
                print(f"[8x4] bias/variance vs exact enumeration at {label} ...", flush=True)
                bias_results[label] = exact_and_estimates(model, x, args.estimators, taus, args.bias_samples, args.k,
                                                          torch.Generator().manual_seed(2))
    cpu_s = time.process_time() - cpu0
    lines = [f"Categorical VAE on MNIST, {args.steps} steps of batch 100 per run ({args.steps * 100 / 60000:.1f} epochs; "
             f"the paper trains far longer), ReinMax at the config's tau, baselines at tau {args.baseline_tau} (untuned), "
             f"Gumbel-Rao k={args.k}, CPU time {cpu_s:.0f}s", "",
             "| config | estimator | tau | -ELBO train (10k) | -ELBO test |", "|---|---|---|---|---|"]
    for cfg, r in results.items():
        best = min(v["test"] for v in r.values())
        for name, v in r.items():
            mark = " **(best)**" if v["test"] == best else ""
            lines.append(f"| {cfg} | {name} | {v['tau']} | {v['train']:.2f} | {v['test']:.2f}{mark} |")
    if bias_results:
        lines += ["", f"8x4 gradient of the reconstruction term w.r.t. the encoder logits vs exact enumeration "
                  f"(4096 codes), {args.bias_images} test images, {args.bias_samples} samples per estimator", "",
                  "| model | estimator | rel. bias | MC noise of the bias | rel. variance | cosine |", "|---|---|---|---|---|---|"]
        for label, r in bias_results.items():
            for name, v in r.items():
                lines.append(f"| {label} | {name} | {v['bias_rel']:.3f} | {v['mc_noise_rel']:.3f} | {v['var_rel']:.3f} "
                             f"| {v['cos']:.3f} |")
    table = "\n".join(lines)
    print(table, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reinmax_vae_mnist.json").write_text(json.dumps(
        {"args": {k_: (str(v) if isinstance(v, Path) else v) for k_, v in vars(args).items()},
         "results": results, "bias": bias_results}, indent=1))
    (args.out / "reinmax_vae_mnist.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + bool(bias_results), figsize=(10 if bias_results else 5, 3.5))
    axes = np.atleast_1d(axes)
    w = 0.8 / len(args.estimators)
    for j, name in enumerate(args.estimators):
        xs = [i + (j - (len(args.estimators) - 1) / 2) * w for i in range(len(results))]
        axes[0].bar(xs, [results[c][name]["test"] for c in results], w, label=name)
        if bias_results:
            xb = [i + (j - (len(args.estimators) - 1) / 2) * w for i in range(len(bias_results))]
            axes[1].bar(xb, [bias_results[m][name]["bias_rel"] for m in bias_results], w, label=name)
    axes[0].set_xticks(range(len(results)), list(results))
    axes[0].set_title("test -ELBO (lower is better)", fontsize=9)
    lo = min(v["test"] for r in results.values() for v in r.values())
    axes[0].set_ylim(lo * 0.95, None)
    axes[0].legend(fontsize=7)
    if bias_results:
        axes[1].set_xticks(range(len(bias_results)), list(bias_results))
        axes[1].set_title("8x4: relative gradient bias vs exact (lower is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "reinmax_vae_mnist.png", dpi=120)
    print(f"wrote {args.out}/reinmax_vae_mnist.{{json,md,png}}", flush=True)


if __name__ == "__main__":
    main()
