#!/usr/bin/env python
"""Read the demo's fairseq-train JSON logs; print the results table, write it as markdown and JSON,
and plot the training curves (PNG).

    python recipes/demo/report.py --runs DIR/runs --models postln admin preln --vocab 64 --out DIR
"""

import argparse
import json
import math
import os
from typing import Dict, List


def read_curve(log_path: str) -> List[tuple]:
    """(update, train loss in bits) of every ``train_inner`` record of a ``--log-format json`` log."""
    curve = []
    if not os.path.exists(log_path):
        return curve
    with open(log_path, errors="replace") as f:
        for line in f:
            if "| train_inner |" not in line:
                continue
            rec = json.loads(line.split("| train_inner |", 1)[1])
            curve.append((int(rec["num_updates"]), float(rec["loss"])))
    return curve


def judge(curve: List[tuple], exit_code: int, chance: float) -> Dict[str, object]:
    """Final loss (mean of the last 3 records) and a verdict: diverged / stalled / trains."""
    if not curve:
        return {"final_loss": float("nan"), "status": "no log", "diverged": True}
    tail = [l for _, l in curve[-3:]]
    final = sum(tail) / len(tail)
    if exit_code != 0 or not all(math.isfinite(l) for _, l in curve) or final > curve[0][1]:
        status, diverged = "diverged", True
    elif final > 0.8 * chance:
        # barely better than guessing from word frequencies: the deep stack is not learning
        status, diverged = "stalled", True
    else:
        status, diverged = "trains", False
    return {"final_loss": final, "status": status, "diverged": diverged,
            "best_loss": min(l for _, l in curve), "updates": curve[-1][0]}


LABELS = {"postln": "Post-LN", "admin": "Admin (Post-LN + omega)", "preln": "Pre-LN"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", required=True, help="directory with one sub-directory per model")
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--vocab", type=int, required=True, help="target words (sets the 'stalled' threshold)")
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    chance = math.log2(a.vocab)  # loss (bits) of predicting target words uniformly
    rows, curves = [], {}
    for m in a.models:
        d = os.path.join(a.runs, m)
        curves[m] = read_curve(os.path.join(d, "train.log"))
        done = os.path.exists(os.path.join(d, "exit_code"))
        code = int(open(os.path.join(d, "exit_code")).read()) if done else 0
        row = {"model": m, **judge(curves[m], code, chance)}
        if not done:  # still running (or interrupted): report what the log has so far
            row["status"] += " (incomplete)"
        rows.append(row)

    lines = ["| model | updates | final train loss (bits) | best | diverged / failed | status |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {LABELS.get(r['model'], r['model'])} | {r.get('updates', 0)} | {r['final_loss']:.3f} | "
                     f"{r.get('best_loss', float('nan')):.3f} | {'yes' if r['diverged'] else 'no'} | {r['status']} |")
    table = "\n".join(lines)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write((a.title + "\n\n" if a.title else "") + table + "\n")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"chance_loss_bits": chance, "rows": rows}, f, indent=2)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in a.models:
        if curves[m]:
            xs, ys = zip(*curves[m])
            ax.plot(xs, [y if math.isfinite(y) else float("nan") for y in ys], label=LABELS.get(m, m))
    ax.axhline(chance, color="gray", ls="--", lw=0.8, label=f"uniform guess ({chance:.1f} bits)")
    ax.set_xlabel("update")
    ax.set_ylabel("training loss (bits, label-smoothed)")
    ax.set_title(a.title or "deep transformer training curves", fontsize=8)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = os.path.join(a.out, "curves.png")
    fig.savefig(png, dpi=120)
    print(table)
    print(f"\ntraining curves: {os.path.abspath(png)}")
    print(f"table: {os.path.abspath(os.path.join(a.out, 'results.md'))}")


if __name__ == "__main__":
    main()
