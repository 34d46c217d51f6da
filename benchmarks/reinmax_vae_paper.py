"""The categorical VAE at the ReinMax paper's own budget: 160 epochs at batch 100, each estimator at the
paper's own lr / tau / optimizer, several seeds, many runs batched in one process (made for one GPU).

Every (estimator, seed) of a configuration is one *member* of a stacked model: the six linear maps of
``reinmax_vae_mnist.VAE`` become ``(M, in, out)`` tensors run with batched matmuls, each member
initialized exactly as that script's ``VAE(C, L)`` under ``torch.manual_seed(seed)``, fed its own
shuffle of the 50k training images, and updated by :class:`MemberwiseAdam` (torch.optim's Adam and
RAdam formulas, elementwise, with each member's own learning rate and rule). The members never mix:
the loss is the sum of the members' mean -ELBOs, so each member's gradient is its own run's gradient.
One GPU step trains all M runs, which is what makes 2 x 5 estimators x several seeds x 80k updates fit
in minutes. Scores: -ELBO (one sample per image, nats) on the 10k test images and on 10k training
images, mean +- std over seeds. Settings: ../shared/REFERENCE.md section 6 (the paper's Table 8).

    python -m benchmarks.reinmax_vae_paper --device cuda --configs 8x4,8x16 --seeds 1,2,3,4
    python -m benchmarks.reinmax_vae_paper --steps 20 --configs 8x4 --seeds 1,2     # a CPU smoke run

``--time-budget S`` stops training when S seconds are spent (checked once per epoch: the only host
read in the loop) and reports the epochs reached, so a fixed GPU slot always ends with a table.
"""

import argparse
import math
import sys
import time
from pathlib import Path
from typing import List, Sequence

import torch
import torch.nn.functional as F

from benchmarks import mnist
from benchmarks.harness import machine
from benchmarks.reinmax_vae_mnist import VAE, splits
from benchmarks.sweep import mean_std, parse_list, write_json
from reinmax import estimate

REPO = Path(__file__).resolve().parents[1]

#: config -> estimator -> (lr, tau, optimizer): the ReinMax paper's Table 8 (REFERENCE.md section 6)
PAPER = {
    "8x4": {"straight_through": (1e-3, 1.3, "adam"), "gumbel_softmax": (3e-4, 0.5, "adam"),
            "gumbel_rao": (5e-4, 0.5, "adam"), "gapped_straight_through": (5e-4, 1.0, "adam"),
            "reinmax": (5e-4, 1.3, "adam")},
    "4x24": {"straight_through": (1e-3, 1.5, "radam"), "gumbel_softmax": (5e-4, 0.3, "radam"),
             "gumbel_rao": (5e-4, 0.3, "radam"), "gapped_straight_through": (5e-4, 0.5, "radam"),
             "reinmax": (5e-4, 1.5, "radam")},
    "8x16": {"straight_through": (1e-3, 1.5, "radam"), "gumbel_softmax": (5e-4, 0.5, "radam"),
             "gumbel_rao": (7e-4, 0.7, "radam"), "gapped_straight_through": (7e-4, 0.5, "radam"),
             "reinmax": (7e-4, 1.5, "radam")},
    "16x12": {"straight_through": (5e-4, 1.5, "adam"), "gumbel_softmax": (7e-4, 0.7, "radam"),
              "gumbel_rao": (5e-4, 1.0, "adam"), "gapped_straight_through": (7e-4, 0.5, "radam"),
              "reinmax": (7e-4, 1.5, "radam")},
    "64x8": {"straight_through": (5e-4, 1.5, "adam"), "gumbel_softmax": (7e-4, 0.7, "radam"),
             "gumbel_rao": (7e-4, 2.0, "adam"), "gapped_straight_through": (7e-4, 0.7, "radam"),
             "reinmax": (5e-4, 1.5, "radam")},
    "10x30": {"straight_through": (7e-4, 1.4, "radam"), "gumbel_softmax": (5e-4, 0.5, "radam"),
              "gumbel_rao": (5e-4, 1.0, "radam"), "gapped_straight_through": (5e-4, 0.5, "radam"),
              "reinmax": (5e-4, 1.3, "radam")},
}
NAMES = ["reinmax", "straight_through", "gumbel_softmax", "gapped_straight_through", "gumbel_rao"]
BATCH, TRAIN_IMAGES, EPOCHS = 100, 50_000, 160


