"""The categorical VAE at a real CPU budget: every estimator at its ReinMax-paper Table-8 setting, several seeds,
tens of epochs, in the background, resumable.

Model and loss: ``reinmax_vae_mnist.VAE`` (784-512-256-(L*C) encoder, mirrored decoder, summed BCE on the grey
levels, KL of q(z|x) to the uniform prior from ``y_soft``), batch 100, the 50k/10k split of the MNIST training
images (:func:`benchmarks.reinmax_vae_mnist.splits`; the paper trains on all 60k). Each (estimator, seed) is one
*member* with its own ``torch.optim`` Adam/RAdam at the paper's lr, its own sampling generator and a shuffle
fixed by (seed, epoch); a member initialised under ``torch.manual_seed(seed)`` starts from the same weights for
every estimator. Gumbel-Rao uses k=100 conditional draws (the GST/ReinMax code's default).

Members advance one epoch at a time, always the one with the fewest epochs first, so when the time budget ends
every estimator has had the same number of epochs (within one). After each member-epoch its full state (weights,
optimizer, generator, history) is written atomically to ``--work``; a killed run, started again with the same
command, continues from there (an epoch cut short is redone from its start, with the same draws). Weights are
also kept at the ``--snapshot-epochs`` for the gradient study (:mod:`benchmarks.reinmax_vae_gradients`).

Scores per epoch: train -ELBO as the paper reports it (the running mean of the epoch's training losses) and test
-ELBO (10k test images, one sample per image, a fixed evaluation generator). ``--report`` writes the table,
curves and JSON from whatever the work folder holds, while a run goes on.

    OMP_NUM_THREADS=1 nohup nice -n 10 python -m benchmarks.reinmax_vae_long --epochs 50 --seeds 1,2,3 \\
        --time-budget 9000 --work work/vae_long &
    python -m benchmarks.reinmax_vae_long --report --work work/vae_long
"""

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from benchmarks import mnist
from benchmarks.harness import machine
from benchmarks.reinmax_vae_mnist import VAE, splits
from benchmarks.reinmax_vae_paper import NAMES, PAPER
from benchmarks.sweep import mean_std, parse_list, recorded_command, write_json
from toolbox_core.files import atomic_write

REPO = Path(__file__).resolve().parents[1]
BATCH = 100
GR_K = 100
EVAL_SEED = 10_000
SNAPSHOT_EPOCHS = (0, 1, 5, 10, 20, 30, 40, 50, 80, 120, 160)
LABELS = {"straight_through": "ST", "gumbel_softmax": "ST-GS", "gumbel_rao": "GR-MCK",
          "gapped_straight_through": "GST-1.0", "reinmax": "ReinMax"}
# The paper's 8x4 -ELBO (mean over 10 seeds, 160 epochs on the 60k training images): None where not transcribed.
PAPER_ELBO: Dict[str, Dict[str, Optional[float]]] = {}


def options(name: str) -> dict:
    return {"k": GR_K} if name == "gumbel_rao" else {}


def member_dir(work: Path, cfg: str, name: str, seed: int) -> Path:
    return work / cfg / f"{name}-s{seed}"


def _save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


