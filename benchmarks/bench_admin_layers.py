"""Training speed of admin_torch's drop-in layers against torch.nn's stock layers.

A 6-layer encoder (and a 6-layer decoder) of ``torch.nn.TransformerEncoderLayer`` against the same
stack built from :class:`admin_torch.TransformerEncoderLayer` (and a stock stack turned Admin by
:func:`admin_torch.convert`): forward + backward + an Adam step, interleaved in random order, median
over repetitions; the ratio stock time / Admin time is the Admin stack's relative speed (target >= 0.98).

    python -m benchmarks.bench_admin_layers                  # CPU
    python -m benchmarks.bench_admin_layers --device cuda
"""

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

import admin_torch
from benchmarks.harness import machine, time_interleaved
from benchmarks.sweep import recorded_args


def stacks(d: int, layers: int, device: str):
    torch.manual_seed(0)
    kw = dict(d_model=d, nhead=4, dim_feedforward=4 * d, dropout=0.1, batch_first=True)
    stock = nn.TransformerEncoder(nn.TransformerEncoderLayer(**kw), layers, enable_nested_tensor=False)
    dropin = nn.TransformerEncoder(admin_torch.TransformerEncoderLayer(**kw, num_res_layers=2 * layers), layers,
                                   enable_nested_tensor=False)
    converted = admin_torch.convert(copy.deepcopy(stock))
    dec_kw = dict(kw)
    stock_dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(**dec_kw), layers)
    dropin_dec = nn.TransformerDecoder(admin_torch.TransformerDecoderLayer(**dec_kw, num_res_layers=3 * layers), layers)
    return {"encoder: stock": stock, "encoder: admin drop-in": dropin, "encoder: stock, convert()ed": converted,
            "decoder: stock": stock_dec, "decoder: admin drop-in": dropin_dec}, device


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--autocast", default="none",
                    help="comma-separated: none, bfloat16, float16 (each a row group; mixed precision by torch.autocast)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "admin")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    precisions = args.autocast.split(",")
    if not precisions or not set(precisions) <= {"none", "bfloat16", "float16"}:
        ap.error(f"--autocast: expected comma-separated none, bfloat16, float16, got {args.autocast!r}")
    torch.set_num_threads(args.threads)
    models, device = stacks(args.dim, args.layers, args.device)
    x = torch.randn(args.batch, args.length, args.dim, device=device)
    opts = {}
    for name, m in models.items():
        m.to(device).train()
        opts[name] = torch.optim.Adam(m.parameters(), lr=1e-4, fused=True)

    def step(name, precision):
        m = models[name]
        with torch.autocast(args.device, dtype=getattr(torch, precision, None), enabled=precision != "none"):
            out = m(x, x) if name.startswith("decoder") else m(x)
        out.float().pow(2).mean().backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    fns = {(name, precision): (lambda name=name, precision=precision: step(name, precision))
           for name in models for precision in precisions}
    timings = time_interleaved(fns, args.reps, device=args.device)
    med = {key: statistics.median(t["samples_s"]) for key, t in timings.items()}
    rows = [("encoder: admin drop-in", "encoder: stock"), ("encoder: stock, convert()ed", "encoder: stock"),
            ("decoder: admin drop-in", "decoder: stock")]
    lines = [f"{args.layers} layers, d={args.dim}, batch {args.batch}x{args.length}, {args.device}, "
             f"{args.threads} thread(s), median of {args.reps} interleaved training steps (benchmarks/harness.py); "
             "Adam(fused) for every stack; precision: float32 weights, torch.autocast to the dtype named", "",
             "| stack | autocast | ms/step | stock ms/step | speed vs stock (>= 0.98) |", "|---|---|---|---|---|"]
    for precision in precisions:
        for admin, stock in rows:
            a, b = med[admin, precision], med[stock, precision]
            lines.append(f"| {admin} | {precision} | {1e3 * a:.1f} | {1e3 * b:.1f} | {b / a:.3f} |")
    lines += ["", "command: python -m benchmarks.bench_admin_layers " + " ".join(sys.argv[1:] if argv is None else argv),
              f"machine: {machine(args.device)}"]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "admin_layers_speed.md").write_text(table + "\n")
    (args.out / "admin_layers_speed.json").write_text(json.dumps({"median_s": {f"{n} ({p})": v for (n, p), v in med.items()}, "args": recorded_args(args)}, default=str,
                                                                 indent=1))


if __name__ == "__main__":
    main()
