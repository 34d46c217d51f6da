"""One rank of the adversarial expert-parallel checks (tests/distributed/test_expert_parallel_adversarial.py runs it
once on 4 gloo ranks). Each scenario records what each misuse gave (``"accepted"`` or ``"<ErrorType>: <message>"``)
under ``OUT/<scenario>-<rank>.pt``. Usage (one process per rank, env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):

    python tests/distributed/expert_parallel_adversarial_worker.py OUT SCENARIO [SCENARIO ...]
"""

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from expert_parallel_cases import CLIP, D, H, Model, layer, model_loss  # noqa: E402
from reinmax import RoutedFeedForward, expert_parallel  # noqa: E402


def save(out: Path, name: str, obj) -> None:
    torch.save(obj, out / f"{name}-{dist.get_rank()}.pt")


def outcome(call) -> str:
    """``"accepted"``, or the type and message of what ``call()`` raised."""
    try:
        call()
    except Exception as err:  # what the test checks: the type and the message
        return f"{type(err).__name__}: {err}"
    return "accepted"


def _is_fsdp(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def fsdp_misuse(out, rank, world, pair):
    """fully_shard_experts on what it cannot shard, twice, after fully_shard; the state dict and load refusals; and
    the model still trains after every refusal (same on every rank of the (dp=2, ep=2) mesh)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "ep"))
    got = {}
    got["no_routed_layer"] = outcome(lambda: expert_parallel.fully_shard_experts(torch.nn.Linear(3, 3), mesh))
    plain = Model(None)
    got["no_group"] = outcome(lambda: expert_parallel.fully_shard_experts(plain, mesh))
    got["no_group_untouched"] = not any(_is_fsdp(m) for m in plain.modules())
    got["names"] = outcome(lambda: expert_parallel.fully_shard_experts(
        Model(mesh["ep"]), init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("a", "b"))))
    got["wrong_group"] = outcome(lambda: expert_parallel.fully_shard_experts(Model(dist.group.WORLD), mesh))
    # fully_shard(model) first (which wraps the experts over the 2-D mesh: wrong), then fully_shard_experts
    first = Model(mesh["ep"])
    fully_shard(first, mesh=mesh)
    got["after_fully_shard"] = outcome(lambda: expert_parallel.fully_shard_experts(first, mesh))
    sibling = Model(mesh["ep"])  # a module beside the layers sharded first: fine
    fully_shard(sibling.proj, mesh=mesh)
    got["sibling_first"] = outcome(lambda: expert_parallel.fully_shard_experts(sibling, mesh))
    twice = Model(mesh["ep"])
    expert_parallel.fully_shard_experts(twice, mesh)
    got["twice"] = outcome(lambda: expert_parallel.fully_shard_experts(twice, mesh))
    fully_shard(twice, mesh=mesh)
    got["twice_rows"] = twice.moe.fc1_weight.to_local().shape[0]
    # the state dict and its loading are refused by name; the model still trains afterwards
    got["state_dict"] = outcome(twice.state_dict)
    single = Model(None, seed=3).state_dict()
    before = {n: p.full_tensor().clone() for n, p in twice.named_parameters()}
    got["load_single"] = outcome(lambda: twice.load_state_dict(single))
    got["load_unchanged"] = all(torch.equal(before[n], p.full_tensor()) for n, p in twice.named_parameters())
    loss = model_loss(twice, twice.moe, world, rank, 0)
    loss.backward()
    got["trains_after"] = bool(torch.isfinite(loss)) and twice.moe.fc1_weight.grad is not None
    # the DDP-path helpers: FSDP2 already reduced the experts' gradients (a second division would shrink them)
    grad = twice.moe.fc1_weight.grad.to_local().clone()
    got["reduce"] = outcome(lambda: expert_parallel.reduce_expert_gradients(twice))
    got["reduce_unchanged"] = torch.equal(grad, twice.moe.fc1_weight.grad.to_local())
    got["gather"] = outcome(lambda: expert_parallel.gather_experts(twice))
    save(out, "fsdp_misuse", got)


def fsdp_clip(out, rank, world, pair):
    """expert_parallel.clip_grad_norm_ on the (dp=2, ep=2) model of fully_shard_experts (DTensor gradients): the
    norm of the mean loss's gradient, every expert counted, the same on every rank, and the clipped gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "ep"))
    model = Model(mesh["ep"])
    expert_parallel.fully_shard_experts(model, mesh)
    fully_shard(model, mesh=mesh)
    model_loss(model, model.moe, world, rank, 0).backward()
    got = {"experts": list(model.moe.expert_range())}
    try:
        got["norm"] = expert_parallel.clip_grad_norm_(model, CLIP)
        got["grads"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    except Exception as err:  # what the test checks: the type and the message
        got["norm"] = f"{type(err).__name__}: {err}"
    save(out, "fsdp_clip", got)


def _step(moe, call, n, seed):
    x = torch.randn(n, D, dtype=moe.fc1_weight.dtype, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    torch.manual_seed(seed)
    y = call(x)
    y.pow(2).sum().backward()
    return y.detach(), x.grad


def compiled_misuse(out, rank, world, pair):
    """On ranks 0 and 1 (the others wait): the compiled capacity mode (fullgraph, aot_eager) with different token
    counts on the two ranks, then with different dtypes (the layer converted on rank 0 only): each must fail alike
    on both ranks before the exchange (gloo aborts the process on an exchange of mismatched sizes); the group
    still works afterwards."""
    if rank >= 2:
        return
    moe = layer("switch", 0.5, pair)
    fn = torch.compile(lambda x: moe(x), fullgraph=True, backend="aot_eager", dynamic=False)

    def forward(n):  # the checks run in the forward: no backward graph to compile
        with torch.no_grad():
            fn(torch.randn(n, D, dtype=moe.fc1_weight.dtype))

    got = {"different_tokens": outcome(lambda: forward(8 if rank == 0 else 24))}  # C = 1 and 3
    if rank == 0:
        moe.float()
    got["dtypes"] = outcome(lambda: forward(8))
    eager = layer("switch", 0.5, pair)
    got["after"] = outcome(lambda: _step(eager, eager, 6 + rank, 5))
    save(out, "compiled_misuse", got)


def eager_misuse(out, rank, world, pair):
    """Eager P = 2 (each pair): frozen experts, a forward under no_grad then a backward elsewhere, and a state dict
    whose experts are DTensors sharded over another group of the same size (mesh["dp"] for a layer on mesh["ep"])."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    me = pair.rank()
    got = {}
    frozen = layer("switch", 0.5, pair)
    for name in expert_parallel.EXPERT_PARAMETERS:
        getattr(frozen, name).requires_grad_(False)
    got["frozen"] = outcome(lambda: _step(frozen, frozen, 6 + 2 * me, 7))
    got["frozen_router_grad"] = frozen.router.weight.grad is not None
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "ep"))
    target = layer("switch", None, mesh["ep"])
    torch.manual_seed(9)
    single = RoutedFeedForward(D, H, 4, router="switch").double()
    state = {k: DTensor.from_local(v.chunk(2)[mesh["dp"].get_local_rank()].clone(), mesh["dp"], [Shard(0)])
             if k.startswith("fc") else v for k, v in single.state_dict().items()}
    got["other_mesh"] = outcome(lambda: target.load_state_dict(state))
    got["other_mesh_rows"] = torch.equal(target.fc1_weight, single.fc1_weight[list(target.expert_range())])
    save(out, "eager_misuse", got)


SCENARIOS = {f.__name__: f for f in (fsdp_misuse, fsdp_clip, eager_misuse, compiled_misuse)}


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
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
