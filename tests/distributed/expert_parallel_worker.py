"""One rank of the expert-parallel checks (tests/distributed/test_expert_parallel.py runs it on 4 gloo ranks:
expert parallelism over all 4, and over the pairs [0, 1] and [2, 3]). Each scenario writes what the test
compares with one process under ``OUT/<scenario>-<rank>.pt``.
Usage (one process per rank, env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):

    python tests/distributed/expert_parallel_worker.py OUT SCENARIO [SCENARIO ...]

``dead_rank`` must come last: rank 1 exits in the middle of a step, and rank 0 records how it failed.
"""

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from expert_parallel_cases import (CASES, CLIP, EDGES, OPTIMIZERS, Model, edge_layer, layer, model_loss,  # noqa: E402
                                   optimizer, run, run_edge)
from reinmax import RoutedFeedForward, expert_parallel  # noqa: E402


def save(out: Path, name: str, obj) -> None:
    torch.save(obj, out / f"{name}-{dist.get_rank()}.pt")


def equality(out, rank, world, pair):
    """Every sparse router, with and without a capacity, on P = world and P = 2 (this rank's pair)."""
    got = {world: {f"{r}-{c}": run(layer(r, c, dist.group.WORLD), world, rank) for r, c in CASES}}
    if world > 2:
        got[2] = {f"{r}-{c}": run(layer(r, c, pair), 2, pair.rank()) for r, c in CASES}
    save(out, "equality", got)


def edges(out, rank, world, pair):
    """The edge cases of ``EDGES`` on P = 2 (this rank's pair): an empty rank, every token on one expert with an
    input that needs no gradient, tiny and huge capacities, eval + no_grad, a 3-D non-contiguous input, a
    double backward, bfloat16."""
    save(out, "edges", {name: run_edge(edge_layer(spec, pair), pair.rank(), spec) for name, spec in EDGES.items()})


