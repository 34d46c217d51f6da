"""The stability benchmark the monitor is judged on, and the learning-rate sensitivity sweep.

Tiny decoder-only LMs (admin_torch's reference stacks, causal, d=64, 4 heads) trained with AdamW
(0.9, 0.95), eps 1e-8, no weight decay, no clipping, linear warm-up then cosine decay, on the English
side of Multi30k (word level, the 2,000 most frequent words + <unk>, windows of 32 tokens, batch 16),
each under :class:`stability_toolbox.StabilityMonitor` (``every=--interval``), one thread, niced.

Subcommands::

    python -m benchmarks.stability_grid grid     # the mechanisms x variants x seeds grid
    python -m benchmarks.stability_grid lr       # the learning-rate sweep (Post-LN, Admin, DeepNorm, Pre-LN, Pre-LN+qk)
    python -m benchmarks.stability_grid analyze  # tables and plots under results/monitor/

Every finished run is saved (``<work>/<run>/result.json`` with the per-update losses and the
monitor's ``monitor.jsonl``); a killed sweep continues where it stopped. ``--budget-min`` stops
starting new runs after that many minutes.

The grid (``GRID``): for each mechanism, a *candidate* that the literature says fails and the
toolbox's *remedy* of it, same seed, plus stable *controls*:

* ``deep_postln``: 12-layer Post-LN (24 residual sublayers) vs Admin (remedy) and Pre-LN (control);
* ``attn_logits``: 2-layer Pre-LN at a high learning rate vs the same with qk-layernorm (remedy),
  and Pre-LN at a moderate learning rate (control);
* ``output_logits``: 2-layer Pre-LN + qk-layernorm at learning rates 0.5 and 1 vs the same with
  z-loss 1e-4 (remedy), and with z-loss at 0.03 (control); ``output_logits_slow``: lr 1 with a
  200-update warm-up (the instability arrives after the run has learned for a while).

``analyze`` judges every run against its group's reference (the lowest final validation loss among
the group's runs of the same seed): *failed* when its final validation loss exceeds the reference's by
more than ``FAIL_REL`` (5%); the *separation update* is the first update (from update ``SMOOTH`` on) at
which its training loss (mean over ``SMOOTH`` = 10 updates) exceeds the reference run's by more than 5%;
the *first warning* replays the monitor's history through :mod:`stability_toolbox.warning_rules`
with :data:`stability_toolbox.DEFAULT_RULES`; *lead time* = separation update - first warning's update.
"""

import argparse
import gzip
import json
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

from toolbox_core.files import atomic_write

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "multi30k" / "tok"
WORK = REPO / "work" / "stability_grid"  # git-ignored; --work points elsewhere
OUT = REPO / "results" / "monitor"

VOCAB = 2000
SEQ = 32
BATCH = 16
DIM = 64
HEADS = 4
FAIL_REL = 0.05   # failed: final validation loss > 1.05 x the group's best (same seed)
SMOOTH = 10       # the separation compares training losses averaged over 10 updates

