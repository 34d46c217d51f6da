"""One rank of the sharded-training checks (tests/distributed/test_sharded.py runs it on 2 gloo ranks).

Every scenario builds its model from a seed (the same on every rank), trains on batches that depend on
the rank, and writes what the test compares with a single-process run (full tensors, gathered) under
``OUT/<scenario>/``. Usage (one process per rank, env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):

    python tests/distributed/sharded_worker.py OUT SCENARIO [SCENARIO ...]
"""

import copy
import io
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import admin_torch  # noqa: E402
from reinmax import RoutedFeedForward  # noqa: E402
from sign_optim import AddSign, CosineInternalDecay, PowerSign  # noqa: E402
from sharded_models import BATCH, STEPS, admin_batches, encoder_stack, moe_batches, sign_model  # noqa: E402

RULES = {"AddSign": AddSign, "PowerSign": PowerSign}


def full(t):
    """The whole tensor of a DTensor (a collective), or ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in getattr(model, "layers", getattr(model, "sublayers", [])):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(model, opt, batches, loss_fn):
    for x in batches:
        loss_fn(model, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def save(out: Path, name: str, obj) -> None:
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(obj, out / f"{name}.pt")


def fsdp2_sign(out, mesh, rank, world):
    """AddSign/PowerSign on FSDP2 shards, on every path, against one process (test_sharded.py)."""
    from torch.distributed.fsdp import fully_shard

    for rule in RULES:
        for path, kw in {"default": {}, "fused": {"fused": True}, "foreach": {"foreach": True}}.items():
            model = sign_model(seed=0)
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = RULES[rule](model.parameters(), lr=1e-2, sign_internal_decay=CosineInternalDecay(10), **kw)
            xs = [x.chunk(world)[rank] for x in admin_batches()]
            train(model, opt, xs, lambda m, x: m(x).pow(2).mean())
            params = [full(p).detach() for p in model.parameters()]
            avgs = [full(opt.state[p]["exp_avg"]) for p in model.parameters()]
            fused_local = fused_operator_calls(opt)
            if path == "default":  # a single-process state loaded into the sharded optimizer: refused, unchanged
                single = sign_model(seed=0)
                single_opt = RULES[rule](single.parameters(), lr=1e-2, sign_internal_decay=CosineInternalDecay(10))
                train(single, single_opt, admin_batches()[:1], lambda m, x: m(x).pow(2).mean())
                before = [opt.state[p]["exp_avg"].to_local().clone() for p in model.parameters()]
                try:
                    opt.load_state_dict(single_opt.state_dict())
                    refused = "loaded"
                except ValueError as err:
                    refused = str(err)
                unchanged = all(torch.equal(b, opt.state[p]["exp_avg"].to_local())
                                for b, p in zip(before, model.parameters()))
                save(out, f"{rule}-single-process-state", {"refused": refused, "unchanged": unchanged})
            save(out, f"{rule}-{path}", {"params": params, "avgs": avgs, "fused_buckets": fused_local,
                                         "state_bytes_per_rank": sum(opt.state[p]["exp_avg"].to_local().nbytes
                                                                     for p in model.parameters())})


def fused_operator_calls(opt):
    """One more step of ``opt`` under a dispatch mode: for each call of the fused operator, whether every tensor it
    was handed is a plain tensor (a rank's local shard, not a DTensor)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "sign_optim.fused_sign_" in str(func):
                lists = [a for a in args if isinstance(a, (list, tuple))]
                self.calls.append(all(type(t) is torch.Tensor or type(t) is nn.Parameter
                                      for lst in lists for t in lst))
            return func(*args, **(kwargs or {}))

    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)  # the results were saved: a zero gradient for the recorded step
    with Record() as record:
        opt.step()
    return record.calls


