"""Step time and state size of AddSign / PowerSign against the optimizer peers in their best
configuration, on a transformer-sized parameter set, at one and two threads in the same run.

Peers: ``torch.optim.Adam(fused=True)`` (the reference: one pass over memory), ``Adam(foreach=True)``,
Lion from the ``lion-pytorch`` package (its foreach variant on CPU, its Triton kernel on CUDA), the
seed's 2018-style per-parameter loop, and a **bandwidth row**: torch's own elementwise ops on one flat
buffer each of p, g and m (``p.add_(g)``, ``m.neg_()``: read p, g, m and write p, m, the bytes AddSign/PowerSign
must move), which run on every intra-op thread (TensorIterator): the memory bandwidth the machine gives torch at
that thread count, so "of copy" says how much of it an optimizer uses.

Three parameter sets, each a table (``--sets``): ``transformer`` (an encoder-decoder, ~13.6M parameters in 257
tensors), ``model300`` (300 tensors: 40 of 512x512, 8 of 2048x512, 252 biases of 512) and ``hostbound`` (3,000
tensors of 4,096 elements, where the per-tensor host cost shows). The **host µs per tensor** column is the
step time of each optimizer on as many 1-element tensors divided by their count: what the optimizer pays per
tensor outside its arithmetic.

Usage::

    python -m benchmarks.bench_sign_optim                  # the three sets, CPU, 1 and 2 threads
    python -m benchmarks.bench_sign_optim --quick          # 3 layers, 3 repetitions
    python -m benchmarks.bench_sign_optim --device cuda    # on the GPU (synchronized timing)

Each repetition times every optimizer in a random order (``--steps`` steps each, the same fixed
gradients), so machine load hits all of them alike; the median over repetitions (and the
interquartile range) is reported, with the ratio to ``Adam(fused=True)``. The first step of a fresh
optimizer in a new process is timed separately. Results: ``results/sign_optim/bench_sign_optim.{json,md}``.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.harness import machine, time_interleaved
from sign_optim import AddSign, LinearInternalDecay, PowerSign, fused


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


class StreamCopy:
    """The bandwidth row: read p, g, m and write p, m with torch's own ops on one flat scratch buffer each, so
    every intra-op thread streams (a reference that ignored the thread count would hide a kernel that does)."""

    def __init__(self, params):
        self.p = torch.cat([p.detach().reshape(-1) for p in params])
        self.g = torch.cat([p.grad.detach().reshape(-1) for p in params])
        self.m = torch.randn_like(self.p)
        self.state = {}

    def step(self):
        self.p.add_(self.g, alpha=1e-6)  # read p, g; write p
        self.m.neg_()  # read m; write m (no denormals however many steps)


def lion(params, device):
    """Lion from lion-pytorch in its best configuration here (None when the package is missing)."""
    try:
        if device == "cuda":
            from lion_pytorch import Lion
            return Lion(params, lr=1e-4, use_triton=True)
        from lion_pytorch.foreach import Lion
        return Lion(params, lr=1e-4)
    except ImportError:
        return None


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def model300_params(device: str = "cpu"):
    """The 300-tensor model of the sign optimizers' speed issue: 40 of 512x512, 8 of 2048x512, 252 biases."""
    return _with_grads([(512, 512)] * 40 + [(2048, 512)] * 8 + [(512,)] * 252, device)


def hostbound_params(device: str = "cpu"):
    """3,000 tensors of 4,096 elements: a set where the per-tensor host cost matters."""
    return _with_grads([(4096,)] * 3000, device)


def _with_grads(shapes, device):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    return params


def first_step_seconds(device: str) -> dict:
    """Seconds of the first step of a fresh AddSign / PowerSign in a new process (imports excluded)."""
    code = ("import sys, time, torch, sign_optim\n"
            "p = torch.nn.Parameter(torch.randn(1000, 1000, device=sys.argv[2])); p.grad = torch.randn_like(p)\n"
            "opt = getattr(sign_optim, sys.argv[1])([p], lr=1e-3)\n"
            "t = time.perf_counter(); opt.step(); p.sum().item(); print(time.perf_counter() - t)\n")
    out = {}
    for name in ("AddSign", "PowerSign"):
        run = subprocess.run([sys.executable, "-c", code, name, device], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1])
        out[name] = float(run.stdout.strip())
    return out


