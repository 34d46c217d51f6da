"""Categorical VAE on MNIST (ReinMax paper, Sec. 6.2) for every estimator, scaled to a small CPU budget.

Encoder 784-512-256-(L*C), decoder (L*C)-256-512-784 (ReLU; sigmoid output with summed binary
cross-entropy on the grey levels in [0, 1]); KL of q(z|x) to the uniform prior, computed from
``y_soft`` (so its gradient is exact for every estimator); batch 100. The six configurations of the
paper (C x L: lr, optimizer): 8x4 (5e-4, Adam), 4x24 (5e-4, RAdam), 8x16 (7e-4, RAdam), 16x12
(7e-4, RAdam), 64x8 (5e-4, RAdam), 10x30 (5e-4, RAdam).

Protocol (the same for every estimator): MNIST's 60k training images split 50k train / 10k valid;
every tau of ``--taus`` trained once (tuning seed 0) and scored by the validation -ELBO; then
``--seeds`` fresh seeds at the chosen tau, scored once on the 10k test images (mean +- std). Every
run gets the same number of steps. -ELBO uses one sample per image. Runs go ``--jobs`` at a time
(one thread each); each finished run is cached under ``--work``, so an interrupted sweep resumes.

For 8x4 the exact gradient of the reconstruction term w.r.t. the encoder logits is enumerated over
all C^L = 4096 codes for a few test images, at initialization and after training (the ReinMax-trained
model), and compared with each estimator's mean over many samples: relative bias
||E[g_hat] - g|| / ||g||, relative variance E||g_hat - E[g_hat]||^2 / ||g||^2, cosine.

    python -m benchmarks.reinmax_vae_mnist --quick
    python -m benchmarks.reinmax_vae_mnist                                  # all six configs, ~45 CPU-min
    python -m benchmarks.reinmax_vae_mnist --steps 96000 --seeds 10 --device cuda   # the paper's budget
"""

import argparse
import itertools
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from benchmarks import mnist
from benchmarks.sweep import mean_std, parse_list, recorded_args, run_jobs, write_json
from reinmax import ESTIMATORS, estimate

REPO = Path(__file__).resolve().parents[1]

NAMES = ["reinmax", "straight_through", "gumbel_softmax", "gapped_straight_through", "gumbel_rao"]
# name: (C categories, L latents, lr, optimizer), from the paper
CONFIGS = {"8x4": (8, 4, 5e-4, "adam"), "4x24": (4, 24, 5e-4, "radam"), "8x16": (8, 16, 7e-4, "radam"),
           "16x12": (16, 12, 7e-4, "radam"), "64x8": (64, 8, 5e-4, "radam"), "10x30": (10, 30, 5e-4, "radam")}
TAUS = [0.5, 1.0, 1.5]


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
    """Mean -ELBO per image, one sample each (the forward value is the same for every estimator)."""
    total = torch.zeros((), device=data.device)
    for i in range(0, len(data), 1000):
        total += model.neg_elbo(data[i:i + 1000], "reinmax", 1.0, gen).sum()
    return float(total) / len(data)


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


_DATA = {}


def splits(root: Path, device: str):
    """(train 50k, valid 10k, test 10k) images on ``device``, loaded once per process (:func:`benchmarks.mnist.load`:
    MNISTNotFound, naming the missing files, when ``root`` lacks them)."""
    if (root, device) not in _DATA:
        data = mnist.load(root)
        train, test = data.train_images, data.test_images
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1234))
        train = train[order]
        _DATA[root, device] = (train[:50000].to(device), train[50000:].to(device), test.to(device))
    return _DATA[root, device]