def _refused(build) -> str:
    try:
        build()
    except (TypeError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return "accepted"


def refusals(out, rank, world, pair):
    """Arguments that differ between ranks, a group that does not divide the experts, the dense router."""
    from torch.distributed.device_mesh import init_device_mesh

    last = rank == world - 1
    group = dist.group.WORLD
    got = {
        "router": _refused(lambda: RoutedFeedForward(6, 8, 4, router="switch" if last else "sparsemixer",
                                                     expert_parallel_group=group)),
        "capacity": _refused(lambda: RoutedFeedForward(6, 8, 4, capacity_factor=2.0 if last else None,
                                                       expert_parallel_group=group)),
        "bad_tau_on_one_rank": _refused(lambda: RoutedFeedForward(6, 8, 4, router="gumbel_softmax",
                                                                  tau=-1.0 if last else 1.0,
                                                                  expert_parallel_group=group)),
        "not_dividing": _refused(lambda: RoutedFeedForward(6, 8, world + 1, expert_parallel_group=group)),
        "reinmax": _refused(lambda: RoutedFeedForward(6, 8, 4, router="reinmax", expert_parallel_group=group)),
        "mesh_2d": _refused(lambda: RoutedFeedForward(6, 8, 4,
                                                      expert_parallel_group=init_device_mesh("cpu", (1, world)))),
    }
    # a layer converted to another dtype on one rank after construction: the same ValueError on every rank at
    # the first call (the exchanges would read float32 bytes as float64), in both modes
    for capacity in (None, 1.0):
        moe = layer("switch", capacity, group).to(torch.float32 if last else torch.float64)
        got[f"dtype_{capacity}"] = _refused(lambda: moe(torch.randn(5, 6, dtype=moe.fc1_weight.dtype)))
    # a group this rank is not in (new_group returns NON_GROUP_MEMBER on the ranks outside it)
    only_first = dist.new_group([0])
    got["not_member"] = "member" if rank == 0 else _refused(
        lambda: RoutedFeedForward(6, 8, 4, expert_parallel_group=only_first))
    # after every refusal the group still works: a layer built right after trains
    moe = layer("switch", 1.0, group)
    got["after"] = run(moe, world, rank)["out"].shape[0] > 0
    save(out, "refusals", got)


def dead_rank(out, rank, world, pair):
    """On the group of ranks 0 and 1: rank 1 first stalls (rank 0's forward must time out, naming the group),
    then exits between a forward and its backward (rank 0's backward exchange must fail, naming the group)."""
    stalled = dist.new_group([0, 1], backend="gloo", timeout=timedelta(seconds=3))
    dying = dist.new_group([0, 1], backend="gloo", timeout=timedelta(seconds=3))
    if rank >= 2:
        dist.barrier()
        os._exit(0)
    moe_stalled, moe_dying = layer("switch", 1.0, stalled), layer("switch", 1.0, dying)
    x = torch.randn(6, 6, dtype=torch.float64)
    y = moe_dying(x)
    dist.barrier()
    if rank == 1:
        time.sleep(4)
        os._exit(0)
    got = {}
    for what, step in (("stalled", lambda: moe_stalled(x)), ("died", lambda: y.pow(2).sum().backward())):
        start = time.monotonic()
        try:
            step()
            got[what] = None
        except Exception as err:  # what the test checks: the type and the message
            got[what] = f"{type(err).__name__}: {err}"
        got[what + "_seconds"] = time.monotonic() - start
    save(out, "dead_rank", got)
    sys.stdout.flush()
    os._exit(0)  # the default group has lost a rank: no barrier, no destroy


def _train(model, ddp, opt, world, rank, steps, dp_group, start=0):
    for step in range(start, start + steps):
        model_loss(ddp, model.moe, world, rank, step).backward()
        expert_parallel.reduce_expert_gradients(model, dp_group)
        opt.step()
        opt.zero_grad(set_to_none=True)


def composition(out, rank, world, pair):
    """DDP over the non-expert parameters of all ranks, expert parallelism over the "ep" dimension of a
    (dp=2, ep=2) DeviceMesh; AdamW and the sign optimizers; 3 steps; then AdamW's step-3 gradient clipped."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "ep"))
    got = {}
    for name in OPTIMIZERS:
        model = Model(mesh["ep"])
        ignored = expert_parallel.exclude_experts_from_ddp(model)
        # find_unused_parameters (once): DDP's search for unused parameters must leave the experts alone too
        ddp = DistributedDataParallel(model, find_unused_parameters=name == "PowerSign")
        _train(model, ddp, optimizer(name, list(model.parameters())), world, rank, 3, mesh["dp"].get_group())
        got[name] = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                     "experts": list(model.moe.expert_range()), "ignored": ignored}
        if name == "AdamW":  # the gradient of step 3, clipped: torch's norm (this rank's experts) and the helper's
            model_loss(ddp, model.moe, world, rank, 3).backward()
            expert_parallel.reduce_expert_gradients(model, mesh["dp"].get_group())
            torch_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # no clipping
            norm = expert_parallel.clip_grad_norm_(model, CLIP)
            got["clip"] = {"torch_norm": torch_norm, "norm": norm, "experts": got[name]["experts"],
                           "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    save(out, "composition", got)


def checkpoint(out, rank, world, pair):
    """Train 2 steps at P = 2 (two data-parallel replicas), dcp.save; dcp.load at P = 4 and in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.nn.parallel import DistributedDataParallel

    dps = [dist.new_group([r, r + 2]) for r in range(2)]  # the ranks that hold the same experts at P = 2
    model = Model(pair)
    expert_parallel.exclude_experts_from_ddp(model)
    ddp = DistributedDataParallel(model)
    _train(model, ddp, optimizer("AddSign", list(model.parameters())), world, rank, 2, dps[rank % 2])
    path = out / "dcp"
    dcp.save({"model": model.state_dict()}, checkpoint_id=path)
    got = {}
    for P, group in ((4, dist.group.WORLD), (1, None)):
        fresh = Model(group, seed=1)
        state = {"model": fresh.state_dict()}
        dcp.load(state, checkpoint_id=path)
        fresh.load_state_dict(state["model"])
        got[P] = {"params": {n: p.detach().clone() for n, p in fresh.named_parameters()},
                  "experts": list(fresh.moe.expert_range())}
    # a single-process state dict (every expert) loads into an expert-parallel layer: each rank keeps its own
    single = Model(None, seed=3)
    sharded = Model(dist.group.WORLD, seed=1)
    sharded.load_state_dict(single.state_dict())
    got["from_single"] = all(torch.equal(getattr(sharded.moe, n), getattr(single.moe, n)[rank:rank + 1])
                             for n in expert_parallel.EXPERT_PARAMETERS)
    save(out, "checkpoint", got)


def compiled(out, rank, world, pair):
    """On the pair of ranks 0 and 1 (the others wait): the capacity mode under torch.compile(fullgraph=True)
    (backend aot_eager) against the same layer in eager mode, forward and backward, the global RNG seeded alike;
    10 and 12 tokens (the same C = 2). And the check compiled calls make that the ranks' C agree (run eagerly
    here, with C = 2 and 3: every rank must raise)."""
    if rank >= 2:
        return

    def step(moe, call):
        x = torch.randn(10 + 2 * rank, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(rank)) * 2
        x.requires_grad_(True)
        torch.manual_seed(5 + rank)  # the routing samples (a torch.Generator does not compile)
        y = call(x)
        ((y * y.detach().sin()).sum() + 0.1 * moe.stats.balance_loss).backward()
        return {"out": y.detach(), "x_grad": x.grad, "dropped": moe.stats.dropped.detach(), "index": moe.stats.index,
                "grads": {n: p.grad.clone() for n, p in moe.named_parameters()}}

    eager, moe = layer("sparsemixer", 0.5, pair), layer("sparsemixer", 0.5, pair)
    fn = torch.compile(lambda x: moe(x), fullgraph=True, backend="aot_eager")
    got = {"eager": step(eager, eager), "compiled": step(moe, fn), "experts": list(moe.expert_range())}
    try:
        expert_parallel.same_over_group_compiled(2 + rank, pair, torch.device("cpu"))
        got["different_capacity"] = "accepted"
    except RuntimeError as err:
        got["different_capacity"] = str(err)
    got["same_capacity"] = expert_parallel.same_over_group_compiled(2, pair, torch.device("cpu"))
    save(out, "compiled", got)


def fsdp2(out, rank, world, pair):
    """FSDP2 over a (dp=2, ep=2) DeviceMesh: expert_parallel.fully_shard_experts, then fully_shard of the model
    (HSDP); AdamW, 3 steps; the parameters gathered over dp. And what is refused: a 1-D mesh, a state_dict."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "ep"))
    model = Model(mesh["ep"])
    got = {"one_d_mesh": _refused(lambda: expert_parallel.fully_shard_experts(model, mesh["dp"]))}
    expert_parallel.fully_shard_experts(model, mesh)
    fully_shard(model, mesh=mesh)
    got["expert_rows_held"] = model.moe.fc1_weight.to_local().shape[0]  # of the E = 4 experts
    opt = optimizer("AdamW", list(model.parameters()))
    for step in range(3):
        model_loss(model, model.moe, world, rank, step).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    got["params"] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    got["experts"] = list(model.moe.expert_range())
    got["state_dict"] = _refused(model.state_dict)
    save(out, "fsdp2", got)


SCENARIOS = {f.__name__: f for f in (equality, edges, refusals, composition, checkpoint, compiled, fsdp2,
                                     dead_rank)}


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    # (a longer timeout for the compiled scenario, whose compilation the ranks that wait for it must outlast)
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("EP_TIMEOUT", "60"))))
    rank, world = dist.get_rank(), dist.get_world_size()
    pairs = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]  # every rank creates every group
    for name in names:
        SCENARIOS[name](out, rank, world, pairs[rank // 2])
        dist.barrier()
        print(f"rank {rank}: {name} done", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
