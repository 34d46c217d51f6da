"""Per-rank optimizer step time and optimizer-state bytes under FSDP2 (``fully_shard``), world size 1 and 2.

A transformer-sized stack of linear layers is sharded by FSDP2 over gloo ranks on the CPU; every optimizer
steps the same DTensor parameters and gradients: AddSign/PowerSign with the fused C kernel on each rank's
local shards (the default), the same with ``foreach=True`` (torch's DTensor dispatch), and torch's
``Adam(fused=True)`` and ``Adam(foreach=True)``. Candidates are interleaved in random order
(benchmarks/harness.py); a rank's time is its median, the table shows the slowest rank's.

    python -m benchmarks.bench_sign_optim_sharded                  # world sizes 1 and 2, ~10M parameters
    python -m benchmarks.bench_sign_optim_sharded --layers 2 --dim 64 --reps 3     # a smoke run
"""

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from benchmarks.harness import machine, time_interleaved
from sign_optim import AddSign, LinearInternalDecay, PowerSign

REPO = Path(__file__).resolve().parents[1]

OPTIMIZERS = {
    "AddSign (fused, local shards)": lambda ps: AddSign(ps, lr=1e-3, sign_internal_decay=LinearInternalDecay(10_000)),
    "PowerSign (fused, local shards)": lambda ps: PowerSign(ps, lr=1e-3, sign_internal_decay=LinearInternalDecay(10_000)),
    "AddSign (foreach)": lambda ps: AddSign(ps, lr=1e-3, sign_internal_decay=LinearInternalDecay(10_000), foreach=True),
    "Adam (fused=True)": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "Adam (foreach=True)": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
}


def stack(layers: int, dim: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim),
                            nn.LayerNorm(dim), nn.LayerNorm(dim)) for _ in range(layers)]
    model = nn.Sequential(*blocks)
    model.layers = blocks
    return model


def rank_main(args) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    optimizers, errors = {}, {}
    for name, make in OPTIMIZERS.items():  # each optimizer its own copy of the sharded stack
        model = stack(args.layers, args.dim)
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = list(model.parameters())
        for p in params:
            p.grad = p.detach() * 0.5 + 0.01
        try:
            opt = make(params)
            opt.step()
            optimizers[name] = opt
        except Exception as err:  # e.g. a fused torch optimizer that does not take DTensors: reported
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    timings = time_interleaved({n: o.step for n, o in optimizers.items()}, args.reps, warmup=1, inner=args.steps)
    result = {}
    for name, opt in optimizers.items():
        state = sum((v.to_local() if hasattr(v, "to_local") else v).nbytes
                    for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v) and v.dim())
        t = torch.tensor([timings[name]["median_ms"]], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        result[name] = {"ms": float(t), "state_bytes_per_rank": state}
    params = sum(p.numel() for p in stack(args.layers, args.dim).parameters())
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"sharded-ws{world}.json").write_text(json.dumps(
            {"world": world, "parameters": params, "results": result, "errors": errors}))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(world: int, argv) -> None:
    # each rank runs this module (python -m) from the repository root, which is also put on PYTHONPATH
    env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_sign_optim_sharded", "--rank-main", *argv],
                              env=dict(env, RANK=str(r)), cwd=REPO)
             for r in range(world)]
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"world size {world}: a rank failed (exit {p.returncode})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per timed sample")
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "sign_optim")
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    for flag in ("layers", "dim", "reps", "steps"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    try:
        worlds = [int(w) for w in args.worlds.split(",")]
    except ValueError:
        worlds = [0]
    if any(w < 1 for w in worlds):
        ap.error(f"--worlds: expected comma-separated positive integers, got {args.worlds!r}")
    if args.rank_main:
        return rank_main(args)
    passed = [a for a in argv if a != "--rank-main"]
    for world in worlds:
        print(f"== world size {world}", flush=True)
        launch(world, passed)
    runs = [json.loads((args.out / f"sharded-ws{w}.json").read_text()) for w in worlds]
    names = [n for n in OPTIMIZERS if any(n in r["results"] for r in runs)]
    ref = {r["world"]: r["results"].get("Adam (fused=True)", r["results"].get("Adam (foreach=True)"))["ms"] for r in runs}
    lines = [f"FSDP2 (fully_shard per block and at the root) on gloo CPU ranks, 1 thread each; {runs[0]['parameters'] / 1e6:.1f}M "
             f"parameters ({args.layers} blocks, d={args.dim}); per-rank optimizer step, slowest rank's median of "
             f"{args.reps} interleaved samples of {args.steps} steps", "",
             "| optimizer | " + " | ".join(f"ws={r['world']}: ms/step | / Adam | state bytes/rank" for r in runs) + " |",
             "|---|" + "---|---|---|" * len(runs)]
    for name in names:
        cells = []
        for r in runs:
            res = r["results"].get(name)
            cells.append(f"{res['ms']:.2f} | {res['ms'] / ref[r['world']]:.2f} | {res['state_bytes_per_rank']:,}"
                         if res else f"failed: {r['errors'].get(name, '?')} | | ")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "command: python -m benchmarks.bench_sign_optim_sharded " + " ".join(passed), f"machine: {machine()}"]
    table = "\n".join(lines)
    print(table)
    (args.out / "sharded_step.md").write_text(table + "\n")
    (args.out / "sharded_step.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
