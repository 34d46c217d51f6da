"""Deep decoder-only LMs: Post-LN vs Pre-LN vs Admin (vs DeepNorm) across learning rates.

Runs the LM recipes (recipes/lm/{prepare,train,evaluate}.sh) on the English side of Multi30k for
every model, learning rate (``--lrs``: the learning rate is part of the stability claim) and seed,
and reports the validation perplexity (fairseq-eval-lm, best checkpoint) as mean +- std over the
seeds. Runs go two at a time (one thread each). A run whose perplexity file exists is reused, so an
interrupted sweep continues where it stopped. Writes ``lm_stability.{json,md,png}`` under ``--out``.

    python -m benchmarks.admin_lm_stability                                  # 12 layers, lr 2e-3, 3 seeds, CPU
    python -m benchmarks.admin_lm_stability --lrs 1e-3,2e-3,4e-3 --models postln,preln,admin,deepnorm
    python -m benchmarks.admin_lm_stability --layers 24 --max-update 4000 --device cuda   # paper scale
"""

import argparse
import os
import platform
import re
import statistics
from pathlib import Path

from benchmarks.lm_recipe_runs import prepare_english, recipe_env, run, write_table
from benchmarks.sweep import run_jobs

REPO = Path(__file__).resolve().parents[1]


def one(args, model: str, lr: str, seed: int, env) -> dict:
    save = args.work / "checkpoints" / f"{model}-{args.layers}-d{args.dim}-lr{lr}-u{args.max_update}-s{seed}"
    save.mkdir(parents=True, exist_ok=True)
    result = {"model": model, "lr": lr, "seed": seed}
    if (save / "valid.ppl").exists():  # finished in an earlier (interrupted) sweep
        code, result["reused"] = 0, True
    else:
        gpus = "1" if args.device == "cuda" else "0"
        code = run([REPO / "recipes/lm/train.sh", "--model", model, "--layers", args.layers, "--dim", args.dim,
                    "--max-tokens", args.tokens, "--tokens-per-update", args.tokens, "--data", args.work,
                    "--save", save, "--gpus", gpus, "--lr", lr, "--warmup", args.warmup, "--seed", seed,
                    "--max-update", args.max_update], save / "driver_train.log", env)
    result["train_exit"] = code
    if code == 0 and (save / "checkpoint_best.pt").exists() and not (save / "valid.ppl").exists():
        run([REPO / "recipes/lm/evaluate.sh", "--save", save, "--data", args.work, "--split", "valid"],
            save / "driver_eval.log", env)
    if (save / "valid.ppl").exists():
        m = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", (save / "valid.ppl").read_text()
                      if (save / "valid.ppl").exists() else "")
        if m:
            result.update(valid_loss=float(m.group(1)), valid_ppl=float(m.group(2)))
    return result


def describe(result: dict) -> str:
    return f"{result['model']} lr {result['lr']} seed {result['seed']}: {result.get('valid_ppl', 'failed')}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "multi30k")
    ap.add_argument("--work", type=Path, default=REPO / "work" / "lm")
    ap.add_argument("--models", default="postln,preln,admin", help="postln, preln, admin, admin-profiled, deepnorm")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--layers", default="12")
    ap.add_argument("--dim", default="128", help="model width (FFN 4x, 4 heads)")
    ap.add_argument("--tokens", default="1024", help="tokens per update")
    ap.add_argument("--lrs", default="2e-3", help="comma-separated learning rates")
    ap.add_argument("--warmup", default="200")
    ap.add_argument("--max-update", default="300", help="scale: updates per run")
    ap.add_argument("--max-lines", default="0", help="training lines (0: all)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "admin")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        ap.error(f"--data: {args.data} not found (Multi30k raw files, e.g. ../shared/data/multi30k)")
    env = recipe_env()
    prepare_english(args.data, args.work, env, args.max_lines)
    lrs, models = args.lrs.split(","), args.models.split(",")
    jobs = [(m, lr, int(s)) for s in args.seeds.split(",") for lr in lrs for m in models]
    print(f"{len(jobs)} runs, {args.jobs} at a time: {args.layers} layers, lrs {args.lrs}, {args.max_update} updates",
          flush=True)
    results = run_jobs(one, [(args, *j, env) for j in jobs], args.jobs, label="runs", describe=describe)
    rows = []
    for model in models:
        for lr in lrs:
            runs = [r for r in results if r["model"] == model and r["lr"] == lr]
            ppl = [r["valid_ppl"] for r in runs if "valid_ppl" in r]
            mean = statistics.mean(ppl) if ppl else float("nan")
            std = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
            rows.append({"model": model, "lr": lr, "seeds": len(runs), "finished": len(ppl), "valid_ppl_mean": mean,
                         "valid_ppl_std": std, "per_seed": ppl})
    lines = [f"Decoder-only LM, {args.layers} layers (d={args.dim}), {args.tokens} tokens/update, English Multi30k, "
             f"warmup {args.warmup}, {args.max_update} updates, device {args.device}; validation perplexity, "
             f"mean +- std over seeds {args.seeds}", "",
             "| model | lr | seeds | valid ppl (mean +- std) | per seed |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['lr']} | {r['finished']}/{r['seeds']} | {r['valid_ppl_mean']:.2f} +- "
                     f"{r['valid_ppl_std']:.2f} | {', '.join(f'{p:.2f}' for p in r['per_seed'])} |")
    lines += ["", f"command: python -m benchmarks.admin_lm_stability --models {args.models} --lrs {args.lrs} "
              f"--layers {args.layers} --dim {args.dim} --tokens {args.tokens} --warmup {args.warmup} "
              f"--max-update {args.max_update} --seeds {args.seeds} --device {args.device}",
              f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.jobs} runs at a time x 1 thread"]
    write_table(args.out, "lm_stability", args, results, rows, "\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for i, model in enumerate(models):
            mine = [r for r in rows if r["model"] == model and r["finished"]]
            xs = [float(r["lr"]) for r in mine]
            for r in mine:
                ax.scatter([float(r["lr"])] * len(r["per_seed"]), r["per_seed"], s=8, color=f"C{i}", alpha=0.5)
            ax.errorbar(xs, [r["valid_ppl_mean"] for r in mine], yerr=[r["valid_ppl_std"] for r in mine], fmt="o-",
                        color=f"C{i}", capsize=4, label=model)
        ax.set(xscale="log", yscale="log", xlabel="peak learning rate", ylabel="validation perplexity (log)")
        ax.legend(fontsize=8)
        ax.set_title(f"{args.layers}-layer LM, {args.max_update} updates, {len(args.seeds.split(','))} seeds",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(args.out / "lm_stability.png", dpi=120)
    except ImportError:
        pass
    print(f"wrote {args.out}/lm_stability.{{json,md,png}}")


if __name__ == "__main__":
    main()