class Member:
    """One (estimator, seed) run: model, optimizer, generator, epochs done and per-epoch history; on disk in
    ``member_dir``: ``state.pt`` (everything, rewritten after each epoch), ``history.json``, ``e{epoch}.pt``."""

    def __init__(self, cfg: str, name: str, seed: int, work: Path, snapshot_epochs: Sequence[int] = SNAPSHOT_EPOCHS):
        self.cfg, self.name, self.seed = cfg, name, seed
        self.lr, self.tau, self.opt_name = PAPER[cfg][name]
        self.C, self.L = (int(v) for v in cfg.split("x"))
        self.dir = member_dir(work, cfg, name, seed)
        self.snapshot_epochs = set(snapshot_epochs)
        torch.manual_seed(seed)
        self.model = VAE(self.C, self.L)
        self.opt = (torch.optim.Adam if self.opt_name == "adam" else torch.optim.RAdam)(self.model.parameters(),
                                                                                          lr=self.lr)
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch, self.history = 0, []
        state = self.dir / "state.pt"
        if state.exists():
            saved = torch.load(state, weights_only=False)
            self.model.load_state_dict(saved["model"])
            self.opt.load_state_dict(saved["opt"])
            self.gen.set_state(saved["gen"])
            self.epoch, self.history = saved["epoch"], saved["history"]
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.save()

    def save(self) -> None:
        _save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "gen": self.gen.get_state(),
               "epoch": self.epoch, "history": self.history}, self.dir / "state.pt")
        write_json(self.dir / "history.json", {"config": self.cfg, "estimator": self.name, "seed": self.seed,
                                               "lr": self.lr, "tau": self.tau, "optimizer": self.opt_name,
                                               "epoch": self.epoch, "history": self.history})
        if self.epoch in self.snapshot_epochs and not (self.dir / f"e{self.epoch}.pt").exists():
            _save(self.model.state_dict(), self.dir / f"e{self.epoch}.pt")

    def train_epoch(self, train: torch.Tensor, test: torch.Tensor) -> dict:
        """One epoch of batch-100 updates, then test -ELBO; appends to the history and saves."""
        t0 = time.time()
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        total, seen = 0.0, 0
        self.model.train()
        for j in range(0, len(train) - BATCH + 1, BATCH):
            x = train[order[j:j + BATCH]]
            per_image = self.model.neg_elbo(x, self.name, self.tau, self.gen, **options(self.name))
            loss = per_image.mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += float(per_image.detach().sum())
            seen += len(x)
        row = {"epoch": self.epoch + 1, "train": total / seen, "test": evaluate(self.model, test),
               "wall_s": time.time() - t0}
        if not all(math.isfinite(row[k]) for k in ("train", "test")):
            row["diverged"] = True
        self.epoch += 1
        self.history.append(row)
        self.save()
        return row


@torch.no_grad()
def evaluate(model: VAE, data: torch.Tensor) -> float:
    """Mean -ELBO per image, one sample each, the same evaluation generator for every model."""
    gen = torch.Generator().manual_seed(EVAL_SEED)
    total = 0.0
    for i in range(0, len(data), 1000):
        total += float(model.neg_elbo(data[i:i + 1000], "reinmax", 1.0, gen).sum())
    return total / len(data)


def train_members(members: List[Member], train: torch.Tensor, test: torch.Tensor, epochs: int,
                  time_budget: float, log=print) -> str:
    """Advance the member with the fewest epochs (ties: list order) one epoch at a time until every member has
    ``epochs`` or the next epoch would end after ``time_budget`` seconds from now. Returns why it stopped."""
    start = time.time()
    recent: List[float] = [h["wall_s"] for m in members for h in m.history[-1:]]
    while True:
        pending = [m for m in members if m.epoch < epochs]
        if not pending:
            return f"done: every member has {epochs} epochs"
        m = min(pending, key=lambda m: m.epoch)
        expected = sum(recent[-5:]) / len(recent[-5:]) if recent else 0.0
        if time.time() - start + expected > time_budget:
            return (f"time budget spent ({time.time() - start:.0f} of {time_budget:.0f} s): epochs reached "
                    f"{min(x.epoch for x in members)}-{max(x.epoch for x in members)}")
        row = m.train_epoch(train, test)
        recent.append(row["wall_s"])
        log(f"[{time.strftime('%H:%M:%S')}] {m.cfg} {m.name} seed {m.seed} epoch {row['epoch']}: train "
            f"{row['train']:.2f} test {row['test']:.2f} ({row['wall_s']:.1f} s)", flush=True)


# --------------------------------------------------------------------------------------------------------------
# report


def collect(work: Path, cfg: str, seeds: Optional[Sequence[int]] = None) -> Dict[str, List[dict]]:
    """estimator -> the history.json of each of its seeds in ``work`` (sorted by seed; only ``seeds`` if given)."""
    out: Dict[str, List[dict]] = {}
    for path in sorted((work / cfg).glob("*/history.json")):
        h = json.loads(path.read_text())
        if seeds is None or h["seed"] in seeds:
            out.setdefault(h["estimator"], []).append(h)
    for runs in out.values():
        runs.sort(key=lambda h: h["seed"])
    return {n: out[n] for n in NAMES if n in out}