class MemberwiseAdam:
    """Adam or RAdam (torch.optim's formulas, defaults betas (0.9, 0.999), eps 1e-8) on stacked parameters
    whose first dimension indexes independent runs, each with its own learning rate and rule.

    Args:
        params: tensors of shape (M, ...), each with ``.grad`` after backward.
        lr: (M,) learning rates. radam: (M,) bools, True where the member uses RAdam.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: torch.Tensor, radam: torch.Tensor,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.radam = lr, radam
        self.b1, self.b2, self.eps, self.t = betas[0], betas[1], eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2, eps, t = self.b1, self.b2, self.eps, self.t
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * b2 ** t / bc2
        rect = (math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                if rho_t > 5 else None)
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            adam = (m / bc1) / (v.sqrt() / math.sqrt(bc2) + eps)  # torch.optim.Adam
            # torch.optim.RAdam: rectified adaptive step once rho_t > 5, plain momentum SGD before
            radam = m / bc1 if rect is None else (m / bc1) * rect * math.sqrt(bc2) / (v.sqrt() + eps)
            shape = (-1,) + (1,) * (p.dim() - 1)
            p.sub_(self.lr.view(shape) * torch.where(self.radam.view(shape), radam, adam))


class StackedVAE:
    """M members of ``VAE(C, L)`` as stacked weights ``(M, in, out)`` and biases ``(M, 1, out)``."""

    def __init__(self, C: int, L: int, seeds: Sequence[int], device: str):
        self.C, self.L = C, L
        layers = []
        for seed in seeds:
            torch.manual_seed(seed)
            vae = VAE(C, L)
            layers.append([m for m in (*vae.encoder, *vae.decoder) if isinstance(m, torch.nn.Linear)])
        self.weights = [torch.stack([ls[i].weight.detach().t() for ls in layers]).to(device).requires_grad_()
                        for i in range(6)]
        self.biases = [torch.stack([ls[i].bias.detach()[None] for ls in layers]).to(device).requires_grad_()
                       for i in range(6)]

    def parameters(self) -> List[torch.Tensor]:
        return self.weights + self.biases

    def _mlp(self, h, first):
        for i in range(first, first + 3):
            h = torch.baddbmm(self.biases[i], h, self.weights[i])
            if i < first + 2:
                h = F.relu(h)
        return h

    def neg_elbo(self, x: torch.Tensor, groups, gen=None) -> torch.Tensor:
        """(M, B) -ELBO per image; ``x`` (M, B, 784); ``groups``: [(slice of members, estimator, tau)]."""
        logits = self._mlp(x, 0).view(x.shape[0], x.shape[1], self.L, self.C)
        hard, soft = [], []
        for members, name, tau in groups:
            y_hard, q = estimate(name, logits[members], tau, generator=gen, **({"k": 10} if name == "gumbel_rao" else {}))
            hard.append(y_hard)
            soft.append(q)
        y_hard, q = torch.cat(hard), torch.cat(soft)
        kl = (q * (q.clamp_min(1e-20).log() + math.log(self.C))).sum((-1, -2))
        out = self._mlp(y_hard.flatten(-2), 3)
        return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1) + kl

    @torch.no_grad()
    def evaluate(self, data: torch.Tensor, gen) -> torch.Tensor:
        """(M,) mean -ELBO per image on ``data`` (N, 784), one sample each (the same forward for every estimator)."""
        total = torch.zeros(len(self.weights[0]), device=data.device)
        everyone = [(slice(None), "reinmax", 1.0)]
        for i in range(0, len(data), 1000):
            chunk = data[i:i + 1000]
            total += self.neg_elbo(chunk.expand(len(total), *chunk.shape), everyone, gen).sum(1)
        return total / len(data)


def run_config(cfg: str, names: Sequence[str], seeds: Sequence[int], steps: int, args, deadline: float) -> dict:
    """Train every (estimator, seed) of ``cfg`` as one stacked model; scores per member."""
    C, L = (int(v) for v in cfg.split("x"))
    train, _, test = splits(args.data, args.device)
    members = [(name, seed) for name in names for seed in seeds]
    settings = [PAPER[cfg][name] for name, _ in members]
    model = StackedVAE(C, L, [seed for _, seed in members], args.device)
    lr = torch.tensor([s[0] for s in settings], device=args.device)
    radam = torch.tensor([s[2] == "radam" for s in settings], device=args.device)
    opt = MemberwiseAdam(model.parameters(), lr, radam)
    groups = [(slice(i * len(seeds), (i + 1) * len(seeds)), name, PAPER[cfg][name][1]) for i, name in enumerate(names)]
    gen = torch.Generator(args.device).manual_seed(seeds[0])
    M, per_epoch = len(members), TRAIN_IMAGES // BATCH
    t0, done = time.time(), 0
    while done < steps:
        order = torch.rand(M, TRAIN_IMAGES, device=args.device, generator=gen).argsort(1)  # each member its shuffle
        for j in range(min(per_epoch, steps - done)):
            x = train[order[:, j * BATCH:(j + 1) * BATCH]]  # (M, B, 784)
            loss = model.neg_elbo(x, groups, gen).mean(1).sum()
            for p in model.parameters():
                p.grad = None
            loss.backward()
            opt.step()
        done += min(per_epoch, steps - done)
        epoch = done / per_epoch
        if epoch % 10 < 1e-9 or done >= steps or time.time() > deadline:
            print(f"  [{cfg}] epoch {epoch:g}/{steps / per_epoch:g}, {time.time() - t0:.0f} s, "
                  f"batch -ELBO (mean of members) {float(loss.detach()) / M:.1f}", flush=True)
        if time.time() > deadline and done < steps:
            print(f"  [{cfg}] time budget spent: stopped after {done} of {steps} updates", flush=True)
            break
    eval_gen = torch.Generator(args.device).manual_seed(10_000)
    test_scores = model.evaluate(test[:args.eval_images], eval_gen).tolist()
    train_scores = model.evaluate(train[:args.eval_images], eval_gen).tolist()
    rows = {}
    for i, name in enumerate(names):
        sl = slice(i * len(seeds), (i + 1) * len(seeds))
        lr_, tau, opt_name = PAPER[cfg][name]
        rows[name] = {"lr": lr_, "tau": tau, "optimizer": opt_name, "seeds": list(seeds),
                      "test": test_scores[sl], "train": train_scores[sl]}
    return {"config": cfg, "updates": done, "eval_images": min(args.eval_images, len(test)), "epochs": done / per_epoch, "planned_updates": steps,
            "members": M, "wall_s": time.time() - t0, "estimators": rows}


def table(results: List[dict], device: str, command: str) -> str:
    lines = ["Categorical VAE on MNIST at the ReinMax paper's settings per estimator (Table 8: lr / tau / optimizer), "
             "batch 100; -ELBO in nats, one sample per image, mean +- std over seeds (lower is better); "
             f"scored on {results[0]['eval_images'] if results else 0} test and training images", "",
             "| config | epochs | estimator (lr / tau / opt) | test -ELBO | train -ELBO |", "|---|---|---|---|---|"]
    for r in results:
        for name, e in r["estimators"].items():
            (tm, ts), (rm, rs) = mean_std(e["test"]), mean_std(e["train"])
            lines.append(f"| {r['config']} | {r['epochs']:g} | {name} ({e['lr']:g} / {e['tau']:g} / {e['optimizer']}) "
                         f"| {tm:.2f} +- {ts:.2f} | {rm:.2f} +- {rs:.2f} |")
    lines += ["", f"seeds {results[0]['estimators'][NAMES[0]]['seeds'] if results else []}; wall "
              + ", ".join(f"{r['config']} {r['wall_s']:.0f} s ({r['members']} runs batched)" for r in results),
              f"command: {command}", f"machine: {machine(device)}"]
    return "\n".join(lines)


def main(argv=None) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=mnist.DEFAULT_ROOT)
    ap.add_argument("--configs", default="8x4,8x16", help="comma-separated: " + ", ".join(PAPER))
    ap.add_argument("--estimators", default=",".join(NAMES), help="comma-separated: " + ", ".join(NAMES))
    ap.add_argument("--seeds", default="1,2,3,4")
    ap.add_argument("--steps", type=int, default=EPOCHS * TRAIN_IMAGES // BATCH, help="updates per run (paper: 80000)")
    ap.add_argument("--eval-images", type=int, default=10_000, help="test (and training) images scored")
    ap.add_argument("--time-budget", type=float, default=float("inf"), help="seconds for all configs (see above)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "reinmax")
    args = ap.parse_args(argv)
    configs = parse_list(ap, "--configs", args.configs, str, positive=False)
    names = parse_list(ap, "--estimators", args.estimators, str, positive=False)
    seeds = parse_list(ap, "--seeds", args.seeds, int, positive=False)
    for flag, values, known in (("--configs", configs, PAPER), ("--estimators", names, NAMES)):
        if not set(values) <= set(known):
            ap.error(f"{flag}: {sorted(set(values) - set(known))} unknown; choose from {', '.join(known)}")
    if args.eval_images < 1:
        ap.error(f"--eval-images must be >= 1, got {args.eval_images}")
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if not args.time_budget > 0:
        ap.error(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    reason = mnist.missing(args.data)
    if reason is not None:
        print(f"skipped: {reason}; pass --data", flush=True)
        return []
    start = time.time()
    results = []
    for i, cfg in enumerate(configs):
        # each remaining config gets an equal share of what is left of the budget
        now = time.time()
        deadline = now + (start + args.time_budget - now) / (len(configs) - i)
        print(f"[{cfg}] {len(names)} estimators x {len(seeds)} seeds in one stacked model, {args.steps} updates",
              flush=True)
        results.append(run_config(cfg, names, seeds, args.steps, args, deadline))
    command = "python -m benchmarks.reinmax_vae_paper " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(results, args.device, command)
    print(text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "vae_paper.json", results)
    (args.out / "vae_paper.md").write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