COPY = "bandwidth: torch p.add_(g), m.neg_() (flat)"
#: tensors of the parameters' size each step must read or write at least once: Adam reads p, g, m, v and
#: writes p, m, v; Lion and the sign rules read p, g, m and write p, m (the copy row moves the same five)
TENSORS_MOVED = {"Adam(fused)": 7, "Adam(foreach)": 7, "Lion (lion-pytorch)": 5, "AddSign(fused)": 5,
                 "PowerSign(fused)": 5, "AddSign(foreach)": 5, "PowerSign(foreach)": 5, "AddSign(seed loop)": 5, COPY: 5}


def _factories(device: str) -> dict:
    decay = LinearInternalDecay(10_000)
    return {
        "Adam(fused)": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
        "Adam(foreach)": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
        "Lion (lion-pytorch)": lambda ps: lion(ps, device),
        "AddSign(fused)": lambda ps: AddSign(ps, lr=1e-3, sign_internal_decay=decay, fused=True),
        "PowerSign(fused)": lambda ps: PowerSign(ps, lr=1e-3, sign_internal_decay=decay, fused=True),
        "AddSign(foreach)": lambda ps: AddSign(ps, lr=1e-3, sign_internal_decay=decay, foreach=True),
        "PowerSign(foreach)": lambda ps: PowerSign(ps, lr=1e-3, sign_internal_decay=decay, foreach=True),
        "AddSign(seed loop)": lambda ps: SeedLikeSign(ps, "addsign", sign_internal_decay=decay),
        COPY: lambda ps: StreamCopy(ps),
    }


def host_us_per_tensor(name: str, count: int, device: str, reps: int = 5) -> float:
    """Microseconds per tensor of one step of optimizer ``name`` on ``count`` 1-element tensors (median)."""
    params = _with_grads([(1,)] * count, device)
    opt = _factories(device)[name](params)
    if opt is None:
        return float("nan")
    opt.step()
    times = time_interleaved({name: opt.step}, reps, device=device, warmup=1)[name]["samples_s"]
    return 1e6 * statistics.median(times) / count


