"""ListOps unsupervised parsing (ReinMax paper, Sec. 6.3) with all five estimators, on the official test set.

The latent-tree model of ``recipes/listops`` (fairseq task ``listops``, model ``listops_tree``) trained on
generated expressions (``recipes/listops/prepare.py``, which excludes the official valid and test
expressions), then scored on the official files of ``../shared/data/listops``.

Protocol (the same for every estimator): every tau of ``--taus`` trained once (tuning seed 100) and
scored on the official validation set (1000 expressions); then ``--seeds`` fresh seeds at the chosen
tau, each scored once on the official test set (10 000 expressions, up to 939 tokens): accuracy mean
+- std. Every run gets the same updates. Runs go ``--jobs`` at a time (one thread each); a finished
run's ``result.json`` is reused, so an interrupted sweep resumes.

    python -m benchmarks.reinmax_listops                  # CPU budget: hidden 64, 400 updates, ~45 CPU-min
    python -m benchmarks.reinmax_listops --quick          # smoke run
    python -m benchmarks.reinmax_listops --hidden-dim 300 --max-update 100000 --seeds 1,2,3,4,5 --device cuda
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.sweep import mean_std, parse_list, run_jobs, write_json

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "listops"

OFFICIAL = REPO.parent / "shared" / "data" / "listops"
NAMES = ["reinmax", "straight_through", "gumbel_softmax", "gapped_straight_through", "gumbel_rao"]
TAUS = [0.5, 1.0, 1.5]


def sh(cmd, log: Path) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    with open(log, "w") as f:
        return subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode


def one_run(name: str, tau: float, seed: int, split: str, args) -> dict:
    """Train with ``name`` at ``tau``; accuracy on the official ``split`` ('valid' or 'test'). Cached."""
    run_dir = args.work / f"{name}-tau{tau:g}-s{seed}-h{args.hidden_dim}-u{args.max_update}"
    done = run_dir / f"result_{split}.json"
    if done.exists():
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint_last.pt"
    if not ckpt.exists():
        # tuning: fairseq-train's own validation at the end is the official valid set (prepare.py links it);
        # final runs skip it and are scored once on the official test set below
        extra = ["--validate-interval", "1000"] if split == "valid" else ["--disable-validation"]
        code = sh([sys.executable, RECIPE / "train.py", "--data", args.work / "data", "--save-dir", run_dir,
                   "--estimator", name, "--tau", tau, "--hidden-dim", args.hidden_dim, "--max-update", args.max_update,
                   "--seed", seed, "--device", args.device, "--", *extra], run_dir / "train.log")
        if code != 0:
            raise RuntimeError(f"training failed: see {run_dir / 'train.log'}")
    log = (run_dir / "train.log").read_text()
    walls = [float(w) for w in re.findall(r"\| train \|.*?train_wall (\d+(?:\.\d+)?)", log)]
    result = {"estimator": name, "tau": tau, "seed": seed, "split": split, "train_wall_s": sum(walls)}
    if split == "valid":
        valid = re.findall(r"\| valid \|.*?accuracy (\d+(?:\.\d+)?)", log)
        if not valid:
            raise RuntimeError(f"no validation accuracy in {run_dir / 'train.log'}")
        result["accuracy"] = float(valid[-1])
    else:
        if sh([sys.executable, RECIPE / "evaluate.py", "--checkpoint", ckpt, "--test", OFFICIAL / "test_d20s.tsv",
               "--json", run_dir / "eval_test.json"], run_dir / "eval_test.log") != 0:
            raise RuntimeError(f"evaluation failed: see {run_dir / 'eval_test.log'}")
        ev = json.loads((run_dir / "eval_test.json").read_text())
        result.update(accuracy=ev["accuracy"], examples=ev["examples"], accuracy_by_length=ev["accuracy_by_length"])
    write_json(done, result)
    return result


def describe(r: dict) -> str:
    return f"{r['estimator']} tau {r['tau']:g} seed {r['seed']}: {r['split']} accuracy {r['accuracy']:.2f}%"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimators", default=",".join(NAMES), help="comma-separated: " + ", ".join(NAMES))
    p.add_argument("--taus", default=",".join(map(str, TAUS)), help="the tau grid, the same for every estimator")
    p.add_argument("--seeds", default="1,2,3", help="final runs at the chosen tau (tuning: seed 100)")
    p.add_argument("--num-train", type=int, default=20000, help="scale: generated training expressions")
    p.add_argument("--hidden-dim", type=int, default=64, help="scale: embedding, Tree-LSTM and MLP size (paper 300)")
    p.add_argument("--max-update", type=int, default=400, help="scale: updates per run, batch 16")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="2 estimators, taus 0.5 1.5, one seed, 20 updates")
    p.add_argument("--work", type=Path, default=REPO / "work" / "listops")
    p.add_argument("--out", type=Path, default=REPO / "results" / "reinmax")
    args = p.parse_args(argv)
    if args.quick:
        args.estimators, args.taus, args.seeds, args.max_update, args.num_train = \
            "reinmax,gumbel_softmax", "0.5,1.5", "1", 20, 2000
        args.work = args.out = args.work.with_name(args.work.name + "_quick")
    names = args.estimators.split(",")
    if any(n not in NAMES for n in names):
        p.error(f"--estimators: accepted {', '.join(NAMES)}; got {args.estimators}")
    taus = parse_list(p, "--taus", args.taus)
    seeds = parse_list(p, "--seeds", args.seeds, int, positive=False)
    if not (OFFICIAL / "test_d20s.tsv").exists() or not (OFFICIAL / "valid.tsv").exists():
        p.error(f"the official ListOps files are not in {OFFICIAL} (valid.tsv, test_d20s.tsv)")
    t0 = time.time()
    if not (args.work / "data" / "train.tsv").exists():
        print(f"generating {args.num_train} training expressions ...", flush=True)
        (args.work / "data").mkdir(parents=True, exist_ok=True)
        if sh([sys.executable, RECIPE / "prepare.py", "--dest", args.work / "data", "--num-train", args.num_train,
               "--max-length", 100, "--seed", 1], args.work / "prepare.log") != 0:
            sys.exit(f"prepare failed: see {args.work / 'prepare.log'}")
    tuning = run_jobs(one_run, [(n, t, 100, "valid", args) for n in names for t in taus], args.jobs, label="tuning",
                      describe=describe)
    chosen = {n: max((r for r in tuning if r["estimator"] == n), key=lambda r: r["accuracy"])["tau"] for n in names}
    final = run_jobs(one_run, [(n, chosen[n], s, "test", args) for n in names for s in seeds], args.jobs,
                     label="final", describe=describe)
    rows = []
    for n in names:
        accs = [r["accuracy"] for r in sorted(final, key=lambda r: r["seed"]) if r["estimator"] == n]
        test_mean, test_std = mean_std(accs)
        rows.append({"estimator": n, "tau": chosen[n], "test_mean": test_mean, "test_std": test_std, "per_seed": accs,
                     "valid_by_tau": {f"{r['tau']:g}": r["accuracy"] for r in tuning if r["estimator"] == n}})
    wall = time.time() - t0
    lines = [f"ListOps, latent-tree model (hidden {args.hidden_dim}, batch 16, Adam lr 7e-4, clip 5), {args.max_update} "
             f"updates on {args.num_train} generated expressions (length <= 100). tau grid {taus} for every estimator, "
             f"chosen by accuracy on the official valid set (1000, tuning seed 100); official test set (10 000) accuracy "
             f"mean +- std over {len(seeds)} seeds {args.seeds} at the chosen tau, touched once per seed.", "",
             "| estimator | tau | test accuracy % (mean +- std) | per seed | valid accuracy % by tau |",
             "|---|---|---|---|---|"]
    for r in rows:
        edge = " (grid edge)" if len(taus) > 1 and r["tau"] in (taus[0], taus[-1]) else ""
        lines.append(f"| {r['estimator']} | {r['tau']:g}{edge} | {r['test_mean']:.2f} +- {r['test_std']:.2f} | "
                     f"{', '.join(f'{a:.2f}' for a in r['per_seed'])} | "
                     f"{', '.join(f'{t}: {a:.1f}' for t, a in r['valid_by_tau'].items())} |")
    lines += ["", f"command: python -m benchmarks.reinmax_listops --estimators {args.estimators} --taus {args.taus} "
              f"--seeds {args.seeds} --num-train {args.num_train} --hidden-dim {args.hidden_dim} --max-update "
              f"{args.max_update} --device {args.device}",
              f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.jobs} runs at a time x 1 thread; wall "
              f"{wall / 60:.0f} min (cached runs cost nothing)"]
    table = "\n".join(lines)
    print(table, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "listops.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": rows, "runs": tuning + final}, indent=1))
    (args.out / "listops.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for j, r in enumerate(rows):
        ts = sorted(r["valid_by_tau"], key=float)
        axes[0].plot([float(t) for t in ts], [r["valid_by_tau"][t] for t in ts], "o-", color=f"C{j}",
                     label=r["estimator"])
        axes[1].errorbar([j], [r["test_mean"]], yerr=[r["test_std"]], fmt="o", capsize=4, color=f"C{j}")
        axes[1].scatter([j] * len(r["per_seed"]), r["per_seed"], s=8, color=f"C{j}", alpha=0.5)
    axes[0].set(xlabel="tau", ylabel="valid accuracy % (tuning seed)", title="tuning on the official valid set")
    axes[1].set_xticks(range(len(rows)), [f"{r['estimator']}\ntau {r['tau']:g}" for r in rows], fontsize=7)
    axes[1].set(ylabel="test accuracy %", title=f"official test set, {len(seeds)} seeds")
    for ax in axes:
        ax.title.set_fontsize(9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "listops.png", dpi=120)
    print(f"wrote {args.out}/listops.{{json,md,png}}", flush=True)


if __name__ == "__main__":
    main()