def summarize(runs: Dict[str, List[dict]]) -> List[dict]:
    """Per estimator: the scores at the last epoch that every one of its seeds reached (and the common epoch of
    all estimators, so that the comparison is at equal budget)."""
    common = min((h["epoch"] for rs in runs.values() for h in rs), default=0)
    rows = []
    for name, rs in runs.items():
        at = [h["history"][common - 1] for h in rs] if common > 0 else []
        (tr, trs), (te, tes) = mean_std([r["train"] for r in at]), mean_std([r["test"] for r in at])
        rows.append({"estimator": name, "label": LABELS[name], "lr": rs[0]["lr"], "tau": rs[0]["tau"],
                     "optimizer": rs[0]["optimizer"], "seeds": [h["seed"] for h in rs],
                     "epochs_reached": [h["epoch"] for h in rs], "epoch": common,
                     "train": tr, "train_std": trs, "test": te, "test_std": tes,
                     "per_seed_test": [r["test"] for r in at], "per_seed_train": [r["train"] for r in at],
                     "member_epoch_s": mean_std([r["wall_s"] for h in rs for r in h["history"]])[0],
                     "paper": PAPER_ELBO.get(name)})
    return rows


def table(cfg: str, rows: List[dict], command: str) -> str:
    if not rows:
        return f"{cfg}: no runs yet"
    epoch = rows[0]["epoch"]
    best = min((r["test"] for r in rows if r["test"] is not None), default=None)
    lines = [f"Categorical VAE {cfg} on MNIST, each estimator at its ReinMax-paper Table-8 lr / tau / optimizer, batch "
             f"100, {epoch} epochs of the 50k training split (the paper: 160 epochs of 60k). -ELBO in nats, mean +- std "
             f"over seeds (lower is better): train as the paper reports it (running mean over the epoch's updates), "
             f"test on the 10k test images, one sample per image. Gumbel-Rao k={GR_K}.", "",
             "| estimator (lr / tau / opt) | seeds | epochs | train -ELBO | test -ELBO | per-seed test |"
             + (" paper train / test |" if any(r["paper"] for r in rows) else ""),
             "|---|---|---|---|---|---|" + ("---|" if any(r["paper"] for r in rows) else "")]
    for r in rows:
        paper = r["paper"]
        ptxt = "" if not any(r["paper"] for r in rows) else (
            " n/a |" if not paper else f" {paper.get('train', float('nan')):.2f} / {paper.get('test', float('nan')):.2f} |")
        mark = " **(best)**" if r["test"] == best else ""
        lines.append(f"| {r['label']} ({r['lr']:g} / {r['tau']:g} / {r['optimizer']}) | {len(r['seeds'])} "
                     f"| {r['epoch']} | {r['train']:.2f} +- {r['train_std']:.2f} | {r['test']:.2f} +- "
                     f"{r['test_std']:.2f}{mark} | {', '.join(f'{v:.2f}' for v in r['per_seed_test'])} |{ptxt}")
    reached = sorted({e for r in rows for e in r["epochs_reached"]})
    lines += ["", f"epochs reached per run: {reached[0]}-{reached[-1]} (the table is at epoch {epoch}, which every run "
              f"reached); one member-epoch took {min(r['member_epoch_s'] for r in rows):.1f}-"
              f"{max(r['member_epoch_s'] for r in rows):.1f} s on one thread (shared machine)",
              f"command: {command}", f"machine: {machine()}"]
    return "\n".join(lines)


