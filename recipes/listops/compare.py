#!/usr/bin/env python
"""Train the ListOps tree model with several estimators on the same data and budget, then evaluate.

Runs ``train.py`` for each estimator (in parallel, one thread each), then ``evaluate.py`` on the
test file, and writes ``OUT/results.json`` and ``OUT/results.md`` (accuracy, training
sentences/second from fairseq's ``train_wall``, evaluation speed).

Example (the measurement of the closing note)::

    python recipes/listops/compare.py --data /tmp/listops --out /tmp/listops_cmp --max-update 400 --hidden-dim 64
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_TAUS = {"reinmax": 1.1, "straight_through": 1.0, "gumbel_softmax": 0.5,
                "gapped_straight_through": 1.0, "gumbel_rao": 0.5}


def parse_train_log(text):
    """Last epoch-summary numbers of a fairseq-train log: train_wall, updates, valid accuracy."""
    walls = [float(w) for w in re.findall(r"\| train \|.*?train_wall (\d+(?:\.\d+)?)", text)]
    updates = [int(u) for u in re.findall(r"\| train \|.*?num_updates (\d+)", text)]
    valid = [float(a) for a in re.findall(r"\| valid \|.*?accuracy (\d+(?:\.\d+)?)", text)]
    return {"train_wall_s": sum(walls), "updates": updates[-1] if updates else 0,
            "valid_accuracy": valid[-1] if valid else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="directory made by prepare.py")
    p.add_argument("--out", required=True)
    p.add_argument("--estimators", nargs="+", default=["reinmax", "straight_through", "gumbel_softmax"])
    p.add_argument("--taus", nargs="*", type=float, default=None, help="one per estimator (default: per method)")
    p.add_argument("--max-update", type=int, default=400)
    p.add_argument("--hidden-dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--test", default=None, help="test file for evaluate.py (default: the official one)")
    p.add_argument("--limit", type=int, default=0, help="evaluate on the first N test lines only")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    taus = args.taus or [DEFAULT_TAUS[e] for e in args.estimators]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = {}
    for est, tau in zip(args.estimators, taus):
        log = open(out / f"train_{est}.log", "w")
        cmd = [sys.executable, str(HERE / "train.py"), "--data", args.data, "--save-dir", str(out / f"ck_{est}"),
               "--estimator", est, "--tau", str(tau), "--hidden-dim", str(args.hidden_dim),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--max-update", str(args.max_update), "--seed", str(args.seed), "--", "--validate-interval", "1000"]
        print(" ".join(cmd), flush=True)
        procs[est] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, tau)
    results = {}
    for est, (proc, log, tau) in procs.items():
        rc = proc.wait()
        log.close()
        text = (out / f"train_{est}.log").read_text()
        if rc != 0:
            sys.exit(f"training {est} failed (rc {rc}); see {out / f'train_{est}.log'}")
        stats = parse_train_log(text)
        stats["train_sentences_per_second"] = (stats["updates"] * args.batch_size / stats["train_wall_s"]
                                               if stats["train_wall_s"] else None)
        results[est] = {"tau": tau, **stats}
        print(f"trained {est}: {stats}", flush=True)
    evals = {}
    for est in procs:
        cmd = [sys.executable, str(HERE / "evaluate.py"), "--checkpoint", str(out / f"ck_{est}" / "checkpoint_last.pt"),
               "--json", str(out / f"eval_{est}.json")]
        if args.test:
            cmd += ["--test", args.test]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        print(" ".join(cmd), flush=True)
        evals[est] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    for est, proc in evals.items():
        if proc.wait() != 0:
            sys.exit(f"evaluating {est} failed")
        ev = json.loads((out / f"eval_{est}.json").read_text())
        results[est].update(test_accuracy=ev["accuracy"], test_examples=ev["examples"],
                            eval_sentences_per_second=ev["eval_sentences_per_second"],
                            test_accuracy_by_length=ev["accuracy_by_length"])
    (out / "results.json").write_text(json.dumps({"config": vars(args), "results": results}, indent=2))
    lines = ["| estimator | tau | updates | train sent/s | valid acc % | test acc % | eval sent/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for est, r in results.items():
        lines.append(f"| {est} | {r['tau']} | {r['updates']} | {r['train_sentences_per_second']:.1f} | "
                     f"{r['valid_accuracy']} | {r['test_accuracy']:.2f} | {r['eval_sentences_per_second']:.1f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