# mechanism -> [(variant, role, settings)]; role: candidate (expected to fail), remedy, control
GRID = {
    "deep_postln": [
        ("post_ln", "candidate", dict(kind="post_ln", depth=12, lr=2e-3)),
        ("admin", "remedy", dict(kind="admin", depth=12, lr=2e-3)),
        ("pre_ln", "control", dict(kind="pre_ln", depth=12, lr=2e-3)),
    ],
    "attn_logits": [
        ("pre_ln_lr0.1", "candidate", dict(kind="pre_ln", depth=2, lr=0.1)),
        ("pre_ln_lr0.1_qk", "remedy", dict(kind="pre_ln", depth=2, lr=0.1, qk_norm=True)),
        ("pre_ln_lr0.03", "control", dict(kind="pre_ln", depth=2, lr=3e-2)),
        ("pre_ln_lr0.003", "control", dict(kind="pre_ln", depth=2, lr=3e-3)),
    ],
    "output_logits": [
        ("qk_lr0.5", "candidate", dict(kind="pre_ln", depth=2, lr=0.5, qk_norm=True)),
        ("qk_lr0.5_z", "remedy", dict(kind="pre_ln", depth=2, lr=0.5, qk_norm=True, z_loss=1e-4)),
        ("qk_lr1", "candidate", dict(kind="pre_ln", depth=2, lr=1.0, qk_norm=True)),
        ("qk_lr1_z", "remedy", dict(kind="pre_ln", depth=2, lr=1.0, qk_norm=True, z_loss=1e-4)),
        ("qk_lr0.03_z", "control", dict(kind="pre_ln", depth=2, lr=3e-2, qk_norm=True, z_loss=1e-4)),
    ],
    # the same with a 200-update warm-up: the learning rate reaches the unstable range only after the run
    # has learned normally for a while, so a warning can precede the separation
    "output_logits_slow": [
        ("qk_lr1", "candidate", dict(kind="pre_ln", depth=2, lr=1.0, qk_norm=True, warmup=200)),
        ("qk_lr1_z", "remedy", dict(kind="pre_ln", depth=2, lr=1.0, qk_norm=True, z_loss=1e-4, warmup=200)),
        ("qk_lr0.03_z", "control", dict(kind="pre_ln", depth=2, lr=3e-2, qk_norm=True, z_loss=1e-4, warmup=200)),
    ],
}
LR_KINDS = {"post_ln": dict(kind="post_ln"), "admin": dict(kind="admin"), "deepnorm": dict(kind="deepnorm"),
            "pre_ln": dict(kind="pre_ln"), "pre_ln_qk": dict(kind="pre_ln", qk_norm=True)}


# ----------------------------------------------------------------------------- data and model

def load_data(vocab: int = VOCAB):
    """(train ids, valid ids) as 1-D LongTensors: word ids, sentences joined by an end-of-sentence id."""
    import torch

    def words(split):
        with gzip.open(DATA / f"{split}.lc.norm.tok.en.gz", "rt", encoding="utf-8") as f:
            return [line.split() + ["</s>"] for line in f]

    train, valid = words("train"), words("val")
    counts = Counter(w for s in train for w in s)
    itos = ["<unk>"] + [w for w, _ in counts.most_common(vocab - 1)]
    stoi = {w: i for i, w in enumerate(itos)}

    def ids(sents):
        return torch.tensor([stoi.get(w, 0) for s in sents for w in s], dtype=torch.long)

    return ids(train), ids(valid)


