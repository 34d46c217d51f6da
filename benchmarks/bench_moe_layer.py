"""Training throughput (tokens per second, forward + backward) of the MoE layer with a capacity, eager and
compiled, against the dense FFN with the same active parameters per token.

``reinmax.RoutedFeedForward(d, 4d, E, router, capacity_factor=1.25)`` has static shapes (E x C slots,
batched matmuls) and no host-device synchronization, so it compiles with ``torch.compile(fullgraph=True)``;
the dense row is ``fc2(relu(fc1(x)))`` of the same d and 4d, i.e. what one token costs at capacity 1.
Candidates run interleaved in random order (benchmarks/harness.py), median of ``--reps``.

    python -m benchmarks.bench_moe_layer --device cuda
    python -m benchmarks.bench_moe_layer --tokens 512 --dim 64 --reps 3 --no-compile     # a CPU smoke run
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from benchmarks.harness import machine, time_interleaved
from reinmax import RoutedFeedForward

REPO = Path(__file__).resolve().parents[1]


def candidates(args, device, dtype):
    d = args.dim
    out = {"dense FFN (same active params)": nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d))}
    for router in args.routers.split(","):
        moe = RoutedFeedForward(d, 4 * d, args.experts, router=router, capacity_factor=args.capacity_factor)
        out[f"{router}, eager"] = moe
        if not args.no_compile:
            out[f"{router}, compiled"] = torch.compile(moe, fullgraph=True)
    return {name: m.to(device=device, dtype=dtype).train() for name, m in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--routers", default="switch,sparsemixer")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bfloat16 on cuda")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "reinmax")
    args = ap.parse_args(argv)
    for flag in ("tokens", "dim", "experts", "reps"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not args.capacity_factor > 0:
        ap.error(f"--capacity-factor must be > 0, got {args.capacity_factor}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    torch.manual_seed(0)
    models = candidates(args, args.device, dtype)
    x = torch.randn(args.tokens, args.dim, device=args.device, dtype=dtype, requires_grad=True)

    def step(model):
        def run():
            model(x).float().pow(2).mean().backward()
        return run

    timings = time_interleaved({name: step(m) for name, m in models.items()}, args.reps, device=args.device, warmup=2)
    dense = timings["dense FFN (same active params)"]["median_ms"]
    lines = [f"{args.tokens} tokens x d={args.dim}, FFN 4d, {args.experts} experts, capacity factor "
             f"{args.capacity_factor:g}, {str(dtype)[6:]}, forward + backward; median of {args.reps} interleaved "
             "repetitions (benchmarks/harness.py)", "",
             "| layer | ms | IQR | tokens/s | time / dense FFN |", "|---|---|---|---|---|"]
    for name, t in timings.items():
        lines.append(f"| {name} | {t['median_ms']:.2f} | {t['iqr_ms']:.2f} | {args.tokens / t['median_ms'] * 1e3:,.0f} "
                     f"| {t['median_ms'] / dense:.2f} |")
    command = "python -m benchmarks.bench_moe_layer " + " ".join(argv if argv is not None else sys.argv[1:])
    lines += ["", f"command: {command}", f"machine: {machine(args.device)}"]
    table = "\n".join(lines)
    print(table, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe_layer_speed.md").write_text(table + "\n")
    (args.out / "moe_layer_speed.json").write_text(json.dumps(
        {name: {k: v for k, v in t.items() if k != "samples_s"} for name, t in timings.items()}, indent=1))
    return timings


if __name__ == "__main__":
    main()