def run_one(cfg: str, name: str, tau: float, seed: int, split: str, args) -> dict:
    """Train one VAE; score it on ``split`` ('valid' for tuning, 'test' for the final runs). Cached."""
    cache = args.work / f"{cfg}-{name}-tau{tau:g}-s{seed}-{args.steps}-{split}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    torch.set_num_threads(args.threads)
    train, valid, test = splits(args.data, args.device)
    C, L, lr, opt_name = CONFIGS[cfg]
    torch.manual_seed(seed)
    model = VAE(C, L).to(args.device)
    init_state = {k_: v.detach().cpu().clone() for k_, v in model.state_dict().items()}
    opt = (torch.optim.Adam if opt_name == "adam" else torch.optim.RAdam)(model.parameters(), lr=lr)
    gen = torch.Generator(args.device).manual_seed(seed)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).to(args.device)
    t0 = time.process_time()
    for step in range(args.steps):
        j = (step * 100) % len(train)
        loss = model.neg_elbo(train[order[j:j + 100]], name, tau, gen, **options(name, args.k)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    eval_gen = torch.Generator(args.device).manual_seed(10_000 + seed)
    result = {"config": cfg, "estimator": name, "tau": tau, "seed": seed, "split": split,
              "train": evaluate(model, train[:10000], eval_gen),
              split: evaluate(model, valid if split == "valid" else test, eval_gen),
              "cpu_s": time.process_time() - t0}
    if cfg == "8x4" and name == "reinmax" and split == "test" and seed == args.seed_list[0]:
        # the models of the gradient-bias measurement: this run's init and its trained weights
        torch.save({"init": init_state, "trained": {k_: v.cpu() for k_, v in model.state_dict().items()}},
                   args.work / "8x4-reinmax-states.pt")
    write_json(cache, result)
    return result


def describe(r: dict) -> str:
    return f"{r['config']} {r['estimator']} tau {r['tau']:g} seed {r['seed']}: {r['split']} -ELBO {r[r['split']]:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=mnist.DEFAULT_ROOT)
    ap.add_argument("--steps", type=int, default=500, help="scale: training steps per run, batch 100 (paper: ~96k)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--estimators", default=",".join(NAMES), help="comma-separated: " + ", ".join(sorted(ESTIMATORS)))
    ap.add_argument("--taus", default=",".join(map(str, TAUS)), help="the tau grid, the same for every estimator")
    ap.add_argument("--seeds", default="1,2,3", help="final runs at the chosen tau (tuning uses seed 0)")
    ap.add_argument("--k", type=int, default=10, help="Gumbel-Rao samples")
    ap.add_argument("--bias-images", type=int, default=8)
    ap.add_argument("--bias-samples", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="50 steps, 8x4 only, taus 0.5 1.5, one seed")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--work", type=Path, default=REPO / "work" / "vae_mnist", help="cache of finished runs")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "reinmax")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.configs, args.bias_samples, args.taus, args.seeds = 50, "8x4", 500, "0.5,1.5", "1"
        args.out = args.work = args.work.with_name(args.work.name + "_quick")
    configs, names = args.configs.split(","), args.estimators.split(",")
    for flag, values, accepted in (("--configs", configs, CONFIGS), ("--estimators", names, ESTIMATORS)):
        bad = [v for v in values if v not in accepted]
        if bad:
            ap.error(f"{flag}: unknown {bad}; accepted: {', '.join(accepted)}")
    taus = parse_list(ap, "--taus", args.taus)
    args.seed_list = parse_list(ap, "--seeds", args.seeds, int, positive=False)
    reason = mnist.missing(args.data)
    if reason is not None:
        ap.error(f"--data: {reason}")
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    tuning = run_jobs(run_one, [(c, n, t, 0, "valid", args) for c in configs for n in names for t in taus], args.jobs,
                      processes=True, label="tuning", describe=describe)
    chosen = {(c, n): min((r for r in tuning if r["config"] == c and r["estimator"] == n), key=lambda r: r["valid"])["tau"]
              for c in configs for n in names}
    final = run_jobs(run_one, [(c, n, chosen[c, n], s, "test", args) for c in configs for n in names
                               for s in args.seed_list], args.jobs, processes=True, label="final", describe=describe)
    results = {}
    for c in configs:
        for n in names:
            runs = [r for r in final if r["config"] == c and r["estimator"] == n]
            test_m, test_s = mean_std([r["test"] for r in runs])
            train_m, train_s = mean_std([r["train"] for r in runs])
            results.setdefault(c, {})[n] = {
                "tau": chosen[c, n], "test": test_m, "test_std": test_s, "train": train_m, "train_std": train_s,
                "per_seed_test": [r["test"] for r in sorted(runs, key=lambda r: r["seed"])],
                "valid_by_tau": {f"{r['tau']:g}": r["valid"] for r in tuning if r["config"] == c and r["estimator"] == n}}

    bias_results = {}
    states = args.work / "8x4-reinmax-states.pt"
    if "8x4" in configs and states.exists():
        _, _, test = splits(args.data, "cpu")
        model, saved = VAE(8, 4), torch.load(states)
        for label, key in (("init", "init"), ("trained (reinmax)", "trained")):
            model.load_state_dict(saved[key])
            print(f"[8x4] gradient bias/variance vs exact enumeration at {label} ...", flush=True)
            bias_results[label] = exact_and_estimates(model, test[:args.bias_images], names,
                                                      {n: chosen["8x4", n] for n in names}, args.bias_samples, args.k,
                                                      torch.Generator().manual_seed(2))
    wall = time.time() - t_start

    seeds = len(args.seed_list)
    lines = [f"Categorical VAE on MNIST, {args.steps} steps of batch 100 per run ({args.steps * 100 / 50000:.1f} epochs "
             f"of the 50k training split; the paper trains ~96k steps). tau grid {taus} for every estimator, chosen by "
             f"the validation -ELBO (10k held-out training images, tuning seed 0); test -ELBO (10k test images, one "
             f"sample per image) mean +- std over {seeds} seeds {args.seeds} at the chosen tau. Gumbel-Rao k={args.k}.",
             "", "| config | estimator | tau | -ELBO test (mean +- std) | -ELBO train (10k) |", "|---|---|---|---|---|"]
    for c, r in results.items():
        best = min(v["test"] for v in r.values())
        for n, v in r.items():
            mark = " **(best)**" if v["test"] == best else ""
            edge = " (grid edge)" if len(taus) > 1 and v["tau"] in (taus[0], taus[-1]) else ""
            lines.append(f"| {c} | {n} | {v['tau']:g}{edge} | {v['test']:.2f} +- {v['test_std']:.2f}{mark} | "
                         f"{v['train']:.2f} +- {v['train_std']:.2f} |")
    if bias_results:
        lines += ["", f"8x4 gradient of the reconstruction term w.r.t. the encoder logits vs exact enumeration "
                  f"(4096 codes), {args.bias_images} test images, {args.bias_samples} samples per estimator at its "
                  "chosen tau; models: the first final ReinMax run at init and after training", "",
                  "| model | estimator | rel. bias | MC noise of the bias | rel. variance | cosine |",
                  "|---|---|---|---|---|---|"]
        for label, r in bias_results.items():
            for n, v in r.items():
                lines.append(f"| {label} | {n} | {v['bias_rel']:.3f} | {v['mc_noise_rel']:.3f} | {v['var_rel']:.3f} "
                             f"| {v['cos']:.3f} |")
    lines += ["", f"command: python -m benchmarks.reinmax_vae_mnist --configs {args.configs} --estimators "
              f"{args.estimators} --taus {args.taus} --seeds {args.seeds} --steps {args.steps} --device {args.device}",
              f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.jobs} runs at a time x {args.threads} "
              f"thread; wall {wall / 60:.0f} min (cached runs cost nothing)"]
    table = "\n".join(lines)
    print(table, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reinmax_vae_mnist.json").write_text(json.dumps(
        {"args": recorded_args(args),
         "results": results, "bias": bias_results, "runs": tuning + final}, indent=1))
    (args.out / "reinmax_vae_mnist.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(2.6 * len(results), 3.2), squeeze=False)
    for ax, (c, r) in zip(axes[0], results.items()):
        for j, n in enumerate(names):
            v = r[n]
            ax.errorbar([j], [v["test"]], yerr=[v["test_std"]], fmt="o", capsize=3, color=f"C{j}",
                        label=f"{n}" if c == configs[0] else None)
            ax.scatter([j] * len(v["per_seed_test"]), v["per_seed_test"], s=6, color=f"C{j}", alpha=0.5)
        ax.set_xticks(range(len(names)), [f"tau {r[n]['tau']:g}" for n in names], rotation=60, fontsize=7)
        ax.set_title(f"{c}: test -ELBO", fontsize=9)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out / "reinmax_vae_mnist.png", dpi=120)
    print(f"wrote {args.out}/reinmax_vae_mnist.{{json,md,png}}", flush=True)


if __name__ == "__main__":
    main()
