"""Output change E||F(x, W) - F(x, W + delta)||^2 against depth: Post-LN, Pre-LN, Admin, DeepNorm.

Builds the reference stacks of :func:`admin_torch.make_stack` (self-attention + FFN layers, N = 2
sublayers per layer) at each depth, measures :func:`admin_torch.output_change` (relative Gaussian
perturbation of every weight matrix, see its docstring), prints the numbers and the fitted growth
rates, and writes ``output_change.json``, ``output_change.md`` and ``output_change.png`` under --out.

Theory (Admin paper): Post-LN grows O(N), Admin 'O(logn)' O(log N), Admin 'O(1)' stays flat,
Pre-LN O(log N). Its Theorem 3 predicts ``change ~ C * delta^2 * sum_i beta_i`` with the residual
shares ``beta_i`` (:func:`admin_torch.residual_betas`, measured here on the same models); for ReLU FFN
stacks C = 2 * dim. The table shows the fitted C per point (constant = the theorem holds) and the
plot draws the prediction as dashed lines. FFN stacks (the default) follow the theorem closely;
with self-attention, attention's Jacobian amplifies perturbations beyond its output variance,
so deep Post-LN grows faster than O(N).

    python -m benchmarks.output_change --depths 6 12 24 48 96 --out results/admin/output_change
    python -m benchmarks.output_change --quick
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from admin_torch import make_stack, output_change, residual_betas
from benchmarks.sweep import recorded_args

# label -> (make_stack kind, Admin scale)
VARIANTS = {
    "Post-LN": ("post_ln", "O(n)"),
    "Pre-LN": ("pre_ln", "O(n)"),
    "Admin O(n)": ("admin", "O(n)"),
    "Admin O(logn)": ("admin", "O(logn)"),
    "Admin O(1)": ("admin", "O(1)"),
    "DeepNorm": ("deepnorm", "O(n)"),
}
STYLE = {
    "Post-LN": dict(color="tab:red", marker="o"),
    "Pre-LN": dict(color="tab:blue", marker="s"),
    "Admin O(n)": dict(color="tab:red", marker="x", linestyle=":"),
    "Admin O(logn)": dict(color="tab:green", marker="^"),
    "Admin O(1)": dict(color="tab:olive", marker="v"),
    "DeepNorm": dict(color="tab:purple", marker="D"),
}


def fit(ns, ys):
    """Least-squares slopes: exponent p of y ~ N^p (log-log) and b of y ~ a + b ln N (normalized by y[0])."""
    lx = [math.log(n) for n in ns]
    ly = [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    p = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx
    yn = [y / ys[0] for y in ys]
    mn = statistics.fmean(yn)
    b = sum((a - mx) * (c - mn) for a, c in zip(lx, yn)) / sxx
    return p, b


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24, 48, 96], help="layers per stack")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--sublayers", default="ffn", choices=["attn_ffn", "ffn"])
    ap.add_argument("--seeds", type=int, default=5, help="independent model inits (averaged)")
    ap.add_argument("--samples", type=int, default=4, help="perturbations per model")
    ap.add_argument("--delta", type=float, default=1e-2, help="relative perturbation size")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=16)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="depths 6 12 24, 1 seed, 2 samples")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "admin" / "output_change")
    args = ap.parse_args(argv)
    if args.quick:
        args.depths, args.seeds, args.samples = [6, 12, 24], 1, 2
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    per_layer = 2 if args.sublayers == "attn_ffn" else 1
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.length, args.dim, generator=gen).to(args.device)

    results, betas = {}, {}
    t0 = time.time()
    for label in args.variants:
        kind, scale = VARIANTS[label]
        results[label], betas[label] = [], []
        for depth in args.depths:
            vals, bsum = [], []
            for s in range(args.seeds):
                model = make_stack(kind, depth, args.dim, scale=scale, sublayers=args.sublayers, seed=1000 * s + depth).to(args.device)
                vals.append(output_change(model, x, delta_scale=args.delta, num_samples=args.samples, seed=s))
                bsum.append(sum(residual_betas(model, x)))
            results[label].append(statistics.fmean(vals))
            betas[label].append(statistics.fmean(bsum))
            print(f"[{time.time() - t0:6.1f}s] {label:14s} depth {depth:4d} (N={per_layer * depth:4d}): "
                  f"{results[label][-1]:.4g}  (sum beta {betas[label][-1]:.3g})", flush=True)

    ns = [per_layer * d for d in args.depths]
    rows = []
    for label, ys in results.items():
        p, b = fit(ns, ys)
        consts = [y / (args.delta ** 2 * bs) for y, bs in zip(ys, betas[label])]
        rows.append(dict(variant=label, values=ys, beta_sums=betas[label], fitted_C=consts,
                         ratio_last_first=ys[-1] / ys[0], exponent=p, log_slope=b))
    c_all = statistics.median(c for r in rows for c in r["fitted_C"])

    theory = {"O(N)": ns[-1] / ns[0], "O(log N)": math.log(ns[-1] + 1) / math.log(ns[0] + 1), "O(1)": 1.0}
    header = "| variant | " + " | ".join(f"N={n}" for n in ns) + " | last/first | exponent p (y~N^p) |"
    lines = [header, "|" + "---|" * (len(ns) + 3)]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(f"{v:.4g}" for v in r["values"])
                     + f" | {r['ratio_last_first']:.2f} | {r['exponent']:.2f} |")
    lines.append("")
    lines.append("Theorem 3 check, fitted C = change / (delta^2 * sum beta) per point"
                 + (f" (theory for ReLU FFN stacks: 2 * dim = {2 * args.dim})" if args.sublayers == "ffn" else "") + ":")
    lines.append("")
    lines.append("| variant | " + " | ".join(f"N={n}" for n in ns) + " |")
    lines.append("|" + "---|" * (len(ns) + 1))
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(f"{c:.0f}" for c in r["fitted_C"]) + " |")
    lines.append("")
    lines.append(f"theory last/first for N {ns[0]} -> {ns[-1]}: " + ", ".join(f"{k} {v:.2f}" for k, v in theory.items()))
    table = "\n".join(lines)
    print()
    print(table)
    meta = dict(recorded_args(args), x_shape=list(x.shape), sublayers_per_layer=per_layer,
                perturbation="delta_p = delta * rms(p) * N(0,1) on every weight matrix; ||.||^2 over features, "
                             "mean over positions, perturbations and model seeds")
    (args.out / "output_change.json").write_text(json.dumps(dict(meta=meta, N=ns, rows=rows, theory_ratio=theory), indent=1))
    footer = (f"Each number: the mean over {args.seeds} model initializations x {args.samples} perturbations "
              f"(relative size {args.delta}), d={args.dim}, {args.sublayers} stacks, batch {args.batch} x length "
              f"{args.length}; CPU.\n\ncommand: python -m benchmarks.output_change --depths "
              f"{' '.join(map(str, args.depths))} --seeds {args.seeds} --samples {args.samples} --out {args.out}\n")
    (args.out / "output_change.md").write_text(f"# Output change against depth\n\n{table}\n\n{footer}")
    c_pred = 2 * args.dim if args.sublayers == "ffn" else c_all
    predicted = {k: [c_pred * args.delta ** 2 * b for b in v] for k, v in betas.items()}
    plot(ns, results, predicted, args.out / "output_change.png", args)
    print(f"\nwrote {args.out}/output_change.{{json,md,png}}")


def plot(ns, results, predicted, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(17, 4.8))
    for label, ys in results.items():
        a3.plot(ns, [y / ys[0] for y in ys], label=label, **STYLE[label])
        a1.plot(ns, ys, label=label, **STYLE[label])
        a1.plot(ns, predicted[label], color=STYLE[label]["color"], linestyle="--", linewidth=0.8, alpha=0.7)
        a2.plot(ns, [y / ys[0] for y in ys], label=label, **STYLE[label])
    # reference growth rates through the first Post-LN point
    ref = results.get("Post-LN", next(iter(results.values())))[0]
    a1.plot(ns, [ref * n / ns[0] for n in ns], color="gray", linestyle="-", linewidth=3, alpha=0.3, label="∝ N")
    a1.plot([], [], color="black", linestyle="--", linewidth=0.8,
            label="Theorem 3: " + ("2·dim" if args.sublayers == "ffn" else "C") + "·δ²·Σβ (dashed)")
    a2.plot(ns, [n / ns[0] for n in ns], color="gray", linestyle="--", linewidth=1, label="N / N0 (O(N))")
    a2.plot(ns, [math.log(n + 1) / math.log(ns[0] + 1) for n in ns], color="gray", linestyle="-.", linewidth=1,
            label="ln N / ln N0 (O(log N))")
    a2.axhline(1.0, color="gray", linestyle=":", linewidth=1, label="1 (O(1))")
    a3.plot(ns, [math.log(n + 1) / math.log(ns[0] + 1) for n in ns], color="gray", linestyle="-.", linewidth=1,
            label="ln N / ln N0 (straight here)")
    a3.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    a3.set_ylim(0, 5)
    a3.set_title("semi-log: O(log N) is a straight line (Post-LN off the top)")
    a3.set_ylabel("change / change at smallest N")
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_title("output change (log-log; slope 1 = O(N)); dashed: prediction")
    a1.set_ylabel(r"$E\,\|F(x,W)-F(x,W+\delta)\|^2$")
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.set_title("normalized by the shallowest stack (log-log)")
    a2.set_ylabel("change / change at smallest N")
    a3.set_xscale("log")
    for a in (a1, a2, a3):
        a.set_xlabel("N (residual sublayers)")
        a.set_xticks(ns)
        a.set_xticklabels([str(n) for n in ns])
        a.minorticks_off()
        a.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=8)
    a2.legend(fontsize=7, loc="upper left")
    a3.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Output change vs depth ({args.sublayers}, dim {args.dim}, relative delta {args.delta}, "
                 f"mean over {args.seeds} inits x {args.samples} perturbations)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