def build(settings: dict, seed: int):
    import torch
    from torch import nn

    from admin_torch import make_stack

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.embed = nn.Embedding(VOCAB, DIM)
            nn.init.normal_(self.embed.weight, std=DIM ** -0.5)
            self.stack = make_stack(settings["kind"], settings["depth"], DIM, heads=HEADS, seed=seed, causal=True,
                                    qk_norm=settings.get("qk_norm", False))
            self.head = nn.Linear(DIM, VOCAB, bias=False)

        def forward(self, tokens):
            return self.head(self.stack(self.embed(tokens)))

    return TinyLM()


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_one(run_dir: Path, settings: dict, seed: int, updates: int, warmup: int, interval: int, data) -> dict:
    import torch
    import torch.nn.functional as F

    from stability_toolbox import StabilityMonitor
    from stability_toolbox.z_loss import cross_entropy_with_z_loss

    torch.set_num_threads(1)
    train, valid = data
    model = build(settings, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1000 + seed)
    z = settings.get("z_loss", 0.0)
    run_dir.mkdir(parents=True, exist_ok=True)
    jsonl = run_dir / "monitor.jsonl"
    if jsonl.exists():
        jsonl.unlink()  # an interrupted attempt: start the run over
    mon = StabilityMonitor(model, run_dir, every=interval, tensorboard=False, heatmaps=False)
    losses: List[float] = []
    t0 = time.time()
    for step in range(updates):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, settings["lr"], warmup, updates)
        starts = torch.randint(0, train.numel() - SEQ - 1, (BATCH,), generator=gen)
        batch = torch.stack([train[s:s + SEQ + 1] for s in starts.tolist()])
        with mon.step() as s:
            logits = model(batch[:, :-1])
            mon.observe_logits(logits)
            loss = cross_entropy_with_z_loss(logits, batch[:, 1:], z_loss=z)
            loss.backward()
            mon.capture_grads()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ce = F.cross_entropy(logits.detach().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
            s.loss = ce
        losses.append(float(ce))
    seconds = time.time() - t0
    mon.close()
    valid_loss = validation_loss(model, valid)
    return {"settings": settings, "seed": seed, "updates": updates, "warmup": warmup, "interval": interval,
            "losses": losses, "valid_loss": valid_loss, "train_seconds": seconds,
            "init_loss": math.log(VOCAB)}


def validation_loss(model, valid) -> float:
    """The mean next-token cross-entropy (nats) of ``model`` (in eval mode) over the token stream ``valid``, cut
    into sequences of ``SEQ`` and batches of 64."""
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        n = (valid.numel() - 1) // SEQ
        x = valid[: n * SEQ + 1]
        inp, tgt = x[:-1].view(n, SEQ), x[1:].view(n, SEQ)
        vals = [F.cross_entropy(model(inp[i:i + 64]).reshape(-1, VOCAB), tgt[i:i + 64].reshape(-1)).item()
                for i in range(0, n, 64)]
    return statistics.mean(vals)


def run_name(group: str, variant: str, seed: int) -> str:
    return f"{group}__{variant}__s{seed}"


def run_all(jobs, a) -> None:
    """``jobs``: [(run name, settings, seed, extra)]; resumable, within ``--budget-min``."""
    data = load_data()
    t0 = time.time()
    for i, (name, settings, seed, extra) in enumerate(jobs):
        done = a.work / name / "result.json"
        if done.exists():
            continue
        if (time.time() - t0) / 60 > a.budget_min:
            print(f"budget of {a.budget_min} min spent; {len(jobs) - i} runs left (run again to continue)", flush=True)
            return
        result = train_one(a.work / name, settings, seed, a.updates, settings.get("warmup", a.warmup), a.interval,
                           data)
        result.update(extra)
        with atomic_write(done) as f:  # a killed sweep never leaves half a result
            f.write(json.dumps(result))
        print(f"[{time.time() - t0:6.0f}s] {name}: valid {result['valid_loss']:.3f}, "
              f"{result['train_seconds']:.0f}s", flush=True)


def grid_jobs(seeds, groups=None) -> list:
    jobs = []
    for seed in seeds:  # seed-major: an interrupted grid has whole seeds
        for group, variants in GRID.items():
            if groups is not None and group not in groups:
                continue
            for variant, role, settings in variants:
                jobs.append((run_name(group, variant, seed), settings, seed,
                             {"group": group, "variant": variant, "role": role}))
    return jobs


def lr_jobs(seeds, lrs, depth) -> list:
    jobs = []
    for seed in seeds:
        for lr in lrs:
            for name, kw in LR_KINDS.items():
                settings = dict(kw, depth=depth, lr=lr)
                jobs.append((f"lr__{name}__d{depth}__lr{lr:g}__s{seed}", settings, seed,
                             {"group": "lr", "variant": name, "lr": lr}))
    return jobs


# ----------------------------------------------------------------------------- analysis

def smooth(xs: List[float], k: int = SMOOTH) -> List[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        x = x if math.isfinite(x) else 1e9
        acc += x
        if i >= k:
            acc -= xs[i - k] if math.isfinite(xs[i - k]) else 1e9
        out.append(acc / min(i + 1, k))
    return out


def separation(run: List[float], ref: List[float], rel: float = FAIL_REL) -> Optional[int]:
    """The first update at which the smoothed training loss of ``run`` exceeds ``ref``'s by > ``rel`` (relative)."""
    a, b = smooth(run), smooth(ref)
    for i, (x, y) in enumerate(zip(a, b)):
        if i >= SMOOTH and x > y * (1 + rel):
            return i
    return None


def read_history(run_dir: Path) -> List[dict]:
    """The monitor's records, non-finite values back as numbers (the file writes them as strings)."""
    from stability_toolbox.monitor import read_records

    return read_records(run_dir / "monitor.jsonl")


def judge_grid(work: Path, rules=None) -> List[dict]:
    from stability_toolbox import DEFAULT_RULES
    from stability_toolbox.warning_rules import first_warning

    rules = DEFAULT_RULES if rules is None else rules
    results = {}
    for d in sorted(work.iterdir()):
        if (d / "result.json").exists() and not d.name.startswith("lr__"):
            results[d.name] = json.loads((d / "result.json").read_text())
    rows = []
    for name, r in results.items():
        group, seed = r["group"], r["seed"]
        peers = [p for p in results.values() if p["group"] == group and p["seed"] == seed]
        ref = min(peers, key=lambda p: p["valid_loss"] if math.isfinite(p["valid_loss"]) else 1e9)
        vl = r["valid_loss"] if math.isfinite(r["valid_loss"]) else float("inf")
        failed = vl > ref["valid_loss"] * (1 + FAIL_REL)
        sep = separation(r["losses"], ref["losses"]) if failed else None
        warn = first_warning(read_history(work / name), rules)
        lead = (sep - warn["step"]) if (failed and warn is not None and sep is not None) else None
        rows.append({"run": name, "group": group, "variant": r["variant"], "role": r["role"], "seed": seed,
                     "valid_loss": r["valid_loss"], "ref": ref["variant"], "ref_valid_loss": ref["valid_loss"],
                     "failed": failed, "separation": sep, "first_warning": None if warn is None else warn["step"],
                     "warning_quantity": None if warn is None else warn["quantity"],
                     "warning": None if warn is None else warn["message"], "lead": lead})
    return rows


CALIBRATION_SEED = 1  # the default rules' thresholds and rates were set on pilot runs of this seed


def summarize_grid(rows: List[dict], seeds=None) -> List[dict]:
    out = []
    for group in GRID:
        rs = [r for r in rows if r["group"] == group and (seeds is None or r["seed"] in seeds)]
        failing = [r for r in rs if r["failed"]]
        stable = [r for r in rs if not r["failed"]]
        hits = [r for r in failing if r["first_warning"] is not None and r["lead"] is not None and r["lead"] >= 0]
        leads = [r["lead"] for r in failing if r["lead"] is not None]
        out.append({"mechanism": group, "runs": len(rs), "failed": len(failing), "hits": len(hits),
                    "warned_late": len([r for r in failing if r["lead"] is not None and r["lead"] < 0]),
                    "missed": len([r for r in failing if r["first_warning"] is None]),
                    "stable": len(stable), "false_alarms": len([r for r in stable if r["first_warning"] is not None]),
                    "median_lead": statistics.median(leads) if leads else None, "leads": leads})
    total = {"mechanism": "all", "median_lead": None, "leads": [x for o in out for x in o["leads"]]}
    for key in ("runs", "failed", "hits", "warned_late", "missed", "stable", "false_alarms"):
        total[key] = sum(o[key] for o in out)
    if total["leads"]:
        total["median_lead"] = statistics.median(total["leads"])
    return out + [total]


def lr_sensitivity(work: Path) -> dict:
    """Per kind: {lr: mean final valid loss over seeds}, and Wortsman's LR sensitivity: the mean over the
    learning rates of min(loss, init loss) - the best loss of the sweep."""
    per: Dict[str, Dict[float, List[float]]] = {}
    init = math.log(VOCAB)
    results = []
    for d in sorted(work.iterdir()):
        f = d / "result.json"
        if d.name.startswith("lr__") and f.exists():
            results.append(json.loads(f.read_text()))
    # only seeds whose sweep is complete (every model at every rate): an interrupted seed would bias the means
    cells = {(r["variant"], r["lr"]) for r in results}
    complete = {sd for sd in {r.get("seed") for r in results}
                if {(r["variant"], r["lr"]) for r in results if r.get("seed") == sd} == cells}
    for r in results:
        if r.get("seed") in complete:
            v = r["valid_loss"] if math.isfinite(r["valid_loss"]) else init
            per.setdefault(r["variant"], {}).setdefault(r["lr"], []).append(v)
    table = {}
    overall = min((statistics.mean(vs) for by_lr in per.values() for vs in by_lr.values()), default=None)
    for kind, by_lr in per.items():
        means = {lr: statistics.mean(vs) for lr, vs in sorted(by_lr.items())}
        best = min(means.values())
        table[kind] = {"losses": means, "best": best, "best_lr": min(means, key=means.get),
                       "sensitivity": statistics.mean(min(v, init) - best for v in means.values()),
                       # the same deviation measured from the best loss of every model of the sweep: a model
                       # that is bad at every rate is not "insensitive" on this one
                       "excess_over_overall_best": statistics.mean(min(v, init) - overall for v in means.values()),
                       "n_seeds": min(len(vs) for vs in by_lr.values()), "seeds": sorted(complete)}
    return table


def analyze(a) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    rows = judge_grid(a.work)
    all_seeds = sorted({r["seed"] for r in rows})
    eval_seeds = [x for x in all_seeds if x != CALIBRATION_SEED]
    summary = summarize_grid(rows, eval_seeds)
    calibration = summarize_grid(rows, [CALIBRATION_SEED])
    lines = ["# Stability grid: does the monitor warn before the loss separates?", "",
             f"Command: `{a.grid_command}` then `python -m benchmarks.stability_grid analyze`.", "",
             f"Failed: final validation loss > {1 + FAIL_REL:g} x the best of its group (same seed). Separation: "
             f"first update where its training loss (mean of {SMOOTH} updates) exceeds that run's by > "
             f"{100 * FAIL_REL:g}%. "
             "First warning: the monitor's history replayed through stability_toolbox.warning_rules with "
             "DEFAULT_RULES. Lead = separation - first warning (updates; > 0: warned before). The monitor logs "
             f"every {rows[0]['interval'] if rows and 'interval' in rows[0] else 10} updates, so a lead is "
             "known to that resolution.", ""]
    header = ["| mechanism | runs | failed | hits (warned before separation) | warned late | missed | stable | "
              "false alarms | median lead (updates) |", "|---|---|---|---|---|---|---|---|---|"]
    for title, table in ((f"Evaluation seeds {', '.join(map(str, eval_seeds))} (not used to set the rules):",
                          summary),
                         (f"Calibration seed {CALIBRATION_SEED} (the rules were set on its pilot runs):", calibration)):
        lines += [title, ""] + header
        for s in table:
            lines.append(f"| {s['mechanism']} | {s['runs']} | {s['failed']} | {s['hits']} | {s['warned_late']} | "
                         f"{s['missed']} | {s['stable']} | {s['false_alarms']} | {s['median_lead']} |")
        lines.append("")
    lines += ["", "| run | role | valid loss | group best | failed | separation | first warning | quantity | lead |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['role']} | {r['valid_loss']:.3f} | {r['ref_valid_loss']:.3f} ({r['ref']}) | "
                     f"{'yes' if r['failed'] else 'no'} | {r['separation']} | {r['first_warning']} | "
                     f"{r['warning_quantity']} | {r['lead']} |")
    lines += ["", "First warning lines:", ""]
    lines += [f"* {r['run']}: `{r['warning']}`" for r in rows if r["warning"]]
    (OUT / "grid.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (OUT / "grid.json").write_text(json.dumps({"summary_eval": summary, "summary_calibration": calibration,
                                               "eval_seeds": eval_seeds, "runs": rows}, indent=1), encoding="utf-8")
    # plot: per mechanism, the training loss curves with first warnings (x) and separations (|)
    cols = 2
    fig, axes = plt.subplots((len(GRID) + cols - 1) // cols, cols, figsize=(6 * cols, 4 * ((len(GRID) + 1) // cols)),
                             squeeze=False)
    colors = {"candidate": "tab:red", "remedy": "tab:green", "control": "tab:blue"}
    for ax, group in zip(axes.flat, GRID):
        for r in [r for r in rows if r["group"] == group]:
            res = json.loads((a.work / r["run"] / "result.json").read_text())
            ys = smooth(res["losses"])
            ax.plot(ys, color=colors[r["role"]], lw=1, ls="-" if r["seed"] % 2 else "--",
                    label=f"{r['variant']} s{r['seed']}")
            if r["first_warning"] is not None:
                ax.plot(r["first_warning"], ys[min(r["first_warning"], len(ys) - 1)], "x", color="k", ms=8)
            if r["separation"] is not None:
                ax.axvline(r["separation"], color=colors[r["role"]], lw=0.6, ls=":")
        ax.set_title(f"{group} (red: expected to fail, green: its remedy, blue: control)", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("update")
        ax.set_ylabel("training loss (nats, mean of 10)")
        ax.legend(fontsize=6)
    fig.suptitle("x: first stability warning (DEFAULT_RULES); dotted: the update its loss separated", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "grid.png", dpi=100)
    plt.close(fig)
    # LR sensitivity
    table = lr_sensitivity(a.work)
    if table:
        lrs = sorted({lr for t in table.values() for lr in t["losses"]})
        lines = ["# Learning-rate sensitivity (Wortsman et al. 2023)", "",
                 f"Command: `{a.lr_command}` then `python -m benchmarks.stability_grid analyze`.", "",
                 "Final validation loss (nats, mean over seeds) per peak learning rate. LR sensitivity (Wortsman et "
                 "al.) = mean over the rates of min(loss, loss at init = ln 2000) - that model's best loss of the sweep; "
                 "excess = the same mean measured from the best loss of all models (a model bad at every rate has a "
                 "small sensitivity but a large excess). Seeds: only seeds whose sweep is complete.", "",
                 "| model | " + " | ".join(f"{lr:g}" for lr in lrs) + " | best | LR sensitivity | excess over overall "
                 "best | seeds |", "|---|" + "---|" * (len(lrs) + 4)]
        for kind in LR_KINDS:
            if kind in table:
                t = table[kind]
                lines.append(f"| {kind} | " + " | ".join(f"{t['losses'][lr]:.3f}" if lr in t["losses"] else "-"
                                                          for lr in lrs)
                             + f" | {t['best']:.3f} | {t['sensitivity']:.3f} | {t['excess_over_overall_best']:.3f} | "
                               f"{t['n_seeds']} |")
        (OUT / "lr_sensitivity.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (OUT / "lr_sensitivity.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for kind in LR_KINDS:
            if kind in table:
                xs = sorted(table[kind]["losses"])
                ax.plot(xs, [table[kind]["losses"][x] for x in xs], "o-",
                        label=f"{kind} (sens. {table[kind]['sensitivity']:.2f})")
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("final validation loss (nats)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(OUT / "lr_sensitivity.png", dpi=100)
        plt.close(fig)
    print((OUT / "grid.md").read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("grid", "lr", "analyze", "one"))
    ap.add_argument("--work", type=Path, default=WORK / "grid")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--updates", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--budget-min", type=float, default=60.0)
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2,3e-2")
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--groups", default="", help="grid: only these groups (comma-separated; default all)")
    ap.add_argument("--settings", default="{}", help="one: a JSON dict of settings")
    ap.add_argument("--grid-command", default="python -m benchmarks.stability_grid grid --seeds 1,2,3,4,5")
    ap.add_argument("--lr-command", default="python -m benchmarks.stability_grid lr --seeds 1,2 --lrs "
                                            "3e-4,1e-3,3e-3,1e-2,3e-2,1e-1")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.what == "grid":
        run_all(grid_jobs(seeds, a.groups.split(",") if a.groups else None), a)
    elif a.what == "lr":
        run_all(lr_jobs(seeds, [float(x) for x in a.lrs.split(",")], a.depth), a)
    elif a.what == "one":
        s = json.loads(a.settings)
        r = train_one(a.work / ("one_" + "_".join(f"{k}{v}" for k, v in s.items())), s, seeds[0], a.updates,
                      a.warmup, a.interval, load_data())
        from stability_toolbox.warning_rules import replay
        from stability_toolbox import DEFAULT_RULES
        print(json.dumps({k: r[k] for k in ("valid_loss", "train_seconds")}),
              [round(sum(r["losses"][i:i + 20]) / 20, 2) for i in range(0, len(r["losses"]), 20)])
        hist = read_history(a.work / ("one_" + "_".join(f"{k}{v}" for k, v in s.items())))
        for q in ("attn_logit_max", "grad_ratio", "log_z_rms", "grad_norm"):
            vals = []
            for h in hist:
                rows = h["quantities"].get(q) or ({"m": h[q]} if q in h else {})
                if rows:
                    vals.append(round(max(rows.values()) if q != "grad_ratio" else min(rows.values()), 4))
            print(q, vals)
        print([w["message"][:160] for w in replay(hist, DEFAULT_RULES)][:5])
    else:
        analyze(a)


if __name__ == "__main__":
    sys.exit(main())
