"""Where a converted HuggingFace step's overhead goes: the hooks, the Admin residual's operation, its checks.

Five copies of one small random model (nothing downloaded) step in paired, randomly ordered repetitions
(`benchmarks.harness.paired_differences`, thread CPU time at one thread, glibc's allocator kept from
re-mapping large blocks): stock; converted; converted with `OmegaResidual.rescale_sum` replaced by its bare
operation (`addcmul(s, x, omega - 1)`, no checks: the hooks and the operation); and converted with a
`rescale_sum` that returns ``s`` unchanged (the hooks alone: capturing ``x`` and handing it to the LayerNorm).
Cells: the median of the per-step differences from stock over stock's median step, [5%, 95%] bootstrap.
The three converted copies take the hook path (`admin_torch.fused_sums` kept out: what a layer whose forward
cannot be rewritten gets); a fifth copy, converted as `admin_torch.convert` does by default (BART's sums made in
its own forward, no hook), is timed beside them. Families whose hook path takes `rescale_sum` (BART-like: the sum
is made in the layer's own code); BERT-like layers take `scaled_input` instead and are not decomposed here
(refused: exit 2).

    python -m benchmarks.bench_admin_hf_parts --hidden 256 --layers 12 --reps 100 --families bart
"""

import argparse
import copy
import os
import time

import torch

import admin_torch
from admin_torch import fused_sums
from admin_torch.residual import OmegaResidual
from benchmarks import hf_families as H
from benchmarks.bench_admin_hf import _scale, check_hidden
from benchmarks.harness import median_with_interval, paired_differences, stable_allocator, write_lines

HERE = os.path.dirname(os.path.abspath(__file__))


def _bare(self, x, s):
    return torch.addcmul(s, x, self._omega_minus_one_tensor())


def _unchanged(self, x, s):
    return s


def _convert_hooked(model):
    """``model`` converted on the hook path (`admin_torch.fused_sums` refusing every layer)."""
    install = fused_sums.install
    fused_sums.install = lambda *args, **kwargs: None
    try:
        return admin_torch.convert(model)
    finally:
        fused_sums.install = install


def _takes_rescale_sum(family: str) -> bool:
    """Whether ``family``'s model converted on the hook path calls `OmegaResidual.rescale_sum` in a forward pass
    (what the variants replace)."""
    model, x, _ = H.build(family)
    admin = _convert_hooked(model)
    calls, checked = [], OmegaResidual.rescale_sum

    def counted(self, a, b):
        calls.append(1)
        return checked(self, a, b)

    OmegaResidual.rescale_sum = counted
    try:
        with torch.no_grad():
            admin(**x)
    finally:
        OmegaResidual.rescale_sum = checked
    return bool(calls)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--reps", type=int, default=100, help="paired steps of each variant")
    parser.add_argument("--families", nargs="*", default=["bart"])
    parser.add_argument("--out", default=os.path.join(HERE, "..", "results", "admin", "hf_overhead_parts.md"))
    args = parser.parse_args(argv)
    for flag in ("hidden", "layers", "reps"):
        if getattr(args, flag) < (2 if flag == "reps" else 1):
            parser.error(f"--{flag} must be an integer >= {2 if flag == 'reps' else 1}, got {getattr(args, flag)}")
    check_hidden(parser, args.hidden)
    if not args.families:  # an empty table would replace the results file
        parser.error("--families must name at least one family")
    for family in args.families:  # every name checked before any model is built or timed
        if family not in H.families():
            parser.error(f"--families: {family!r} is not one of {list(H.families())}")
    for family in args.families:  # at the families' small default size, before _scale: only which layers they have
        if not _takes_rescale_sum(family):
            parser.error(f"--families: {family!r} never calls OmegaResidual.rescale_sum once converted (its layers "
                         "scale x instead): its variants would time the same model; use a BART-like family")
    torch.set_num_threads(1)
    stable = stable_allocator()
    _scale(args.hidden, args.layers)
    checked = OmegaResidual.rescale_sum
    variants = {"converted": checked, "bare operation": _bare, "hooks alone": _unchanged, "fused (default)": checked}
    lines = ["# Where a converted HuggingFace step's overhead goes", "",
             f"`python -m benchmarks.bench_admin_hf_parts --hidden {args.hidden} --layers {args.layers} --reps "
             f"{args.reps} --families {' '.join(args.families)}` (torch {torch.__version__}; batch 2 x 8 tokens; "
             "forward, backward, SGD step; one thread, thread CPU time; glibc allocator "
             f"{'kept from re-mapping (mallopt)' if stable else 'as it is'}). Cells: median of the per-step "
             "differences from stock over stock's median step [5%, 95% bootstrap].", "",
             "| family | stock step (ms) | " + " | ".join(variants) + " |", "|---|---:|" + "---:|" * len(variants)]
    try:
        for family in args.families:
            model, x, _ = H.build(family)
            models = {"stock": model, **{k: (admin_torch.convert if k == "fused (default)" else _convert_hooked)(
                copy.deepcopy(model)) for k in variants}}
            opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4) for k, m in models.items()}

            def step(k):
                def run():
                    OmegaResidual.rescale_sum = variants.get(k, checked)
                    loss = H.output(models[k](**x)).float().pow(2).mean()
                    loss.backward()
                    opts[k].step()
                    opts[k].zero_grad(set_to_none=True)
                return run

            for m in models.values():
                m.train()
            t = paired_differences({k: step(k) for k in models}, args.reps, clock=time.thread_time)
            base = sorted(t["stock"])[len(t["stock"]) // 2]
            cells = []
            for k in variants:
                m, lo, hi = (100 * v / base for v in median_with_interval([a - b for a, b in zip(t[k], t["stock"])]))
                cells.append(f"{m:+.2f}% [{lo:+.2f}%, {hi:+.2f}%]")
            print(f"{family:10s} stock {base * 1e3:.2f} ms  " + "  ".join(f"{k}: {c}" for k, c in zip(variants, cells)),
                  flush=True)
            lines.append(f"| {family} | {base * 1e3:.2f} | " + " | ".join(cells) + " |")
    finally:
        OmegaResidual.rescale_sum = checked
    write_lines(args.out, lines)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