def time_optimizers(params, device: str, threads: int, reps: int, steps: int) -> dict:
    torch.set_num_threads(threads)
    factories = _factories(device)
    why = fused.unavailable_reason(torch.device(device))
    if why is not None:  # a fused row without its kernel would time another path under the fused name
        print(f"  fused rows left out: {why}", flush=True)
        factories = {k: v for k, v in factories.items() if "(fused)" not in k or k.startswith("Adam")}
    optimizers = {name: opt for name, make in factories.items() if (opt := make(params)) is not None}
    for opt in optimizers.values():  # allocate the state, warm up
        opt.step()
    def steps_of(opt):
        def run():
            for _ in range(steps):
                opt.step()
        return run

    def progress(rep, last):
        print(f"  {threads} thread(s), repetition {rep}/{reps}: "
              + ", ".join(f"{k} {v * 1e3 / steps:.1f} ms" for k, v in last.items()), flush=True)

    timings = time_interleaved({name: steps_of(opt) for name, opt in optimizers.items()}, reps, device=device,
                               warmup=0, seed=threads, progress=progress)
    times = {name: [x / steps for x in t["samples_s"]] for name, t in timings.items()}
    ref = statistics.median(times["Adam(fused)"])
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    copy_rate = TENSORS_MOVED[COPY] * param_bytes / statistics.median(times[COPY])
    rows = []
    for name, t in times.items():
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
        # the bytes the rule must move (each tensor of the parameters' size read or written once), per second
        rate = TENSORS_MOVED[name] * param_bytes / statistics.median(t)
        rows.append({"optimizer": name, "threads": threads, "ms_median": round(1e3 * statistics.median(t), 2),
                     "host_us_per_tensor": round(host_us_per_tensor(name, len(params), device), 2),
                     "ms_iqr": round(1e3 * (q[2] - q[0]), 2), "time_vs_fused_adam": round(statistics.median(t) / ref, 3),
                     "gb_per_s": round(rate / 1e9, 2), "fraction_of_copy": round(rate / copy_rate, 3),
                     "state_bytes": state_bytes(optimizers[name])})
    return {"rows": rows, "times_s": times}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 layers, 3 repetitions")
    parser.add_argument("--layers", type=int, default=6, help="encoder layers (= decoder layers)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per optimizer per repetition")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts, each a table")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sets", default="transformer,model300,hostbound",
                        help="comma-separated parameter sets (transformer, model300, hostbound), each a table")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "sign_optim")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if args.quick:
        args.layers, args.reps, args.steps = 3, 3, 3

    builders = {"transformer": lambda: transformer_params(args.layers, args.dim, args.ffn, args.vocab, args.device),
                "model300": lambda: model300_params(args.device), "hostbound": lambda: hostbound_params(args.device)}
    sets = args.sets.split(",")
    unknown = [name for name in sets if name not in builders]
    if unknown:
        parser.error(f"--sets: unknown {unknown}; choose from {list(builders)}")
    first = first_step_seconds(args.device)
    print("first step in a new process: " + ", ".join(f"{k} {v:.3f} s" for k, v in first.items()), flush=True)
    command = "python -m benchmarks.bench_sign_optim " + " ".join(sys.argv[1:] if argv is None else argv)
    lines, everything = [], {}
    for name in sets:
        params = builders[name]()
        n = sum(p.numel() for p in params)
        print(f"parameter set {name}: {len(params)} tensors, {n / 1e6:.2f}M parameters; torch {torch.__version__}, "
              f"{args.device}; {args.reps} repetitions x {args.steps} steps", flush=True)
        results = [time_optimizers(params, args.device, t, args.reps, args.steps) for t in threads]
        everything[name] = {"tensors": len(params), "parameters": n, "results": results}
        lines += [f"### {name}: {len(params)} tensors, {n / 1e6:.1f}M parameters", "",
                  "| optimizer | " + " | ".join(f"{t} thread(s): ms/step | / Adam(fused) | GB/s | of copy"
                                               for t in threads) + " | host µs/tensor | state bytes |",
                  "|---|" + "---|---|---|---|" * len(threads) + "---|---|"]
        for i, row in enumerate(results[0]["rows"]):
            cells = []
            for res in results:
                r = res["rows"][i]
                cells.append(f"{r['ms_median']} [{r['ms_iqr']}] | {r['time_vs_fused_adam']} | {r['gb_per_s']} "
                             f"| {100 * r['fraction_of_copy']:.0f}%")
            lines.append(f"| {row['optimizer']} | " + " | ".join(cells)
                         + f" | {row['host_us_per_tensor']} | {row['state_bytes']} |")
        lines.append("")
    lines = [f"{args.device}, torch {torch.__version__}; median of {args.reps} interleaved repetitions x {args.steps} "
             "steps (IQR in brackets; benchmarks/harness.py)", ""] + lines
    probe = {}
    if fused.available(torch.device("cpu")):  # the threads the operator's block scheduler really runs on
        for t in threads:
            torch.set_num_threads(t)
            probe[t] = fused.parallel_probe(64)
    lines += ["fused operator threads (sign_optim.fused.parallel_probe) at each torch.set_num_threads: "
              + (", ".join(f"{t} -> {n}" for t, n in probe.items()) or "not built"),
              "first step of a fresh optimizer in a new process: "
              + ", ".join(f"{k} {v:.3f} s" for k, v in first.items()),
              "GB/s: the bytes each rule must move per step (7 parameter-sized tensors for Adam, 5 for the others, "
              "each read or written once) over its time; of copy: that rate over the bandwidth row's (torch's own ops on "
              "flat buffers, every thread), the bandwidth the same run measured; host µs/tensor: one step on as many 1-element tensors, per tensor (1 thread)",
              f"command: {command}", f"machine: {machine(args.device)}"]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"sets": sets, "threads": threads, "reps": args.reps, "steps": args.steps, "device": args.device,
            "torch": torch.__version__, "reference": "torch.optim.Adam(fused=True)", "first_step_s": first,
            "operator_threads": probe,
            "command": command}
    (args.out / "bench_sign_optim.json").write_text(json.dumps({"meta": meta, "sets": everything}, indent=1))
    (args.out / "bench_sign_optim.md").write_text(table + "\n")
    print(f"wrote {args.out / 'bench_sign_optim.json'} and .md")


if __name__ == "__main__":
    main()
