"""Forward+backward speed and saved-for-backward memory of reinmax vs torch gumbel_softmax and reinmax 0.1.0.

Every candidate produces both outputs a ReinMax user needs, a one-hot sample and the softmax, and
both enter the timed loss ``sum(y_hard * w) + sum(y_soft * v)``: the torch peer is
``gumbel_softmax(hard=True)`` plus ``softmax``. For each shape the candidates run interleaved in a
random order per repetition (a load change on this shared machine hits all of them), after a
warm-up; the median and the interquartile range are reported, with the ratios of reinmax (eager,
data checks on) to the torch peer (target <= 0.75) and to the public reinmax 0.1.0 (target <= 0.6).
A ``torch.compile``d reinmax is timed too; its compile time is printed. Bytes saved for backward
are counted with ``torch.autograd.graph.saved_tensors_hooks``.

    python -m benchmarks.bench_reinmax_speed                   # CPU, float32
    python -m benchmarks.bench_reinmax_speed --device cuda     # GPU, float32 and bfloat16
    python -m benchmarks.bench_reinmax_speed --quick           # fewer repetitions
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import reinmax as ours
from benchmarks.harness import machine, time_interleaved
from benchmarks.memory import saved_bytes
from benchmarks.peers import load_peer

REPO = Path(__file__).resolve().parents[1]

SHAPES = [(8192, 512), (65536, 16), (256, 32768)]
TAU = 1.3


def load_public_reinmax():
    return load_peer("reinmax")


def candidates(public):
    """name -> ``x -> (y_hard, y_soft)``."""
    c = {
        "reinmax (ours)": lambda x: ours.reinmax(x, TAU),
        "torch gumbel_softmax": lambda x: (F.gumbel_softmax(x, TAU, hard=True), torch.softmax(x, -1)),
        "gumbel_softmax (ours)": lambda x: ours.gumbel_softmax(x, TAU),
    }
    if public is not None:
        c["reinmax 0.1.0"] = lambda x: public.reinmax(x, TAU)
    return c


def compiled_reinmax(x, w, v):
    """``torch.compile``d reinmax and its compile time (the first forward+backward), in seconds."""
    fn = torch.compile(lambda t: ours.reinmax(t, TAU), fullgraph=True, dynamic=False)
    t0 = time.perf_counter()
    step(fn, x, w, v)
    sync(x.device)
    return fn, time.perf_counter() - t0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(fn, x, w, v):
    x.grad = None
    y_hard, y_soft = fn(x)
    ((y_hard * w).sum() + (y_soft * v).sum()).backward()


def bench(shape, dtype, device, cands, repeats, compile_too):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_()
    w = torch.randn(shape, generator=gen, device=device).to(dtype)
    v = torch.randn(shape, generator=gen, device=device).to(dtype)
    cands = dict(cands)
    compile_s = None
    if compile_too:
        cands["reinmax (ours, compiled)"], compile_s = compiled_reinmax(x, w, v)
    timings = time_interleaved({name: (lambda fn=fn: step(fn, x, w, v)) for name, fn in cands.items()}, repeats,
                               device=str(device))
    n = x.numel()
    out = {}
    for name, t in timings.items():
        out[name] = {"median_ms": t["median_ms"], "iqr_ms": t["iqr_ms"],
                     "saved_bytes_per_element": saved_bytes(lambda: cands[name](x)) / n}
    return out, compile_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 repetitions instead of 15")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cpu: float32; cuda: float32 and bfloat16 on the GPU")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd reinmax")
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES),
                    help="comma-separated ROWSxCATEGORIES logits shapes")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "reinmax")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 15)
    try:
        shapes = [tuple(int(v) for v in item.split("x")) for item in args.shapes.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        ap.error(f"--shapes: expected comma-separated ROWSxCATEGORIES with positive sizes, got {args.shapes!r}")
    public = load_public_reinmax()
    if public is None:
        print("public reinmax 0.1.0 not found under <venv>/peers: its column is left out", flush=True)
    cands = candidates(public)
    if args.device == "cpu":
        settings = [(torch.device("cpu"), torch.float32)]
    else:
        settings = [(torch.device("cuda"), torch.float32), (torch.device("cuda"), torch.bfloat16)]
    rows = []
    for device, dtype in settings:
        for shape in shapes:
            print(f"[{device.type} {str(dtype)[6:]} {shape}] {repeats} interleaved repetitions ...", flush=True)
            r, compile_s = bench(shape, dtype, device, cands, repeats, not args.no_compile)
            if compile_s is not None:
                print(f"  torch.compile(reinmax): {compile_s:.1f} s to compile; compiled "
                      f"{r['reinmax (ours, compiled)']['median_ms']:.2f} ms vs eager {r['reinmax (ours)']['median_ms']:.2f} ms",
                      flush=True)
            row = {"device": device.type, "dtype": str(dtype)[6:], "shape": list(shape), "threads": torch.get_num_threads(),
                   "results": r, "compile_s": compile_s}
            mine = r["reinmax (ours)"]["median_ms"]
            row["ratio_vs_torch_gumbel_softmax"] = mine / r["torch gumbel_softmax"]["median_ms"]
            if "reinmax 0.1.0" in r:
                row["ratio_vs_reinmax_0_1_0"] = mine / r["reinmax 0.1.0"]["median_ms"]
            rows.append(row)

    header = ("| device | dtype | shape | reinmax ms | compiled ms | torch GS+softmax ms | 0.1.0 ms "
              "| ours/GS (<=0.75) | ours/0.1.0 (<=0.6) | saved B/elem ours | saved B/elem 0.1.0 | saved B/elem torch GS |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        r = row["results"]
        old = r.get("reinmax 0.1.0", {"median_ms": float("nan"), "saved_bytes_per_element": float("nan")})
        comp = r.get("reinmax (ours, compiled)", {"median_ms": float("nan")})
        lines.append(
            f"| {row['device']} | {row['dtype']} | {tuple(row['shape'])} | {r['reinmax (ours)']['median_ms']:.1f} "
            f"| {comp['median_ms']:.1f} | {r['torch gumbel_softmax']['median_ms']:.1f} | {old['median_ms']:.1f} "
            f"| {row['ratio_vs_torch_gumbel_softmax']:.2f} | {row.get('ratio_vs_reinmax_0_1_0', float('nan')):.2f} "
            f"| {r['reinmax (ours)']['saved_bytes_per_element']:.2f} | {old['saved_bytes_per_element']:.2f} "
            f"| {r['torch gumbel_softmax']['saved_bytes_per_element']:.2f} |")
    lines = [f"forward + backward of both outputs ((y_hard * w).sum() + (y_soft * v).sum()), tau={TAU}; median of "
             f"{repeats} interleaved repetitions (benchmarks/harness.py); every peer in its best configuration", ""] + \
        lines + ["", "command: python -m benchmarks.bench_reinmax_speed " + " ".join(sys.argv[1:] if argv is None else argv),
                 f"machine: {machine(args.device)}"]
    table = "\n".join(lines)
    print(f"\n{table}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reinmax_speed.json").write_text(json.dumps(rows, indent=1))
    (args.out / "reinmax_speed.md").write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{r['device']} {r['dtype']}\n{tuple(r['shape'])}" for r in rows]
        xs = range(len(rows))
        ax.bar([i - 0.2 for i in xs], [r["ratio_vs_torch_gumbel_softmax"] for r in rows], 0.4, label="ours / torch gumbel_softmax")
        ax.bar([i + 0.2 for i in xs], [r.get("ratio_vs_reinmax_0_1_0", float("nan")) for r in rows], 0.4, label="ours / reinmax 0.1.0")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.75, color="gray", lw=0.8, ls="--")
        ax.axhline(0.6, color="gray", lw=0.8, ls=":")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_ylabel("time ratio (lower is faster)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out / "reinmax_speed.png", dpi=120)
    except ImportError:
        pass
    print(f"wrote {args.out}/reinmax_speed.{{json,md,png}}", flush=True)
    return rows


if __name__ == "__main__":
    main()
