"""ListOps unsupervised parsing (ReinMax paper, Sec. 6.3) with all five estimators, on the official test set.

The latent-tree model of ``recipes/listops`` (fairseq task ``listops``, model ``listops_tree``) trained on
generated expressions (``recipes/listops/prepare.py``, which excludes the official valid and test
expressions), then scored on the official files of ``../shared/data/listops``.

Protocol (the same for every estimator): every tau of ``--taus`` trained once (tuning seed 100) and
scored on the official validation set (1000 expressions); then ``--seeds`` fresh seeds at the chosen
tau, each scored once on the official test set (10 000 expressions, up to 939 tokens): accuracy mean
+- std. Every run gets the same updates. Runs go ``--jobs`` at a time (one thread each); a finished
run's ``result.json`` is reused, so an interrupted sweep resumes; a run killed while training continues from
its last checkpoint (fairseq saves every ``--save-interval-updates``; a run counts as trained only once
fairseq-train has returned). ``--fixed-taus name=tau,...`` skips the tuning and trains every estimator at the
tau given (for a background run on a fixed budget); ``--time-budget S`` starts no run after S seconds (runs go
seed by seed, so what is finished is whole seeds of every estimator).

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

from benchmarks.sweep import mean_std, parse_list, recorded_args, run_jobs, write_json

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
    trained = run_dir / "trained.json"
    if not trained.exists():
        if time.time() > args.deadline:
            return None
        # tuning: fairseq-train's own validation at the end is the official valid set (prepare.py links it);
        # final runs skip it and are scored once on the official test set below
        extra = ["--validate-interval", "1000"] if split == "valid" else ["--disable-validation"]
        # a checkpoint every few hundred updates: a killed run continues from it (fairseq restores
        # checkpoint_last.pt, its optimizer and its place in the epoch), it does not restart
        extra += ["--save-interval-updates", str(args.save_interval_updates), "--keep-interval-updates", "1"]
        code = sh([sys.executable, RECIPE / "train.py", "--data", args.work / "data", "--save-dir", run_dir,
                   "--estimator", name, "--tau", tau, "--hidden-dim", args.hidden_dim, "--max-update", args.max_update,
                   "--seed", seed, "--device", args.device, "--", *extra],
                  run_dir / f"train.{len(list(run_dir.glob('train*.log')))}.log")
        if code != 0:
            raise RuntimeError(f"training failed: see the last train.*.log in {run_dir}")
        write_json(trained, {"max_update": args.max_update})
    log = "".join(f.read_text() for f in sorted(run_dir.glob("train*.log")))
    walls = [float(w) for w in re.findall(r"\| train \|.*?train_wall (\d+(?:\.\d+)?)", log)]
    updates = [int(u) for u in re.findall(r"num_updates[= ](\d+)", log)]
    result = {"estimator": name, "tau": tau, "seed": seed, "split": split, "train_wall_s": max(walls, default=0.0),
              "updates": max(updates, default=0), "hidden_dim": args.hidden_dim}
    if split == "valid":
        valid = re.findall(r"\| valid \|.*?accuracy (\d+(?:\.\d+)?)", log)
        if not valid:
            raise RuntimeError(f"no validation accuracy in {run_dir}/train.*.log")
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
    p.add_argument("--fixed-taus", default="", help="name=tau,...: no tuning, every estimator at its tau")
    p.add_argument("--save-interval-updates", type=int, default=250, help="checkpoint interval (resume point)")
    p.add_argument("--time-budget", type=float, default=float("inf"), help="seconds; no run starts after them")
    p.add_argument("--work", type=Path, default=REPO / "work" / "listops")
    p.add_argument("--out", type=Path, default=REPO / "results" / "reinmax")
    p.add_argument("--name", default="listops", help="output files: <out>/<name>.{json,md,png}")
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
    fixed = {}
    for item in filter(None, args.fixed_taus.split(",")):
        name, _, value = item.partition("=")
        try:
            fixed[name] = float(value)
        except ValueError:
            p.error(f"--fixed-taus: expected name=tau items, got {item!r}")
        if name not in names or not fixed[name] > 0:
            p.error(f"--fixed-taus: {item!r}: the name must be one of --estimators and tau > 0")
    if fixed and set(fixed) != set(names):
        p.error(f"--fixed-taus: give a tau for every estimator of --estimators ({', '.join(names)})")
    if not args.time_budget > 0:
        p.error(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    if not (OFFICIAL / "test_d20s.tsv").exists() or not (OFFICIAL / "valid.tsv").exists():
        p.error(f"the official ListOps files are not in {OFFICIAL} (valid.tsv, test_d20s.tsv)")
    t0 = time.time()
    args.deadline = t0 + args.time_budget
    if not (args.work / "data" / "train.tsv").exists():
        print(f"generating {args.num_train} training expressions ...", flush=True)
        (args.work / "data").mkdir(parents=True, exist_ok=True)
        if sh([sys.executable, RECIPE / "prepare.py", "--dest", args.work / "data", "--num-train", args.num_train,
               "--max-length", 100, "--seed", 1], args.work / "prepare.log") != 0:
            sys.exit(f"prepare failed: see {args.work / 'prepare.log'}")
    if fixed:
        tuning, chosen = [], fixed
    else:
        tuning = run_jobs(one_run, [(n, t, 100, "valid", args) for n in names for t in taus], args.jobs,
                          label="tuning", describe=describe)
        if None in tuning:
            sys.exit("time budget spent during tuning; run the same command again to continue")
        chosen = {n: max((r for r in tuning if r["estimator"] == n), key=lambda r: r["accuracy"])["tau"] for n in names}
    # seed by seed: a budget that ends early leaves whole seeds of every estimator
    final = run_jobs(one_run, [(n, chosen[n], s, "test", args) for s in seeds for n in names], args.jobs,
                     label="final", describe=lambda r: "not started (time budget)" if r is None else describe(r))
    final = [r for r in final if r is not None]
    done_seeds = [s for s in seeds if all(any(r["seed"] == s and r["estimator"] == n for r in final) for n in names)]
    final = [r for r in final if r["seed"] in done_seeds]
    if not final:
        sys.exit("no seed finished for every estimator; run the same command again to continue")
    seeds, args.seeds = done_seeds, ",".join(map(str, done_seeds))
    rows = []
    for n in names:
        accs = [r["accuracy"] for r in sorted(final, key=lambda r: r["seed"]) if r["estimator"] == n]
        test_mean, test_std = mean_std(accs)
        rows.append({"estimator": n, "tau": chosen[n], "test_mean": test_mean, "test_std": test_std, "per_seed": accs,
                     "valid_by_tau": {f"{r['tau']:g}": r["accuracy"] for r in tuning if r["estimator"] == n}})
    wall = time.time() - t0
    protocol = (f"tau fixed per estimator (--fixed-taus {args.fixed_taus}, no tuning)" if fixed else
                f"tau grid {taus} for every estimator, chosen by accuracy on the official valid set (1000, tuning seed "
                f"100)")
    lines = [f"ListOps, latent-tree model (hidden {args.hidden_dim}, batch 16, Adam lr 7e-4, clip 5), {args.max_update} "
             f"updates = {args.max_update * 16} examples seen ({args.max_update * 16 / args.num_train:.2f} epochs) of "
             f"{args.num_train} generated expressions (length <= 100). {protocol}; official test set (10 000) accuracy "
             f"mean +- std over {len(seeds)} seeds {args.seeds} at that tau, touched once per seed.", "",
             "| estimator | tau | test accuracy % (mean +- std) | per seed | valid accuracy % by tau |",
             "|---|---|---|---|---|"]
    for r in rows:
        edge = " (grid edge)" if not fixed and len(taus) > 1 and r["tau"] in (taus[0], taus[-1]) else ""
        lines.append(f"| {r['estimator']} | {r['tau']:g}{edge} | {r['test_mean']:.2f} +- {r['test_std']:.2f} | "
                     f"{', '.join(f'{a:.2f}' for a in r['per_seed'])} | "
                     f"{', '.join(f'{t}: {a:.1f}' for t, a in r['valid_by_tau'].items())} |")
    lines += ["", f"command: python -m benchmarks.reinmax_listops --estimators {args.estimators} "
              + ("" if fixed else f"--taus {args.taus} ") +
              f"--seeds {args.seeds} --num-train {args.num_train} --hidden-dim {args.hidden_dim} --max-update "
              f"{args.max_update} --device {args.device}" + (f" --fixed-taus {args.fixed_taus}" if fixed else ""),
              f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.jobs} runs at a time x 1 thread; wall "
              f"{wall / 60:.0f} min (cached runs cost nothing)"]
    table = "\n".join(lines)
    print(table, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"args": recorded_args(args),
                                                       "rows": rows, "runs": tuning + final}, indent=1))
    (args.out / f"{args.name}.md").write_text(table + "\n")
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
    fig.savefig(args.out / f"{args.name}.png", dpi=120)
    print(f"wrote {args.out}/{args.name}.{{json,md,png}}", flush=True)


if __name__ == "__main__":
    main()
