"""The stability monitor: its overhead, and what it shows on the deep runs the toolbox already measures.

Subcommands::

    python -m benchmarks.bench_monitor overhead [--device cuda]      # step time with / without the monitor
    python -m benchmarks.bench_monitor overhead-paired               # the same, step-paired: small spread
    python -m benchmarks.bench_monitor overhead-ab --ref HEAD        # today's monitor against a revision's, paired
    python -m benchmarks.bench_monitor evidence                      # the monitored deep runs (fairseq-train)
    python -m benchmarks.bench_monitor analyze                       # warnings, rates, plots of those runs

``overhead``: a 12-layer Post-LN transformer encoder (torch.nn, d=256, 4 heads, batch 16 x 64 tokens)
trained with Adam; the median step time of the bare loop and of the loop under
:class:`stability_toolbox.StabilityMonitor` at several intervals (the timing harness of
``benchmarks/harness.py``: warm-up, alternating order, medians), plus the cost of one logged step.

``overhead-ab``: today's monitor against the one at a git revision (``--ref``, default HEAD; its package read
with ``git show`` into a temporary directory and imported under another name) in one process, on one model: a bare
step, a step under each monitor, rotating; the paired differences with 5-95% bootstrap intervals, by wall clock
and by the thread's CPU time (the figure to read on a loaded machine). How a hot-path change is A/B'd.

``evidence``: the Multi30k En-De 18L-18L runs of ``benchmarks/admin_multi30k_stability.py`` and the
12-layer LM runs of ``benchmarks/admin_lm_stability.py`` (``recipes/lm/train.sh``), each with
``--stability-monitor DIR --stability-monitor-interval K``; runs go ``--jobs`` at a time, niced,
one thread each, and a finished run (``monitor/summary.md`` present) is reused.

``analyze``: reads every run's ``monitor.jsonl`` and training log, and writes
``results/monitor/evidence.{md,json}`` and the plots: per variant, the update at which the first
``stability warning:`` line fired, the warning rate per variant family, and the quantities that
separate Post-LN from Admin before the loss does.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Tuple

from benchmarks.harness import load_package_at
from benchmarks.sweep import run_jobs

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------- overhead

def _write(path: Path, text: str) -> None:
    """``text`` to ``path`` through a temporary file and one rename (a cut-short run leaves no half file)."""
    from toolbox_core.files import atomic_write

    with atomic_write(path) as f:
        f.write(text)


def _timed_step(model, opt, x, sync, mon=None) -> Tuple[float, float]:
    """One training step of the overhead model, under ``mon`` when given: (wall seconds, this thread's CPU seconds)."""
    sync()
    t, c = time.perf_counter(), time.thread_time()
    if mon is not None:
        mon.begin_step()
    loss = model(x).pow(2).mean()
    loss.backward()
    if mon is not None:
        mon.capture_grads()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if mon is not None:
        mon.end_step(loss)
    sync()
    return time.perf_counter() - t, time.thread_time() - c


def _overhead_model(a):
    """The timed model of both overhead measurements: (device, model, optimizer, batch, sync())."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    layer = nn.TransformerEncoderLayer(a.dim, 4, 4 * a.dim, dropout=0.1, batch_first=True)
    model = nn.TransformerEncoder(layer, a.layers, enable_nested_tensor=False).to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.randn(a.batch, a.tokens, a.dim, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    return device, model, opt, x, sync


def overhead(a) -> None:
    import torch

    from stability_toolbox import StabilityMonitor

    device, model, opt, x, sync = _overhead_model(a)

    def train_step(mon=None):
        if mon is not None:
            mon.begin_step()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mon is not None:
            mon.end_step(loss)

    def time_steps(n, mon=None):
        sync()
        t = time.perf_counter()
        for _ in range(n):
            train_step(mon)
        sync()
        return (time.perf_counter() - t) / n

    for _ in range(3):
        train_step()
    rows = []
    intervals = [int(k) for k in a.intervals.split(",")]
    # every repetition times the bare loop and each interval back to back, in a fresh order, over a
    # window of whole intervals (so the logged steps are in the mean with their true weight)
    samples = {k: [] for k in ["bare"] + intervals}
    # one monitor per interval, made and warmed up (one logged step) before the timing: a training run makes
    # its monitor once, so the one-time set-up (sites, first logged step) is not part of the per-step cost
    monitors = {k: StabilityMonitor(model, None, every=k, tensorboard=False, heatmaps=False, rules={})
                for k in intervals}
    for mon in monitors.values():
        train_step(mon)
    for rep in range(a.reps):
        order = ["bare"] + intervals
        order = order[rep % len(order):] + order[:rep % len(order)]
        for k in order:
            if k == "bare":
                samples[k].append(time_steps(a.window))
            else:
                monitors[k].step_count = 1  # start between logging steps; the window holds window/k logged steps
                samples[k].append(time_steps(a.window, monitors[k]))
    for mon in monitors.values():
        mon.close()
    bare = statistics.median(samples["bare"])
    # one logged step alone (hooks, grad/update snapshots, probe pass, the one transfer)
    mon = StabilityMonitor(model, None, every=1, tensorboard=False, heatmaps=False, rules={})
    train_step(mon)
    logged = statistics.median([time_steps(1, mon) for _ in range(max(3, a.reps))])
    mon.close()
    rows.append({"config": "bare loop", "step_ms": bare * 1e3, "overhead_pct": 0.0})
    for k in intervals:
        t = statistics.median(samples[k])
        rows.append({"config": f"monitor every {k}", "step_ms": t * 1e3, "overhead_pct": 100 * (t / bare - 1),
                     "spread_pct": 100 * (max(samples[k]) - min(samples[k])) / bare})
    rows.append({"config": "one logged step", "step_ms": logged * 1e3, "overhead_pct": 100 * (logged / bare - 1)})
    lines = [f"Monitor overhead: torch.nn TransformerEncoder {a.layers} layers (Post-LN, d={a.dim}, 4 heads, FFN "
             f"{4 * a.dim}), batch {a.batch} x {a.tokens} tokens, Adam; device {a.device}, {a.threads} thread(s); "
             f"median over {a.reps} repetitions of {a.window} steps (bare and monitored interleaved)", "",
             "| configuration | step (ms) | overhead vs bare loop |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['step_ms']:.2f} | {r['overhead_pct']:+.2f}% |")
    lines += ["", f"command: python -m benchmarks.bench_monitor overhead --device {a.device} --layers {a.layers} "
              f"--dim {a.dim} --batch {a.batch} --tokens {a.tokens} --reps {a.reps} --window {a.window} "
              f"--intervals {a.intervals} --threads {a.threads}",
              f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"]
    text = "\n".join(lines)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"overhead_{a.device}.md").write_text(text + "\n")
    (a.out / f"overhead_{a.device}.json").write_text(json.dumps({"rows": rows, "samples_s": {str(k): v for k, v in
                                                                 samples.items()}}, indent=1))


def overhead_paired(a) -> None:
    """The overhead at interval k decomposed and measured step by step, so that the spread is small on a
    busy machine: a bare step and a monitored step alternate (ABBA order), and the per-pair difference is
    what the monitor costs that step. Between logging steps (``non-logging pairs``) and on a logging step
    (``logged pairs``) separately; the overhead at interval k is ``((k - 1) * d_nonlog + d_logged) / k``
    over the bare step. The spread: 5th-95th percentile over 1000 bootstrap resamples of the pairs. The
    host-side cost of ``begin_step()`` + ``end_step(loss)`` alone (no model) is timed too."""
    import random

    import torch

    from stability_toolbox import StabilityMonitor

    device, model, opt, x, sync = _overhead_model(a)

    def step(mon=None):
        return _timed_step(model, opt, x, sync, mon)[0]

    k = a.interval
    mon = StabilityMonitor(model, None, every=k, tensorboard=False, heatmaps=False, rules={})
    for _ in range(3):
        step()
    mon.step_count = 0
    step(mon)  # the first logged step (one-time set-up: probe capture) is not a per-step cost

    def pairs(n, logged):
        bare, monitored = [], []
        for i in range(n):
            mon.step_count = (0 if logged else 1) + k * (i + 1)
            if i % 2:
                monitored.append(step(mon))
                bare.append(step())
            else:
                bare.append(step())
                monitored.append(step(mon))
        return bare, monitored

    t0 = time.time()
    nb, nm = pairs(a.pairs, logged=False)
    lb, lm = pairs(a.logged_pairs, logged=True)
    seconds = time.time() - t0
    mon.close()
    # begin_step + end_step(loss) alone, between logging steps
    mon2 = StabilityMonitor(model, None, every=10 ** 9, tensorboard=False, heatmaps=False, rules={})
    mon2.step_count = 1
    loss = torch.tensor(1.0, device=device)
    calls = 20000
    t = time.perf_counter()
    for _ in range(calls):
        mon2.begin_step()
        mon2.end_step(loss)
    sync()
    host_us = (time.perf_counter() - t) / calls * 1e6
    # the per-update rules' work between logging steps (DEFAULT_SIGNAL_RULES: one fused norm over the layers'
    # gradients, the asynchronous read, the detector), timed alone on the model's real gradients
    model(x).pow(2).mean().backward()
    grad_calls = 300
    t = time.perf_counter()
    for _ in range(grad_calls):
        mon2.begin_step()
        mon2.capture_grads()
        mon2.end_step(loss)
    sync()
    grads_us = (time.perf_counter() - t) / grad_calls * 1e6
    opt.zero_grad(set_to_none=True)
    mon2.close()

    rng = random.Random(0)
    d_non = [m - b for b, m in zip(nb, nm)]
    d_log = [m - b for b, m in zip(lb, lm)]
    bare_all = nb + lb

    def estimate(dn, dl, bare):
        base = statistics.median(bare)
        return {kk: 100 * ((kk - 1) * statistics.median(dn) + statistics.median(dl)) / kk / base
                for kk in (k, 20, 1000)} | {"nonlog": 100 * statistics.median(dn) / base,
                                            "logged": 100 * statistics.median(dl) / base}

    point = estimate(d_non, d_log, bare_all)
    boots = []
    for _ in range(1000):
        dn = [rng.choice(d_non) for _ in d_non]
        dl = [rng.choice(d_log) for _ in d_log]
        bb = [rng.choice(bare_all) for _ in bare_all]
        boots.append(estimate(dn, dl, bb))

    def spread(key):
        vals = sorted(b[key] for b in boots)
        return vals[int(0.05 * len(vals))], vals[int(0.95 * len(vals)) - 1]

    base_ms = statistics.median(bare_all) * 1e3
    lines = [f"Monitor overhead, paired steps: torch.nn TransformerEncoder {a.layers} layers (Post-LN, d={a.dim}, 4 "
             f"heads), batch {a.batch} x {a.tokens} tokens, Adam; device {a.device}, {a.threads} thread(s); "
             f"{a.pairs} non-logging pairs and {a.logged_pairs} logged pairs (bare / monitored alternating, ABBA), "
             f"{seconds:.0f} s", "",
             f"bare step: median {base_ms:.2f} ms (5-95%: {1e3 * sorted(bare_all)[len(bare_all) // 20]:.1f}-"
             f"{1e3 * sorted(bare_all)[-max(1, len(bare_all) // 20)]:.1f} ms)", "",
             "| what | overhead vs bare step (median of paired differences) | 5-95% bootstrap |", "|---|---|---|"]
    names = [("nonlog", "a step between logging steps"), ("logged", "one logged step"),
             (k, f"monitor every {k} (the default)" if k == 100 else f"monitor every {k}"), (20, "monitor every 20"),
             (1000, "monitor every 1000")]
    for key, label in names:
        lo, hi = spread(key)
        lines.append(f"| {label} | {point[key]:+.2f}% | {lo:+.2f}% .. {hi:+.2f}% |")
    lines += ["", f"host cost of begin_step() + end_step(loss) between logging steps (no model): {host_us:.1f} us "
              f"per step = {100 * host_us / 1e3 / base_ms:.3f}% of the bare step", "",
              f"begin_step() + capture_grads() + end_step(loss) between logging steps, on the model's gradients (the "
              f"per-update rules' work, timed alone): {grads_us:.1f} us per step = "
              f"{100 * grads_us / 1e3 / base_ms:.3f}% of the bare step", "",
              f"command: python -m benchmarks.bench_monitor overhead-paired --device {a.device} --layers {a.layers} "
              f"--dim {a.dim} --batch {a.batch} --tokens {a.tokens} --pairs {a.pairs} --logged-pairs "
              f"{a.logged_pairs} --interval {k} --threads {a.threads}",
              f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"]
    text = "\n".join(lines)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    _write(a.out / f"overhead_paired_{a.device}.md", text + "\n")
    _write(a.out / f"overhead_paired_{a.device}.json", json.dumps(
        {"point_pct": {str(kk): v for kk, v in point.items()},
         "spread_pct": {str(kk): spread(kk) for kk, _ in names}, "host_us": host_us, "capture_grads_us": grads_us,
         "bare_s": bare_all, "nonlog_pairs_s": list(zip(nb, nm)), "logged_pairs_s": list(zip(lb, lm))}, indent=1))


def overhead_ab(a) -> None:
    """The working tree's monitor against the one at ``--ref`` (default HEAD) in ONE process, on one model: a
    round is a bare step, a step under the reference monitor and a step under today's, in a rotating order;
    the paired differences (monitored - bare, today - reference) between logging steps and on logging steps,
    their medians and 5-95% bootstrap intervals, by wall clock and by the thread's CPU time (less sensitive to
    other processes on a loaded machine). Both monitors run at their defaults (``rules={}`` as
    ``overhead-paired``: no warning lines)."""
    import random

    import torch

    import stability_toolbox

    ref_pkg = load_package_at(a.ref)
    commit = subprocess.run(["git", "rev-parse", "--short", a.ref], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    device, model, opt, x, sync = _overhead_model(a)
    k = a.interval
    mons = {"ref": ref_pkg.StabilityMonitor(model, None, every=k, tensorboard=False, heatmaps=False, rules={}),
            "new": stability_toolbox.StabilityMonitor(model, None, every=k, tensorboard=False, heatmaps=False,
                                                       rules={})}

    def step(mon=None):
        return _timed_step(model, opt, x, sync, mon)

    for _ in range(3):
        step()
    for mon in mons.values():  # the first logged step (probe capture) is set-up, not a per-step cost
        mon.step_count = 0
        step(mon)

    def rounds(n, logged):
        out = {kind: [] for kind in ("bare", "ref", "new")}
        for i in range(n):
            order = ["bare", "ref", "new"]
            order = order[i % 3:] + order[:i % 3]
            for kind in order:
                mon = mons.get(kind)
                if mon is not None:
                    mon.step_count = (0 if logged else 1) + k * (i + 1)
                out[kind].append(step(mon))
        return out

    t0 = time.time()
    non = rounds(a.pairs, logged=False)
    log = rounds(a.logged_pairs, logged=True)
    seconds = time.time() - t0
    for mon in mons.values():
        mon.close()
    rng = random.Random(0)
    table = {}
    for clock, c in (("wall", 0), ("cpu", 1)):
        bare = [t[c] for t in non["bare"] + log["bare"]]
        diffs = {}
        for name, (hi, lo) in {"ref": ("ref", "bare"), "new": ("new", "bare"), "new - ref": ("new", "ref")}.items():
            diffs[name] = ([h[c] - l[c] for h, l in zip(non[hi], non[lo])],
                           [h[c] - l[c] for h, l in zip(log[hi], log[lo])])

        def estimate(dn, dl, base):
            m = statistics.median(base)
            return (100 * statistics.median(dn) / m, 100 * statistics.median(dl) / m,
                    100 * ((k - 1) * statistics.median(dn) + statistics.median(dl)) / k / m)

        for name, (dn, dl) in diffs.items():
            point = estimate(dn, dl, bare)
            boots = sorted((estimate([rng.choice(dn) for _ in dn], [rng.choice(dl) for _ in dl],
                                     [rng.choice(bare) for _ in bare]) for _ in range(a.boot)))
            spread = []
            for j in range(3):
                vals = sorted(b[j] for b in boots)
                spread.append((vals[int(0.05 * len(vals))], vals[int(0.95 * len(vals)) - 1]))
            table[(clock, name)] = {"nonlog": point[0], "logged": point[1], "every": point[2], "spread": spread,
                                    "bare_ms": 1e3 * statistics.median(bare)}
    lines = [f"Monitor overhead A/B, one process: the working tree's StabilityMonitor against {a.ref}'s ({commit}); "
             f"torch.nn "
             f"TransformerEncoder {a.layers} layers (Post-LN, d={a.dim}, 4 heads), batch {a.batch} x {a.tokens} "
             f"tokens, Adam; device {a.device}, {a.threads} thread(s); {a.pairs} rounds between logging steps and "
             f"{a.logged_pairs} on logging steps (bare / {a.ref} / today, rotating), {seconds:.0f} s", "",
             "| clock | monitor | bare step (ms) | a step between logging steps | one logged step | every "
             f"{k} |", "|---|---|---|---|---|---|"]
    for (clock, name), r in table.items():
        cells = [f"{v:+.2f}% ({lo:+.2f} .. {hi:+.2f})" for v, (lo, hi) in
                 zip((r["nonlog"], r["logged"], r["every"]), r["spread"])]
        label = {"ref": f"{a.ref} - bare", "new": "today - bare", "new - ref": f"today - {a.ref}"}[name]
        lines.append(f"| {clock} | {label} | {r['bare_ms']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "cells: median of the paired differences over the bare step's median, (5-95% bootstrap)", "",
              f"command: python -m benchmarks.bench_monitor overhead-ab --ref {a.ref} --device {a.device} --layers "
              f"{a.layers} --dim {a.dim} --batch {a.batch} --tokens {a.tokens} --pairs {a.pairs} --logged-pairs "
              f"{a.logged_pairs} --interval {k} --threads {a.threads}",
              f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"]
    text = "\n".join(lines)
    print(text)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        _write(a.out / f"overhead_ab_{a.device}.md", text + "\n")
        _write(a.out / f"overhead_ab_{a.device}.json", json.dumps(
            {"ref": a.ref, "ref_commit": commit,
             "rows": [{"clock": c, "monitor": n, **r} for (c, n), r in table.items()],
             "nonlog_s": {kk: v for kk, v in non.items()}, "logged_s": {kk: v for kk, v in log.items()}}, indent=1))


# ----------------------------------------------------------------------------- evidence runs

LM_MODELS = ("postln", "admin", "preln", "deepnorm")
MT_VARIANTS = ("post_ln", "admin", "pre_ln")


def _env():
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"  # the recipes call fairseq-train by name
    return e


def _lm_run(a, model: str, seed: int) -> str:
    run = a.work / "lm" / f"{model}-L{a.lm_layers}-lr{a.lm_lr}-u{a.lm_updates}-s{seed}"
    if (run / "monitor" / "summary.md").exists():
        return f"lm {model} s{seed}: reused"
    run.mkdir(parents=True, exist_ok=True)
    env = _env()
    env["LOG_INTERVAL"] = str(a.interval)
    cmd = ["nice", "-n", "10", str(REPO / "recipes/lm/train.sh"), "--model", model, "--layers", str(a.lm_layers),
           "--dim", str(a.lm_dim), "--max-tokens", "1024", "--tokens-per-update", "1024", "--data", str(REPO / "work/lm"),
           "--save", str(run / "ckpt"), "--gpus", "0", "--lr", a.lm_lr, "--warmup", str(a.lm_warmup), "--seed", str(seed),
           "--max-update", str(a.lm_updates), "--", "--user-dir", str(REPO / "fairseq_plugins"),
           "--stability-monitor", str(run / "monitor"), "--stability-monitor-interval", str(a.interval),
           "--no-save"]
    with open(run / "train.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    return f"lm {model} s{seed}: exit {code}"


def _mt_run(a, bin_dir: Path, variant: str, seed: int) -> str:
    from benchmarks import admin_multi30k_stability as mt

    run = a.work / "mt" / f"{variant}-L{a.mt_layers}-lr{a.mt_lr}-u{a.mt_updates}-s{seed}"
    if (run / "monitor" / "summary.md").exists():
        return f"mt {variant} s{seed}: reused"
    run.mkdir(parents=True, exist_ok=True)
    ns = argparse.Namespace(layers=a.mt_layers, dim=a.mt_dim, warmup=a.mt_warmup, max_tokens=768, updates=a.mt_updates,
                            device="cpu", log_interval=a.mt_interval, valid_every=a.mt_updates, stop_time_hours=0)
    cmd = ["nice", "-n", "10"] + [str(c) for c in mt.train_cmd(bin_dir, run / "ckpt", variant, a.mt_lr, seed, ns)] + [
        "--stability-monitor", str(run / "monitor"), "--stability-monitor-interval", str(a.mt_interval), "--no-save"]
    with open(run / "train.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO).returncode
    return f"mt {variant} s{seed}: exit {code}"


def evidence(a) -> None:
    from benchmarks import admin_multi30k_stability as mt

    seeds = [int(s) for s in a.seeds.split(",")]
    jobs = []
    mt_jobs, lm_jobs = [], []
    if "mt" in a.which:
        data_dir = REPO / "work" / "multi30k_stability" / "data-8000-2000"
        bin_dir = mt.prepare(a.data, data_dir, 8000, 200, 2000)
        mt_jobs = [(_mt_run, (a, bin_dir, v, s)) for s in seeds for v in a.mt_variants.split(",")]
    if "lm" in a.which:
        lm_jobs = [(_lm_run, (a, m, s)) for s in seeds for m in a.lm_models.split(",")]
    # interleaved, so that a sweep cut short still holds both benchmarks' first seeds
    for i in range(max(len(mt_jobs), len(lm_jobs))):
        jobs += mt_jobs[i:i + 1] + lm_jobs[i:i + 1]
    print(f"{len(jobs)} monitored runs, {a.jobs} at a time", flush=True)
    run_jobs(lambda run, run_args: run(*run_args), jobs, a.jobs, label="monitored runs")


# ----------------------------------------------------------------------------- analysis

FAILING = {"post_ln", "postln"}  # the variants known to train badly at these depths (results/admin)


def _read_run(run: Path) -> dict:
    bench, name = run.parent.name, run.name
    variant, seed = name.split("-")[0], int(name.rsplit("-s", 1)[1])
    from stability_toolbox.monitor import read_records  # non-finite values come back as numbers

    records = read_records(run / "monitor" / "monitor.jsonl")
    log = (run / "train.log").read_text(errors="replace")
    warnings = [line[line.index("stability warning:"):] for line in log.splitlines() if "stability warning:" in line]
    steps = [r["step"] for r in records]
    low = [min(r["quantities"].get("grad_ratio", {}).values(), default=float("nan")) for r in records]
    lowest = [min(r["quantities"].get("grad_ratio", {}).items(), key=lambda t: t[1], default=("-", 0))[0]
              for r in records]
    first = next((r for r in records if r.get("warnings")), None)
    return {"bench": bench, "variant": variant, "seed": seed, "run": str(run.relative_to(REPO)), "steps": steps,
            "loss": [r.get("loss") for r in records], "min_grad_ratio": low, "lowest_layer": lowest,
            "warnings_in_log": warnings, "first_warning_step": first["step"] if first else None,
            "first_warnings": first["warnings"] if first else [],
            "output_change_first": max(records[1]["quantities"]["output_change"].values()) if len(records) > 1 and
            records[1]["quantities"]["output_change"] else None,
            "finished": (run / "monitor" / "summary.md").exists()}


def analyze(a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [_read_run(r) for r in sorted((a.work).glob("*/*")) if (r / "monitor" / "monitor.jsonl").exists()]
    a.out.mkdir(parents=True, exist_ok=True)
    lines = ["# Stability monitor on the deep runs", ""]
    summary = {}
    for bench in sorted({r["bench"] for r in runs}):
        mine = [r for r in runs if r["bench"] == bench]
        bad = [r for r in mine if r["variant"] in FAILING]
        good = [r for r in mine if r["variant"] not in FAILING]
        hit = [r for r in bad if r["first_warning_step"] is not None]
        false = [r for r in good if r["first_warning_step"] is not None]
        summary[bench] = {"post_ln_warned": f"{len(hit)}/{len(bad)}", "others_warned": f"{len(false)}/{len(good)}"}
        lines += [f"## {bench}", "",
                  f"Warning rate: Post-LN {len(hit)}/{len(bad)} runs; Admin / Pre-LN / DeepNorm (false alarms) "
                  f"{len(false)}/{len(good)} runs.", "",
                  "| variant | seed | logged steps | first warning at step | lowest grad_ratio (layer) at the last "
                  "logged step | loss at the last logged step | max output change, first interval |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(mine, key=lambda r: (r["variant"], r["seed"])):
            lo = r["min_grad_ratio"][-1] if r["min_grad_ratio"] else float("nan")
            loss = r["loss"][-1] if r["loss"] and r["loss"][-1] is not None else float("nan")
            oc = "-" if r["output_change_first"] is None else f"{r['output_change_first']:.3g}"
            lines.append(f"| {r['variant']} | {r['seed']} | {r['steps'][-1] if r['steps'] else '-'}"
                         f"{'' if r['finished'] else ' (unfinished)'} | {r['first_warning_step']} | {lo:.2g} "
                         f"({r['lowest_layer'][-1] if r['lowest_layer'] else '-'}) | {loss:.3f} | {oc} |")
        lines.append("")
        for r in sorted(hit + false, key=lambda r: (r["variant"], r["seed"])):
            lines.append(f"- {r['variant']} seed {r['seed']}, first warning (of {len(r['warnings_in_log'])} in the log): "
                         f"`{r['first_warnings'][0]}`")
        lines.append("")
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        variants = sorted({r["variant"] for r in mine})
        for r in mine:
            c = f"C{variants.index(r['variant'])}"
            label = f"{r['variant']}" if r["seed"] == min(x["seed"] for x in mine if x["variant"] == r["variant"]) else None
            axes[0].plot(r["steps"], r["min_grad_ratio"], color=c, label=label, alpha=0.8)
            axes[1].plot(r["steps"], r["loss"], color=c, label=label, alpha=0.8)
            if r["first_warning_step"] is not None:
                i = r["steps"].index(r["first_warning_step"])
                axes[0].scatter([r["steps"][i]], [r["min_grad_ratio"][i]], color=c, marker="x", s=60, zorder=5)
                axes[1].axvline(r["first_warning_step"], color=c, ls=":", alpha=0.7)
        axes[0].axhline(1e-3, color="gray", ls="--", lw=0.8)
        axes[0].set(yscale="log", xlabel="update", ylabel="smallest layer grad norm / largest",
                    title=f"{bench}: gradient ratio of the weakest layer (x: first warning)")
        axes[1].set(xlabel="update", ylabel="training loss (base 2)", title=f"{bench}: loss (dotted: first warning)")
        for ax in axes:
            ax.title.set_fontsize(9)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(a.out / f"evidence_{bench}.png", dpi=110)
        plt.close(fig)
        # the layer x step heatmaps of one Post-LN and one Admin run
        import shutil

        for variant in ("post_ln", "postln", "admin"):
            pick = [r for r in mine if r["variant"] == variant and r["finished"]]
            if pick:
                src = REPO / pick[0]["run"] / "monitor"
                for q in ("grad_ratio", "beta", "output_change", "update_ratio"):
                    if (src / f"heatmap_{q}.png").exists():
                        shutil.copy(src / f"heatmap_{q}.png", a.out / f"heatmap_{bench}_{variant}_{q}.png")
    text = "\n".join(lines)
    (a.out / "evidence.md").write_text(text + "\n")
    (a.out / "evidence.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    print(text)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    o.add_argument("--layers", type=int, default=12)
    o.add_argument("--dim", type=int, default=256)
    o.add_argument("--batch", type=int, default=16)
    o.add_argument("--tokens", type=int, default=64)
    o.add_argument("--reps", type=int, default=5)
    o.add_argument("--window", type=int, default=100, help="steps per timed window (a multiple of every interval)")
    o.add_argument("--intervals", default="100,20")
    o.add_argument("--threads", type=int, default=1)
    o.add_argument("--out", type=Path, default=REPO / "results" / "monitor")
    q = sub.add_parser("overhead-paired")
    q.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    q.add_argument("--layers", type=int, default=6)
    q.add_argument("--dim", type=int, default=128)
    q.add_argument("--batch", type=int, default=8)
    q.add_argument("--tokens", type=int, default=64)
    q.add_argument("--pairs", type=int, default=300, help="bare / non-logging monitored step pairs")
    q.add_argument("--logged-pairs", type=int, default=40, help="bare / logged step pairs")
    q.add_argument("--interval", type=int, default=100)
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--out", type=Path, default=REPO / "results" / "monitor")
    r = sub.add_parser("overhead-ab", help="today's monitor against the one at --ref, in one process")
    r.add_argument("--ref", default="HEAD", help="the git revision to compare with (default HEAD)")
    r.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    r.add_argument("--layers", type=int, default=6)
    r.add_argument("--dim", type=int, default=128)
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--tokens", type=int, default=64)
    r.add_argument("--pairs", type=int, default=300, help="rounds between logging steps")
    r.add_argument("--logged-pairs", type=int, default=40, help="rounds on logging steps")
    r.add_argument("--interval", type=int, default=100)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    r.add_argument("--out", type=Path, default=None, help="where overhead_ab_<device>.md/.json go (default: printed only)")
    e = sub.add_parser("evidence")
    e.add_argument("--which", default="mt,lm")
    e.add_argument("--work", type=Path, default=REPO / "work" / "monitor")
    e.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "multi30k")
    e.add_argument("--seeds", default="1,2")
    e.add_argument("--interval", type=int, default=10, help="monitor (and loss log) interval of the LM runs")
    e.add_argument("--mt-interval", type=int, default=5, help="monitor (and loss log) interval of the Multi30k runs")
    e.add_argument("--jobs", type=int, default=2)
    e.add_argument("--mt-variants", default=",".join(MT_VARIANTS))
    e.add_argument("--mt-layers", type=int, default=18)
    e.add_argument("--mt-dim", type=int, default=64)
    e.add_argument("--mt-updates", type=int, default=100)
    e.add_argument("--mt-warmup", type=int, default=40)
    e.add_argument("--mt-lr", default="0.002")
    e.add_argument("--lm-models", default=",".join(LM_MODELS))
    e.add_argument("--lm-layers", type=int, default=12)
    e.add_argument("--lm-dim", type=int, default=128)
    e.add_argument("--lm-updates", type=int, default=150)
    e.add_argument("--lm-warmup", type=int, default=100)
    e.add_argument("--lm-lr", default="2e-3")
    n = sub.add_parser("analyze")
    n.add_argument("--work", type=Path, default=REPO / "work" / "monitor")
    n.add_argument("--out", type=Path, default=REPO / "results" / "monitor")
    a = p.parse_args(argv)
    if a.cmd == "overhead":
        if a.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                p.error("--device cuda: no CUDA device")
        overhead(a)
    elif a.cmd == "overhead-paired":
        if a.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                p.error("--device cuda: no CUDA device")
        overhead_paired(a)
    elif a.cmd == "overhead-ab":
        if a.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                p.error("--device cuda: no CUDA device")
        overhead_ab(a)
    elif a.cmd == "evidence":
        evidence(a)
    else:
        analyze(a)


if __name__ == "__main__":
    main()
