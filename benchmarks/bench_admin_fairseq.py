"""Overhead of ``transformer_admin`` in fairseq: training speed, and inference after folding.

1. ``fairseq-train`` words per second (fairseq's own ``wps``) of ``transformer_admin`` (closed-form
   Admin) against the stock ``transformer`` of the same size on the same data, runs interleaved
   (stock, admin, stock, admin, ...), the median over the logged intervals of each run (the first
   interval, with start-up, left out), then the median over runs. Target ratio >= 0.98.
2. Inference: forward passes (eval, no_grad) of the folded model
   (:func:`fairseq_plugins.fold_checkpoint.fold_admin_model`, a stock ``TransformerModel``) against a
   stock model of the same size, interleaved, median. Target ratio >= 0.99. The unfolded Admin
   model is timed as well, for reference.

Everything runs with one thread. Example::

    python -m benchmarks.bench_admin_fairseq                                  # full, CPU
    python -m benchmarks.bench_admin_fairseq --quick                          # a fast check
    python -m benchmarks.bench_admin_fairseq --device cuda --precision bf16   # on the GPU (--fp16/--bf16)
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from benchmarks.harness import time_interleaved

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

MODEL = ["--encoder-layers", "6", "--decoder-layers", "6", "--encoder-embed-dim", "128", "--decoder-embed-dim", "128",
         "--encoder-ffn-embed-dim", "512", "--decoder-ffn-embed-dim", "512",
         "--encoder-attention-heads", "4", "--decoder-attention-heads", "4", "--share-all-embeddings"]


def env():
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e


PRECISION_FLAGS = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"]}


def train_wps(data: Path, arch_args, updates: int, save_dir: Path, device: str = "cpu", precision: str = "fp32"):
    device_args = ["--cpu"] if device == "cpu" else PRECISION_FLAGS[precision]
    cmd = [BIN / "fairseq-train", data, "--user-dir", REPO / "fairseq_plugins", *arch_args, *MODEL,
           "--optimizer", "adam", "--lr", "5e-4", "--max-tokens", "2000", "--max-update", str(updates),
           *device_args, "--seed", "1", "--num-workers", "0", "--no-progress-bar", "--log-format", "simple",
           "--log-interval", "5", "--no-save", "--disable-validation", "--save-dir", save_dir]
    out = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env(), cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(out.stdout[-3000:])
    wps = [float(m.group(1)) for m in re.finditer(r"train_inner .*?wps=([\d.]+)", out.stdout)]
    if len(wps) < 2:
        raise RuntimeError("too few logged intervals:\n" + out.stdout[-2000:])
    return statistics.median(wps[1:])


def build(extra, arch):
    import fairseq_plugins  # noqa: F401
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

    d = Dictionary()
    for i in range(1000):
        d.add_symbol(f"w{i}")
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    ARCH_MODEL_REGISTRY[arch].add_args(parser)
    args = parser.parse_args(MODEL + list(extra))
    args.arch = arch
    ARCH_CONFIG_REGISTRY[arch](args)
    return ARCH_MODEL_REGISTRY[arch].build_model(args, SimpleNamespace(source_dictionary=d, target_dictionary=d))


def inference_times(repeats: int, batches: int, device: str = "cpu"):
    import torch

    from fairseq_plugins.fold_checkpoint import fold_admin_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    stock = build([], "transformer").eval().to(device)
    admin = build(["--admin-init", "admin"], "transformer_admin").eval()
    folded = fold_admin_model(admin).eval().to(device)
    admin = admin.to(device)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(batches):
        src = torch.randint(4, 1000, (16, 20), generator=g)
        prev = torch.randint(4, 1000, (16, 20), generator=g)
        data.append((src.to(device), torch.full((16,), 20, device=device), prev.to(device)))

    with torch.no_grad():
        diff = max((admin(*b)[0] - folded(*b)[0]).abs().max().item() for b in data[:2])
    models = {"stock": stock, "folded": folded, "admin_unfolded": admin}

    def forward_all(m):
        def run():
            with torch.no_grad():
                for b in data:
                    m(*b)
        return run

    timings = time_interleaved({name: forward_all(m) for name, m in models.items()}, repeats, device=device,
                               progress=lambda r, _: print(f"  inference repeat {r}/{repeats}", flush=True))
    times = {name: t["samples_s"] for name, t in timings.items()}
    return {k: statistics.median(v) for k, v in times.items()}, diff


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "results" / "admin")
    p.add_argument("--only", choices=["train", "inference"], help="run only one of the two parts")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=sorted(PRECISION_FLAGS), default="fp32",
                   help="with --device cuda: fairseq-train --fp16 or --bf16")
    a = p.parse_args(argv)
    if a.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is available")
    elif a.precision != "fp32":
        p.error("--precision fp16/bf16 needs --device cuda (fairseq's --fp16 and --bf16 run on a GPU)")
    repeats, updates, inf_repeats = (2, 15, 6) if a.quick else (4, 30, 21)
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.out / "bench_admin_fairseq_work"

    result = {"model": " ".join(MODEL), "quick": a.quick, "device": a.device, "precision": a.precision}
    if a.only != "inference":
        result.update(bench_train(work, repeats, updates, a.device, a.precision))
    if a.only != "train":
        result.update(bench_inference(inf_repeats, a.device))
    name = "bench_admin_fairseq" + (f"_{a.only}" if a.only else "") + ".json"
    (a.out / name).write_text(json.dumps(result, indent=1))
    print(f"written {a.out / name}")


def bench_train(work: Path, repeats: int, updates: int, device: str = "cpu", precision: str = "fp32"):
    from benchmarks.fairseq_data import make_translation_data

    if not (work / "bin" / "dict.src.txt").exists():
        print("making data (reversal corpus, 3000 pairs) ...", flush=True)
        make_translation_data(work, sizes=(3000, 50, 50), vocab=500)
    data = work / "bin"

    print(f"fairseq-train wps, {repeats} interleaved runs x {updates} updates each ...", flush=True)
    wps = {"transformer": [], "transformer_admin": []}
    for r in range(repeats):
        for arch, extra in (("transformer", []), ("transformer_admin", ["--admin-init", "admin"])):
            wps[arch].append(train_wps(data, ["--arch", arch, *extra], updates, work / "ck", device, precision))
            print(f"  run {r + 1}/{repeats} {arch}: {wps[arch][-1]:.0f} wps", flush=True)
    train_ratio = statistics.median(wps["transformer_admin"]) / statistics.median(wps["transformer"])
    per_run = [x / y for x, y in zip(wps["transformer_admin"], wps["transformer"])]
    print(f"train wps median: stock {statistics.median(wps['transformer']):.0f}, "
          f"admin {statistics.median(wps['transformer_admin']):.0f}")
    print(f"train speed ratio admin/stock: {train_ratio:.3f} (target >= 0.98); per pair "
          + ", ".join(f"{x:.3f}" for x in per_run), flush=True)
    return {"train_wps": wps, "train_speed_ratio_admin_over_stock": train_ratio,
            "train_speed_ratio_per_pair": per_run}


def bench_inference(inf_repeats: int, device: str = "cpu"):
    print(f"inference forward passes, {inf_repeats} interleaved repeats ...", flush=True)
    inf, diff = inference_times(inf_repeats, 12, device)  # ~0.5 s of work per model and repeat
    fold_ratio = inf["stock"] / inf["folded"]  # speed ratio (time of stock / time of folded)
    admin_ratio = inf["stock"] / inf["admin_unfolded"]
    print(f"inference speed ratio folded/stock: {fold_ratio:.3f} (target >= 0.99); "
          f"unfolded admin/stock: {admin_ratio:.3f}; fold max abs diff {diff:.2e}", flush=True)
    return {"inference_seconds_median": inf, "inference_speed_ratio_folded_over_stock": fold_ratio,
            "inference_speed_ratio_unfolded_admin_over_stock": admin_ratio, "fold_max_abs_diff": diff}


if __name__ == "__main__":
    main()
