"""Step time and state size of AddSign / PowerSign against torch.optim.Adam (fused, the fastest, and
foreach) and a per-parameter Python loop like the seed's 2018 port, on a transformer-sized parameter set.

Usage::

    python benchmarks/bench_sign_optim.py                  # ~13.6M parameters in 256 tensors, CPU
    python benchmarks/bench_sign_optim.py --quick          # 3 layers, 3 repetitions
    python benchmarks/bench_sign_optim.py --device cuda    # on the GPU (synchronized timing)

Each repetition times every optimizer in a random order (``--steps`` steps each, the same fixed
gradients), so machine load hits all of them alike; the median over repetitions is reported, with
the ratio to ``Adam(fused=True)``. Results: ``benchmarks/results/bench_sign_optim.{json,md}`` (or ``--out DIR``).
"""

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sign_optim import AddSign, LinearInternalDecay, PowerSign  # noqa: E402


def transformer_params(layers: int, dim: int, ffn: int, vocab: int, device: str = "cpu"):
    """Shapes of an encoder-decoder transformer (``layers`` encoder + ``layers`` decoder layers)."""
    shapes = [(vocab, dim)]

    def attention():
        return [(dim, dim), (dim,)] * 4

    def ln():
        return [(dim,), (dim,)]

    for _ in range(layers):  # encoder: self-attention, FFN, 2 layer norms
        shapes += attention() + [(ffn, dim), (ffn,), (dim, ffn), (dim,)] + ln() * 2
    for _ in range(layers):  # decoder: self- and cross-attention, FFN, 3 layer norms
        shapes += attention() * 2 + [(ffn, dim), (ffn,), (dim, ffn), (dim,)] + ln() * 3
    shapes += ln() * 2
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    return params


class SeedLikeSign(torch.optim.Optimizer):
    """The peer: a per-parameter Python loop as in the seed's port (decay callable in the group)."""

    def __init__(self, params, rule, lr=1e-3, beta=0.9, alpha=1.0, sign_internal_decay=None):
        decay = sign_internal_decay or (lambda step: 1.0)
        super().__init__(params, dict(lr=lr, beta=beta, alpha=alpha, sign_internal_decay=decay))
        self.rule = rule

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                state["step"] += 1
                exp_avg.mul_(group["beta"]).add_(grad, alpha=1 - group["beta"])
                decay = group["sign_internal_decay"](state["step"] - 1)
                sign_term = grad.sign() * exp_avg.sign()
                if self.rule == "addsign":
                    update = grad * (group["alpha"] + decay * sign_term)
                else:
                    update = grad * torch.exp(math.log(group["alpha"]) * decay * sign_term)
                p.add_(update, alpha=-group["lr"])


def unchunked(opt):
    """The foreach path over whole tensors (no cache-sized pieces): shows what the chunking brings on CPU."""
    opt.cpu_chunk_numel = 0
    return opt


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6-layer model, 3 repetitions")
    parser.add_argument("--layers", type=int, default=6, help="encoder layers (= decoder layers)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per optimizer per repetition")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.quick:
        args.layers, args.reps, args.steps = 3, 3, 3
    torch.set_num_threads(args.threads)

    params = transformer_params(args.layers, args.dim, args.ffn, args.vocab, args.device)
    n = sum(p.numel() for p in params)
    print(f"parameter set: {len(params)} tensors, {n / 1e6:.2f}M parameters; torch {torch.__version__}, "
          f"{args.threads} thread(s); {args.reps} repetitions x {args.steps} steps", flush=True)
    decay = LinearInternalDecay(10_000)
    factories = {
        "Adam(fused)": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
        "Adam(foreach)": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
        "AddSign(foreach)": lambda ps: AddSign(ps, lr=1e-3, sign_internal_decay=decay, foreach=True),
        "PowerSign(foreach)": lambda ps: PowerSign(ps, lr=1e-3, sign_internal_decay=decay, foreach=True),
        "AddSign(foreach, unchunked)": lambda ps: unchunked(AddSign(ps, lr=1e-3, sign_internal_decay=decay, foreach=True)),
        "PowerSign(foreach, unchunked)": lambda ps: unchunked(PowerSign(ps, lr=1e-3, sign_internal_decay=decay, foreach=True)),
        "AddSign(single)": lambda ps: AddSign(ps, lr=1e-3, sign_internal_decay=decay, foreach=False),
        "PowerSign(single)": lambda ps: PowerSign(ps, lr=1e-3, sign_internal_decay=decay, foreach=False),
        "AddSign(seed loop)": lambda ps: SeedLikeSign(ps, "addsign", sign_internal_decay=decay),
        "PowerSign(seed loop)": lambda ps: SeedLikeSign(ps, "powersign", alpha=math.e, sign_internal_decay=decay),
    }
    optimizers = {name: make(params) for name, make in factories.items()}
    for opt in optimizers.values():  # allocate the state, warm up
        opt.step()
    times = {name: [] for name in optimizers}
    order, rng = list(optimizers), random.Random(0)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    for rep in range(args.reps):
        rng.shuffle(order)
        for name in order:
            opt = optimizers[name]
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            sync()
            times[name].append((time.perf_counter() - start) / args.steps)
        print(f"  repetition {rep + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()),
              flush=True)

    adam_t = statistics.median(times["Adam(fused)"])
    adam_b = state_bytes(optimizers["Adam(fused)"])
    rows = []
    for name, opt in optimizers.items():
        t = statistics.median(times[name])
        rows.append({"optimizer": name, "ms_per_step": round(t * 1e3, 2), "time_vs_adam": round(t / adam_t, 3),
                     "state_bytes": state_bytes(opt), "state_vs_adam": round(state_bytes(opt) / adam_b, 3)})
    for name in ("AddSign", "PowerSign"):
        ours, seed = (statistics.median(times[f"{name}({k})"]) for k in ("foreach", "seed loop"))
        rows.append({"optimizer": f"{name}: seed loop / foreach", "ms_per_step": None,
                     "time_vs_adam": None, "speedup_vs_seed_loop": round(seed / ours, 2)})

    lines = ["| optimizer | ms/step (median) | time / Adam(fused) | state bytes | state / Adam |", "|---|---|---|---|---|"]
    for r in rows:
        if "speedup_vs_seed_loop" in r:
            lines.append(f"| {r['optimizer']} | | speed-up x{r['speedup_vs_seed_loop']} | | |")
        else:
            lines.append(f"| {r['optimizer']} | {r['ms_per_step']} | {r['time_vs_adam']} | {r['state_bytes']} | {r['state_vs_adam']} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"tensors": len(params), "parameters": n, "threads": args.threads, "reps": args.reps, "steps": args.steps,
            "device": args.device, "torch": torch.__version__, "peer": "torch.optim.Adam(fused=True)"}
    (args.out / "bench_sign_optim.json").write_text(json.dumps({"meta": meta, "rows": rows, "times_s": times}, indent=1))
    (args.out / "bench_sign_optim.md").write_text(f"{json.dumps(meta)}\n\n{table}\n")
    print(f"wrote {args.out / 'bench_sign_optim.json'} and .md")


if __name__ == "__main__":
    main()
