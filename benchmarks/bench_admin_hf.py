"""Training-step overhead of admin_torch.convert on HuggingFace families, and the fold error.

For each family: a small random model (built from a config, nothing downloaded), the median time of a
training step (forward, backward, SGD step) of the stock model and of the converted one (same weights),
and the max |fold(model)(x) - model(x)| in float32 with a padding mask.

    python -m benchmarks.bench_admin_hf                       # CPU, writes results/admin/hf_overhead.md
    python -m benchmarks.bench_admin_hf --device cuda --hidden 256 --layers 6
    python -m benchmarks.bench_admin_hf --hidden 256 --layers 12 --threads 1 --rounds 30 --steps 4 --ref HEAD  # A/B
    python -m benchmarks.bench_admin_hf --hidden 256 --layers 12 --threads 1 --paired 100 --ref HEAD \
        --families bart bert roberta --out results/admin/hf_overhead_paired.md      # paired steps, stable allocator
"""

import argparse
import copy
import os
import statistics
import subprocess
import time

import torch

import admin_torch
from benchmarks import hf_families as H
from benchmarks.harness import (load_package_at, median_with_interval, paired_differences, stable_allocator,
                                write_lines)

HERE = os.path.dirname(os.path.abspath(__file__))


def _scale(hidden, layers):
    H.COMMON.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=4 * hidden)
    H.SEQ2SEQ.update(d_model=hidden, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=4 * hidden, decoder_ffn_dim=4 * hidden)
    H.FSMT.update(d_model=hidden, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=4 * hidden, decoder_ffn_dim=4 * hidden)
    H.FUNNEL.update(d_model=hidden, n_head=4, d_head=hidden // 4, d_inner=4 * hidden)  # 3 blocks + 1 decoder layer


def check_hidden(parser: argparse.ArgumentParser, hidden: int) -> None:
    """``--hidden``: a positive multiple of 4, the benchmark models' attention heads (else `parser.error`)."""
    if hidden < 4 or hidden % 4:
        parser.error(f"--hidden must be a positive multiple of 4 (the models have 4 attention heads), got {hidden}")


def _steps(models, x, device, steps, rounds=1, warmup=2):
    """Training steps of the models, interleaved in alternating order (a shared machine's load hits all alike),
    ``steps`` of each per round; per round, the minimum step time of each (the least disturbed): a list of
    ``rounds`` lists, one time per model. On the CPU with one thread a step is timed by the CPU time of this
    thread (``time.thread_time``: what other processes take of the cores does not count), else by the clock."""
    clock = time.thread_time if device == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    opts = [torch.optim.SGD(m.parameters(), lr=1e-4) for m in models]
    for m in models:
        m.train()
    out = []
    for r in range(rounds):
        times = [[] for _ in models]
        for i in range((warmup if r == 0 else 0) + steps):
            order = range(len(models)) if (i + r) % 2 == 0 else reversed(range(len(models)))
            for j in order:
                model, opt = models[j], opts[j]
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = clock()
                loss = H.output(model(**x)).float().pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device == "cuda":
                    torch.cuda.synchronize()
                if r > 0 or i >= warmup:
                    times[j].append(clock() - t0)
        out.append([min(t) for t in times])
    return out


def _paired(models, x, reps):
    """``reps`` paired steps of each model (`benchmarks.harness.paired_differences`, thread CPU time at one thread):
    per model after the first, (median, 5%, 95%) of its step minus stock's, over stock's median step; and the
    same of today's minus ref's when a third model is given."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    opts = [torch.optim.SGD(m.parameters(), lr=1e-4) for m in models]

    def step(j):
        def run():
            loss = H.output(models[j](**x)).float().pow(2).mean()
            loss.backward()
            opts[j].step()
            opts[j].zero_grad(set_to_none=True)
        return run

    for m in models:
        m.train()
    t = paired_differences({j: step(j) for j in range(len(models))}, reps, clock=clock)
    base = statistics.median(t[0])
    rel = [tuple(v / base for v in median_with_interval([a - b for a, b in zip(t[j], t[0])])) for j in (1,)]
    if len(models) > 2:
        rel.append(tuple(v / base for v in median_with_interval([a - b for a, b in zip(t[1], t[2])])))
    return base, rel


def _load():
    """The 1-minute load average of the machine, or None where the system has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _spread(values):
    """(median, lower quartile, upper quartile) of ``values``."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q1, q3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="steps of each model per round")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds: the overhead is the median over rounds of the ratio of their fastest steps, "
                             "with its interquartile range")
    parser.add_argument("--families", nargs="*", default=None)
    parser.add_argument("--out", default=os.path.join(HERE, "..", "results", "admin", "hf_overhead.md"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1: steps timed in thread CPU time)")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="N paired steps instead of rounds: each step of each model in a fresh random order, the "
                             "median of the per-step differences with its 5-95%% bootstrap interval; glibc's "
                             "allocator kept from re-mapping large blocks (benchmarks.harness.stable_allocator)")
    parser.add_argument("--ref", default=None,
                        help="a git revision: also time the model converted by admin_torch as it was there, in the "
                             "same rotation (today / ref per round, an A/B in one process)")
    args = parser.parse_args(argv)
    for flag in ("steps", "rounds", "threads", "layers"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be an integer >= 1, got {getattr(args, flag)}")
    check_hidden(parser, args.hidden)
    if args.paired < 0 or args.paired == 1:
        parser.error(f"--paired must be 0 (off) or an integer >= 2, got {args.paired}")
    known = list(H.families()) + list(H.fold_refused())
    for family in args.families or ():  # every name checked before any model is built or timed
        if family not in known:
            parser.error(f"--families: {family!r} is not one of {known}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    torch.set_num_threads(min(args.threads, torch.get_num_threads()))
    _scale(args.hidden, args.layers)
    try:
        ref_pkg = None if args.ref is None else load_package_at(args.ref, "admin_torch")
    except (ValueError, subprocess.CalledProcessError):
        parser.error(f"--ref: not a git revision of this repository with admin_torch: {args.ref!r}")
    if args.paired:
        return _main_paired(args, parser, ref_pkg)
    load_start = _load()
    rows, ab = [], []
    known = list(H.families()) + list(H.fold_refused())
    for family in args.families or known:  # the names were checked in main
        model, x, _ = H.build(family)
        x = {k: v.to(args.device) for k, v in x.items()}
        stock = model.to(args.device)
        admin = admin_torch.convert(copy.deepcopy(stock))
        admin.eval()
        with torch.no_grad():
            ref = H.output(admin(**x))
            try:
                err = (H.output(admin_torch.fold(admin)(**x)) - ref).abs().max().item()
            except ValueError:  # a family whose fold is refused (H.fold_refused): overhead only
                err = float("nan")
        models = [stock, admin] + ([] if ref_pkg is None else [ref_pkg.convert(copy.deepcopy(stock))])
        per_round = _steps(models, x, args.device, args.steps, args.rounds)
        t_stock, t_admin = (min(t[j] for t in per_round) for j in (0, 1))
        ratio, low, high = _spread([t[1] / t[0] for t in per_round])
        rows.append((family, t_stock * 1e3, t_admin * 1e3, 100 * (ratio - 1), 100 * (low - 1), 100 * (high - 1), err))
        vs_ref = "" if ref_pkg is None else "  today / {}: {:+.2f}% [{:+.2f}%, {:+.2f}%]".format(
            args.ref, *(100 * (v - 1) for v in _spread([t[1] / t[2] for t in per_round])))
        ab.append(vs_ref)
        print(f"{family:18s} stock {t_stock * 1e3:7.2f} ms  admin {t_admin * 1e3:7.2f} ms  "
              f"overhead {rows[-1][3]:+6.1f}% [{rows[-1][4]:+.1f}%, {rows[-1][5]:+.1f}%]  "
              f"fold err {'refused' if err != err else f'{err:.2e}'}{vs_ref}", flush=True)
    clock_name = "thread CPU time" if args.device == "cpu" and args.threads == 1 else "wall time"
    load = ("" if load_start is None else
            f"; the machine's load average (1 min) {load_start:.1f} at the start, {_load():.1f} at the end, "
            f"on {os.cpu_count()} CPUs: other processes' load slows small operations and Python calls, which "
            "the converted step has more of")
    lines = ["# admin_torch.convert on HuggingFace families: step overhead and fold error",
             "",
             f"`python -m benchmarks.bench_admin_hf --device {args.device} --hidden {args.hidden} --layers "
             f"{args.layers} --steps {args.steps} --rounds {args.rounds} --threads {args.threads}"
             f"{' --families ' + ' '.join(args.families) if args.families else ''}"
             f"{'' if ref_pkg is None else ' --ref ' + args.ref}` "
             f"(torch {torch.__version__}; batch 2 x 8 tokens, padding in one sequence; stock and converted steps "
             f"interleaved in alternating order, {clock_name}; per round the fastest step of each; "
             "overhead = median over rounds of converted / stock - 1, [interquartile range]; fold error = "
             f"max |fold(model)(x) - model(x)|, float32, eval{load}).",
             "",
             "| family | stock step (ms) | converted step (ms) | overhead [IQR] | fold error |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {f} | {a:.2f} | {b:.2f} | {o:+.1f}% [{lo:+.1f}%, {hi:+.1f}%] | "
              f"{'refused' if e != e else f'{e:.1e}'} |" for f, a, b, o, lo, hi, e in rows]
    if ref_pkg is not None:
        lines += ["", f"A/B against `{args.ref}` (its admin_torch loaded beside today's, its converted model stepped in "
                  "the same rotation; median over rounds of today / ref - 1 [interquartile range]):", ""]
        lines += [f"- {row[0]}:{vs}" for row, vs in zip(rows, ab)]
    lines += ["", "'refused': a family whose fold is refused with a reason (shared ALBERT layers, FSMT's sinusoidal "
              "positions, Funnel's repeated blocks; docs/huggingface.md). Small models: the overhead is the "
              "hooks' Python calls plus one operation per residual and one in the backward (BERT-like layers, "
              "whose output modules take the residual as an argument: one hook per sublayer, which passes "
              "omega * x; the others: a scaled add at the LayerNorm, OmegaResidual.rescale_sum), a fixed cost per "
              "layer call, so its share shrinks as the model grows; "
              "timings of a few milliseconds vary by about 10% between runs on a loaded machine (the interquartile "
              "range shows the spread), so differences of that size, negative ones included, are noise."]
    write_lines(args.out, lines)
    print("wrote", args.out)



def _main_paired(args, parser, ref_pkg) -> None:
    """``--paired N``: the converted step's overhead as the median of N paired differences (and today / ``--ref``)."""
    stable = stable_allocator()
    known = list(H.families()) + list(H.fold_refused())
    lines = ["# admin_torch.convert on HuggingFace families: paired step overhead", "",
             f"`python -m benchmarks.bench_admin_hf --device {args.device} --hidden {args.hidden} --layers "
             f"{args.layers} --threads {args.threads} --paired {args.paired}"
             f"{' --families ' + ' '.join(args.families) if args.families else ''}"
             f"{'' if ref_pkg is None else ' --ref ' + args.ref}` (torch {torch.__version__}; batch 2 x 8 tokens, "
             f"padding in one sequence; forward, backward and SGD step; {args.paired} steps of each model, each "
             "repetition in a fresh random order, "
             f"{'thread CPU time' if args.threads == 1 else 'wall time'}; cells: median of the per-step differences "
             "over stock's median step, [5%, 95%] of 1000 bootstrap medians; glibc's allocator "
             f"{'kept from re-mapping large blocks (mallopt)' if stable else 'as it is (mallopt unavailable)'}).", "",
             "| family | stock step (ms) | converted - stock | " + ("" if ref_pkg is None else f"today - {args.ref} |"),
             "|---|---:|---:|" + ("" if ref_pkg is None else "---:|")]
    for family in args.families or known:  # the names were checked in main
        model, x, _ = H.build(family)
        x = {k: v.to(args.device) for k, v in x.items()}
        stock = model.to(args.device)
        models = [stock, admin_torch.convert(copy.deepcopy(stock))]
        if ref_pkg is not None:
            models.append(ref_pkg.convert(copy.deepcopy(stock)))
        base, rel = _paired(models, x, args.paired)
        cells = " | ".join(f"{100 * m:+.2f}% [{100 * lo:+.2f}%, {100 * hi:+.2f}%]" for m, lo, hi in rel)
        print(f"{family:18s} stock {base * 1e3:7.2f} ms  {cells}", flush=True)
        lines.append(f"| {family} | {base * 1e3:.2f} | {cells} |")
    write_lines(args.out, lines)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