def plot(cfg: str, runs: Dict[str, List[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for j, (name, rs) in enumerate(runs.items()):
        n = min(h["epoch"] for h in rs)
        if n == 0:
            continue
        for ax, key in zip(axes, ("train", "test")):
            vals = torch.tensor([[r[key] for r in h["history"][:n]] for h in rs])
            mean, std = vals.mean(0), (vals.std(0) if len(rs) > 1 else torch.zeros(n))
            x = range(1, n + 1)
            ax.plot(x, mean, color=f"C{j}", label=f"{LABELS[name]} (tau {rs[0]['tau']:g}, {len(rs)} seeds)")
            ax.fill_between(x, mean - std, mean + std, color=f"C{j}", alpha=0.2)
    for ax, key in zip(axes, ("train (running mean over the epoch)", "test (10k images)")):
        ax.set(xlabel="epoch", ylabel="-ELBO (nats)", title=f"{cfg}: {key}")
        ax.title.set_fontsize(9)
        lo = [ln.get_ydata()[-1] for ln in ax.get_lines()]
        if lo:
            ax.set_ylim(min(lo) - 5, min(lo) + 45)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(work: Path, configs: Sequence[str], out: Path, command: str,
           seeds: Optional[Sequence[int]] = None, name: str = "vae_long") -> List[dict]:
    out.mkdir(parents=True, exist_ok=True)
    results, texts = [], []
    for cfg in configs:
        runs = collect(work, cfg, seeds)
        rows = summarize(runs)
        results.append({"config": cfg, "rows": rows, "histories": runs})
        saved = work / cfg / "command.txt"  # the invocation that trained this configuration
        texts.append(table(cfg, rows, saved.read_text().strip() if saved.exists() else command))
        if rows:
            plot(cfg, runs, out / f"{name}_{cfg}.png")
    text = "\n\n".join(texts)
    write_json(out / f"{name}.json", results)
    (out / f"{name}.md").write_text(text + "\n")
    print(text, flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=mnist.DEFAULT_ROOT)
    ap.add_argument("--configs", default="8x4", help="comma-separated: " + ", ".join(PAPER))
    ap.add_argument("--estimators", default=",".join(NAMES), help="comma-separated: " + ", ".join(NAMES))
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--epochs", type=int, default=50, help="epochs per run (paper: 160)")
    ap.add_argument("--time-budget", type=float, default=float("inf"),
                    help="seconds for this invocation; a later invocation continues from the checkpoints")
    ap.add_argument("--snapshot-epochs", default=",".join(map(str, SNAPSHOT_EPOCHS)),
                    help="epochs whose weights are kept for the gradient study")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=REPO.parent / "runs" / "vae_long", help="checkpoints (outside git)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "reinmax")
    ap.add_argument("--name", default="vae_long", help="output files: <out>/<name>.{md,json}, <name>_<config>.png")
    ap.add_argument("--report", action="store_true", help="only write the table and curves of --seeds from --work")
    args = ap.parse_args(argv)
    configs = parse_list(ap, "--configs", args.configs, str, positive=False)
    names = parse_list(ap, "--estimators", args.estimators, str, positive=False)
    seeds = parse_list(ap, "--seeds", args.seeds, int, positive=False)
    snaps = parse_list(ap, "--snapshot-epochs", args.snapshot_epochs, int, positive=False)
    for flag, values, known in (("--configs", configs, PAPER), ("--estimators", names, NAMES)):
        if not set(values) <= set(known):
            ap.error(f"{flag}: {sorted(set(values) - set(known))} unknown; choose from {', '.join(known)}")
    if args.epochs < 1:
        ap.error(f"--epochs must be >= 1, got {args.epochs}")
    if not args.time_budget > 0:
        ap.error(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    command = recorded_command("benchmarks.reinmax_vae_long", argv if argv is not None else sys.argv[1:])
    if args.report:
        return report(args.work, configs, args.out, command, seeds, args.name)
    reason = mnist.missing(args.data)
    if reason is not None:
        print(f"skipped: {reason}; pass --data", flush=True)
        return []
    torch.set_num_threads(args.threads)
    for cfg in configs:
        (args.work / cfg).mkdir(parents=True, exist_ok=True)
        (args.work / cfg / "command.txt").write_text(command + "\n")
    train, _, test = splits(args.data, "cpu")
    start = time.time()
    for i, cfg in enumerate(configs):
        members = [Member(cfg, n, s, args.work, snaps) for s in seeds for n in names]
        left = args.time_budget - (time.time() - start)
        why = train_members(members, train, test, args.epochs, left / (len(configs) - i))
        print(f"[{cfg}] {why}", flush=True)
    return report(args.work, configs, args.out, command, seeds, args.name)


if __name__ == "__main__":
    main()