def dcp_resume(out, mesh, rank, world):
    """Save a distributed checkpoint mid-run and resume from it; also resume with a lost optimizer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    ckpt = out / "dcp_resume_ckpt"
    xs = [x.chunk(world)[rank] for x in admin_batches(steps=2 * STEPS)]

    def fresh():
        model = sign_model(seed=0)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, PowerSign(model.parameters(), lr=1e-2, sign_internal_decay=CosineInternalDecay(2 * STEPS))

    loss = lambda m, x: m(x).pow(2).mean()  # noqa: E731
    model, opt = fresh()
    train(model, opt, xs[:STEPS], loss)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(ckpt))
    train(model, opt, xs[STEPS:], loss)
    unbroken = [full(p).detach() for p in model.parameters()]

    resumed = {}
    for how in ("resumed", "optimizer_state_lost"):
        model, opt = fresh()
        if how == "resumed":
            msd, osd = get_state_dict(model, opt)
            dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(ckpt))
            set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
        else:  # the model's weights only: the moving averages and the decay's step start over
            msd, _ = get_state_dict(model, opt)
            dcp.load({"model": msd}, checkpoint_id=str(ckpt))
            set_model_state_dict(model, msd)
        train(model, opt, xs[STEPS:], loss)
        resumed[how] = [full(p).detach() for p in model.parameters()]
    save(out, "dcp_resume", {"unbroken": unbroken, **resumed})


def tensor_parallel(out, mesh, rank, world):
    """Column- then row-parallel linear pair (DTensor Shard and Replicate placements), fused AddSign."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = sign_model(seed=0)
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    opt = AddSign(model.parameters(), lr=1e-2, sign_internal_decay=CosineInternalDecay(10), fused=True)
    train(model, opt, admin_batches(), lambda m, x: m(x).pow(2).mean())  # the same batch on every rank
    params = [full(p).detach() for p in model.parameters()]
    save(out, "tensor_parallel", {"params": params, "fused_buckets": fused_operator_calls(opt)})


def zero(out, mesh, rank, world):
    """ZeroRedundancyOptimizer over DDP with AddSign and a decay; its consolidated state dict loads weights_only."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(sign_model(seed=0))
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=AddSign, lr=1e-2,
                                  sign_internal_decay=CosineInternalDecay(10))
    xs = [x.chunk(world)[rank] for x in admin_batches()]
    train(model, opt, xs, lambda m, x: m(x).pow(2).mean())
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        steps = sorted(float(s["step"]) for s in loaded["state"].values())
        save(out, "zero", {"params": [p.detach() for p in model.module.parameters()], "steps": steps,
                           "decay": loaded["param_groups"][0]["sign_internal_decay"]})


def admin_fsdp2(out, mesh, rank, world):
    """Admin and DeepNorm stacks, convert before fully_shard, profile_omegas on a sharded model, fold after."""
    for kind in ("admin", "deepnorm"):
        model = shard(admin_torch.make_stack(kind, depth=3, dim=8, seed=0), mesh)
        opt = AddSign(model.parameters(), lr=1e-2)
        xs = [x.chunk(world)[rank] for x in admin_batches(shape=(BATCH, 5, 8))]
        train(model, opt, xs, lambda m, x: m(x).pow(2).mean())
        save(out, f"stack-{kind}", [full(p).detach() for p in model.parameters()])

    model = shard(admin_torch.make_stack("admin", depth=3, dim=8, seed=0), mesh)
    batch = admin_batches(shape=(BATCH, 5, 8))[0].chunk(world)[rank]
    save(out, "profile", admin_torch.profile_omegas(model, lambda: model(batch)))

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    converted = admin_torch.convert(encoder_stack(seed=0))
    for layer in converted.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(converted, mesh=mesh)
    opt = AddSign(converted.parameters(), lr=1e-2)
    xs = [x.chunk(world)[rank] for x in admin_batches(shape=(BATCH, 5, 16))]
    train(converted, opt, xs, lambda m, x: m(x).pow(2).mean())
    state = get_model_state_dict(converted, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    save(out, "converted", state)


def moe_fsdp2(out, mesh, rank, world):
    """The MoE layer with its stacked expert weights sharded by FSDP2 (experts split over the ranks)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    moe = RoutedFeedForward(8, 16, num_experts=4, router="switch", capacity_factor=2.0)
    fully_shard(moe, mesh=mesh)
    opt = AddSign(moe.parameters(), lr=1e-2)
    xs = [x.chunk(world)[rank] for x in moe_batches()]
    train(moe, opt, xs, lambda m, x: m(x).pow(2).mean() + 0.01 * m.stats.balance_loss)
    save(out, "moe", {n: full(p).detach() for n, p in moe.named_parameters()})


SCENARIOS = {f.__name__: f for f in (fsdp2_sign, dcp_resume, tensor_parallel, zero, admin_fsdp2, moe_fsdp2)}


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    for name in names:
        SCENARIOS[name](out, mesh, rank, world)
        dist.barrier()
        print(f"rank {rank}: {name} done", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
