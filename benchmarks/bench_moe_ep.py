"""Expert parallelism of `RoutedFeedForward` on gloo CPU ranks: the equality table and the memory/throughput table.

``equality``: for every sparse router, without a capacity (the variable-size exchange) and with one that drops
tokens, at P = 2 and 4 ranks: each rank runs the expert-parallel layer (E/P experts) on its part of a global
batch (uneven token counts), and the single-process layer with every expert (the same seed) on every rank's
part with the same routing samples; the table is the largest difference over the ranks of the outputs, input,
router and expert gradients (an expert's single-process gradient summed over the ranks' losses) and stats.

``speed``: forward + backward of one layer at P = 1, 2, 4 (weak scaling: the same tokens per rank), capacity
mode, one thread per rank: tokens/s over the group, expert bytes per rank, all-to-all bytes per rank and step.

On CUDA (``--device cuda``, NCCL, one GPU per rank; ``make gpu-check`` runs the equality table there) it needs
as many GPUs as the largest P, and says ``skipped:`` otherwise.

    nice -n 10 python -m benchmarks.bench_moe_ep equality          # results/moe/ep_equality.{md,json}
    nice -n 10 python -m benchmarks.bench_moe_ep speed             # results/moe/ep_speed.{md,json}
    python -m benchmarks.bench_moe_ep speed --tokens 64 --dim 32 --reps 2    # a smoke run
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.harness import machine
from reinmax import SPARSE_ROUTERS, RoutedFeedForward
from toolbox_core.files import atomic_write

REPO = Path(__file__).resolve().parents[1]
D, H, E = 16, 32, 8
CAPACITIES = (None, 0.5)
KEYS = ("out", "x_grad", "router_grad", "expert_grad", "balance_loss", "load", "dropped")


# ---------------------------------------------------------------- equality


DEVICE = torch.device("cpu")


def _layer(router, capacity, group=None, dtype=torch.float32):
    torch.manual_seed(0)
    return RoutedFeedForward(D, H, E, router=router, tau=1.3, capacity_factor=capacity,
                             expert_parallel_group=group).to(DEVICE, dtype)


def _batch(world, rank, dtype):
    sizes = [12 + 3 * r for r in range(world)]  # uneven token counts
    g = torch.Generator().manual_seed(7)
    x = torch.randn(sum(sizes), D, generator=g).to(DEVICE, dtype) * 2
    w = torch.randn(sum(sizes), D, generator=g).to(DEVICE, dtype)
    return x.split(sizes)[rank].clone(), w.split(sizes)[rank].clone()


def _run(moe, world, rank, dtype):
    x, w = _batch(world, rank, dtype)
    x.requires_grad_(True)
    y = moe(x, generator=torch.Generator(DEVICE).manual_seed(1000 + rank))
    ((w * y).sum() + 0.1 * moe.stats.balance_loss).backward()
    s = moe.stats
    return {"out": y.detach(), "x_grad": x.grad, "router_grad": moe.router.weight.grad,
            "expert_grad": torch.cat([p.grad.flatten(1) for n, p in moe.named_parameters() if n.startswith("fc")], 1),
            "balance_loss": s.balance_loss.detach(), "load": s.load, "dropped": s.dropped}


def equality_rank(rank, world, dtype):
    rows = []
    for router in SPARSE_ROUTERS:
        for capacity in CAPACITIES:
            got = _run(_layer(router, capacity, dist.group.WORLD, dtype), world, rank, dtype)
            refs = [_run(_layer(router, capacity, None, dtype), world, r, dtype) for r in range(world)]
            want = dict(refs[rank])
            per = E // world
            want["expert_grad"] = sum(r["expert_grad"] for r in refs)[rank * per:(rank + 1) * per]
            diff = {k: float((got[k].double() - want[k].double()).abs().max()) if got[k].numel() else 0.0 for k in KEYS}
            diff["dropped_fraction"] = float(got["dropped"])
            rows.append({"router": router, "capacity_factor": capacity, "P": world, "rank": rank, **diff})
    return rows


# ---------------------------------------------------------------- speed


def speed_rank(rank, world, args):
    group = dist.group.WORLD if world > 1 else None
    torch.manual_seed(0)
    moe = RoutedFeedForward(args.dim, 4 * args.dim, args.experts, router="switch", capacity_factor=args.capacity,
                            expert_parallel_group=group).to(DEVICE)
    x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(rank)).to(DEVICE)

    def step():
        moe(x).sum().backward()
        moe.zero_grad(set_to_none=True)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(args.reps):
        if group is not None:
            dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        times.append((time.perf_counter() - start) / args.steps)
    expert_bytes = sum(p.numel() * p.element_size() for n, p in moe.named_parameters() if n.startswith("fc"))
    C = moe.capacity(args.tokens)
    slot_bytes = args.experts * C * args.dim * 4
    # forward: dispatch + combine; backward: their reverse exchanges; (P-1)/P of each leaves the rank
    a2a = 0 if world == 1 else 4 * slot_bytes * (world - 1) // world
    times.sort()
    return {"P": world, "rank": rank, "s_per_step": times[len(times) // 2], "expert_bytes": expert_bytes,
            "all_to_all_bytes_sent": a2a, "slots": C}


# ---------------------------------------------------------------- launch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_main(args) -> None:
    global DEVICE
    torch.set_num_threads(1)
    if args.device == "cuda":
        DEVICE = torch.device("cuda", int(os.environ["RANK"]))
        torch.cuda.set_device(DEVICE)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.what == "equality":
        rows = equality_rank(rank, world, torch.float32) + [
            dict(r, dtype="float64") for r in equality_rank(rank, world, torch.float64)]
    else:
        rows = [speed_rank(rank, world, args)]
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        with atomic_write(args.out / f"_ep_{args.what}_P{world}.json") as f:
            json.dump([row for part in gathered for row in part], f)
    dist.destroy_process_group()


def launch(world: int, argv) -> None:
    env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_moe_ep", *argv, "--rank-main"],
                              env=dict(env, RANK=str(r)), cwd=REPO) for r in range(world)]
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"P={world}: a rank failed (exit {p.returncode})")


def _collect(args, worlds):
    rows = []
    for w in worlds:
        part = args.out / f"_ep_{args.what}_P{w}.json"
        rows += json.loads(part.read_text())
        part.unlink()
    return rows


def equality_table(rows):
    lines = [f"Expert-parallel `RoutedFeedForward` ({E} experts, d={D}, ffn={H}, tau=1.3) against the single-process "
             "layer on each rank's part of the same global batch (uneven token counts), with the same routing "
             "samples: the largest absolute difference over the ranks. Expert gradients: the single-process "
             "gradient summed over the ranks' losses.", ""]
    for dtype in ("float32", "float64"):
        lines += [f"**{dtype}**", "",
                  "| router | capacity_factor | P | outputs | input grad | router grad | expert grads | balance loss "
                  "| load | dropped | dropped fraction (max rank) |", "|---|---|---|" + "---|" * 8]
        sel = [r for r in rows if r.get("dtype", "float32") == dtype]
        for router in SPARSE_ROUTERS:
            for cap in CAPACITIES:
                for P in sorted({r["P"] for r in sel}):
                    grp = [r for r in sel if r["router"] == router and r["capacity_factor"] == cap and r["P"] == P]
                    cells = " | ".join(f"{max(r[k] for r in grp):.1e}" for k in KEYS)
                    dropped = max(r["dropped_fraction"] for r in grp)
                    lines.append(f"| {router} | {cap} | {P} | {cells} | {dropped:.3f} |")
        lines.append("")
    return lines


def speed_table(rows, args):
    worlds = sorted({r["P"] for r in rows})
    base = None
    lines = [f"One `RoutedFeedForward` (switch, {args.experts} experts, d={args.dim}, ffn={4 * args.dim}, "
             f"capacity_factor={args.capacity}), {args.tokens} tokens per rank (weak scaling), forward + backward, "
             f"gloo CPU ranks with one thread each; a step's time is the slowest rank's median of {args.reps} samples "
             f"of {args.steps} steps.", "",
             "| P | expert bytes per rank | vs P=1 | tokens/s (group) | s/step "
             "| all-to-all bytes sent per rank per step |",
             "|---|---|---|---|---|---|"]
    for P in worlds:
        grp = [r for r in rows if r["P"] == P]
        step = max(r["s_per_step"] for r in grp)
        mem = max(r["expert_bytes"] for r in grp)
        base = base or mem
        lines.append(f"| {P} | {mem:,} | {mem / base:.3f} | {P * args.tokens / step:,.0f} | {step:.4f} | "
                     f"{max(r['all_to_all_bytes_sent'] for r in grp):,} |")
    return lines + [""]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["equality", "speed"])
    ap.add_argument("--worlds", default=None, help="comma-separated P (default: 2,4 for equality, 1,2,4 for speed)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--capacity", type=float, default=1.25)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: NCCL, one GPU per rank")
    ap.add_argument("--out", type=Path, default=Path("results") / "moe")
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    for flag in ("tokens", "dim", "experts", "reps", "steps"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not args.capacity > 0:
        ap.error(f"--capacity must be > 0, got {args.capacity}")
    try:
        worlds = [int(w) for w in (args.worlds or ("2,4" if args.what == "equality" else "1,2,4")).split(",")]
    except ValueError:
        worlds = [0]
    if any(w < 1 for w in worlds) or any(args.experts % w for w in worlds):
        ap.error(f"--worlds: expected positive integers dividing --experts {args.experts}, got {args.worlds!r}")
    if args.rank_main:
        return rank_main(args)
    if args.device == "cuda" and (not torch.cuda.is_available() or torch.cuda.device_count() < max(worlds)):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        print(f"skipped: expert parallelism at P={max(worlds)} over NCCL needs {max(worlds)} CUDA devices, "
              f"found {count}")
        return None
    args.out.mkdir(parents=True, exist_ok=True)
    passed = [a for a in argv if a != "--rank-main"]
    for w in worlds:
        print(f"== P={w}", flush=True)
        launch(w, passed)
    rows = _collect(args, worlds)
    lines = equality_table(rows) if args.what == "equality" else speed_table(rows, args)
    lines += ["command: python -m benchmarks.bench_moe_ep " + " ".join(passed), f"machine: {machine(args.device)}"]
    table = "\n".join(lines)
    print(table)
    with atomic_write(args.out / f"ep_{args.what}.md") as f:
        f.write(table + "\n")
    with atomic_write(args.out / f"ep_{args.what}.json") as f:
        json.dump({"rows": rows, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                          if k != "rank_main"}}, f, indent=1)


if __name__ == "__main__":
    main()
