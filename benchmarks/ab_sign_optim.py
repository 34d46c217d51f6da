"""A/B of a change to the sign optimizers' hot path: the current ``sign_optim`` against an earlier commit's, in
one process, on the same tensors, with ``torch.optim.Adam(fused=True)`` as the yardstick.

The earlier commit is imported under another package name, with its native operators in another torch.library
namespace (two libraries may not both define ``sign_optim::fused_sign_``), built by that commit's own setup.py::

    mkdir -p /tmp/ab && git archive <commit> sign_optim setup.py | tar -x -C /tmp/ab
    cd /tmp/ab && mv sign_optim base_sign_optim && sed -i 's/\\bsign_optim\\b/base_sign_optim/g' setup.py \
        base_sign_optim/*.py base_sign_optim/csrc/*.cpp && python setup.py build_ext --inplace
    cd - && PYTHONPATH=/tmp/ab python -m benchmarks.ab_sign_optim --base base_sign_optim --label <commit>

Each alternation times every optimizer ``--steps`` times in a shuffled order (benchmarks/harness.py) and keeps the
median step; the table gives each alternation's ratio to Adam(fused), so the spread is visible.
"""

import argparse
import importlib
import statistics
import sys
from pathlib import Path

import torch

import sign_optim
from benchmarks.bench_sign_optim import _with_grads, hostbound_params, model300_params
from benchmarks.harness import machine, time_interleaved


def flat16m_params():
    """One tensor of 16M floats: the operator's own thread scaling, without a per-tensor cost."""
    return _with_grads([(16 * 2 ** 20,)], "cpu")


SETS = {"model300": model300_params, "hostbound": hostbound_params, "flat16m": flat16m_params}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="importable name of the earlier sign_optim (see above)")
    parser.add_argument("--label", default="base", help="the earlier commit's name in the table")
    parser.add_argument("--sets", default="model300,hostbound", help=f"comma-separated, from {list(SETS)}")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per optimizer per alternation")
    parser.add_argument("--alternations", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the table here (markdown)")
    args = parser.parse_args(argv)
    try:
        base = importlib.import_module(args.base)
    except ImportError as err:
        parser.error(f"--base: cannot import {args.base!r}: {err}")
    sets = args.sets.split(",")
    if any(s not in SETS for s in sets):
        parser.error(f"--sets: choose from {list(SETS)}, got {args.sets!r}")
    threads = [int(t) for t in args.threads.split(",")]
    lines = [f"A/B: sign_optim now vs {args.label} ({args.base}), ratio to torch.optim.Adam(fused=True); "
             f"median of {args.steps} steps per alternation, {args.alternations} alternations", "",
             "| set | threads | optimizer | ms/step (median) | / Adam(fused), each alternation |", "|---|---|---|---|---|"]
    for name in sets:
        params = SETS[name]()
        optimizers = {"Adam(fused)": torch.optim.Adam(params, lr=1e-3, fused=True)}
        for label, module in ((args.label, base), ("now", sign_optim)):
            for rule in ("AddSign", "PowerSign"):
                optimizers[f"{rule} {label}"] = getattr(module, rule)(
                    params, lr=1e-3, sign_internal_decay=module.LinearInternalDecay(10_000))
        for opt in optimizers.values():
            opt.step()  # the state
        for t in threads:
            torch.set_num_threads(t)
            ratios = {k: [] for k in optimizers}
            medians = {k: [] for k in optimizers}
            for alt in range(args.alternations):
                res = time_interleaved({k: o.step for k, o in optimizers.items()}, args.steps, warmup=1, seed=alt)
                for k in optimizers:
                    medians[k].append(res[k]["median_ms"])
                    ratios[k].append(res[k]["median_ms"] / res["Adam(fused)"]["median_ms"])
            for k in optimizers:
                lines.append(f"| {name} | {t} | {k} | {statistics.median(medians[k]):.2f} | "
                             + ", ".join(f"{r:.2f}" for r in ratios[k]) + " |")
                print(lines[-1], flush=True)
    lines += ["", "command: python -m benchmarks.ab_sign_optim " + " ".join(sys.argv[1:] if argv is None else argv),
              f"machine: {machine('cpu')}"]
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
