"""The stability guard on 2 gloo ranks under DDP and FSDP2: every rank takes the same decision from one
all-reduce per step, a skip equals the single-process run without that batch, and a rewind restores every rank
alike (FSDP2: each rank's shards of the parameters and the optimizer state). A global gradient norm handed to the
guard (``guard.step(loss, grad_norm=clip_grad_norm_(...))``, or ``observe_grad_norm`` as the trainer callbacks do)
takes the same decisions and gives the same parameters under DDP as the guard's own norm.

The ranks run this file as a script (``python test_guard_distributed.py OUT``); the reference trains the same
seeded model in this process on the ranks' chunks of each batch with their losses averaged."""

import datetime
import sys
from pathlib import Path

import pytest
import torch

WORLD = 2
STEPS = 24
BAD = 18  # rank 1's chunk of this batch is poisoned: only that rank's loss spikes
GUARD = dict(window=16, warmup=8, threshold=15.0, snapshot_every=5, rewind_skip=0, backoff=1.0)


def make_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def batches():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(8, 6, generator=g) for _ in range(STEPS)]
    xs[BAD][4:] *= 1e3  # rank 1's half
    return [(x, x.sum(1, keepdim=True)) for x in xs]


def loss_fn(model, x, y):
    return (model(x) - y).pow(2).mean()


def worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from stability_toolbox import GuardPolicy, StabilityGuard

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # a lost peer fails, not hangs
    rank = dist.get_rank()
    reductions = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*a, **k):
        reductions.append(1)
        return real_all_reduce(*a, **k)

    dist.all_reduce = counting_all_reduce
    results = {}
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rewind = GuardPolicy(actions={"loss_spike": "rewind", "grad_norm_spike": "rewind"})
    for scenario, policy in (("skip", GuardPolicy()), ("rewind", rewind), ("fsdp2_rewind", rewind),
                             ("skip_given", GuardPolicy()), ("rewind_given", rewind), ("skip_observed", GuardPolicy())):
        if scenario.startswith("fsdp2"):  # parameters and optimizer state sharded (DTensors): the snapshot holds
            model = fully_shard(make_model(), mesh=init_device_mesh("cpu", (WORLD,)))  # each rank's shards
        else:
            model = DDP(make_model())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        guard = StabilityGuard(model, opt, policy=policy, **{**GUARD, "rewind_skip": 1})
        data = batches()
        reductions.clear()
        steps = 0
        for i, (x, y) in guard.batches(data):
            chunk = slice(4 * rank, 4 * rank + 4)
            loss = loss_fn(model, x[chunk], y[chunk])
            loss.backward()
            if scenario.endswith(("_given", "_observed")):
                # DDP averaged the gradients: every rank's clip_grad_norm_ is the same global norm (nothing clipped)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
                if scenario.endswith("_given"):
                    guard.step(loss, grad_norm=norm)
                else:
                    guard.observe_grad_norm(norm)
                    guard.step(loss)
            else:
                guard.step(loss)
            opt.zero_grad()
            steps += 1
        inner = getattr(model, "module", model)
        results[scenario] = {"events": [(e["update"], e["action"], e["signals"]) for e in guard.events],
                             "params": {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
                                        for k, v in inner.state_dict().items()},
                             "reductions_per_step": len(reductions) / steps}
        guard.detach()
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every scenario of `worker` on 2 gloo ranks (launched once for the module's tests): each rank's results."""
    from fairseq_helpers import run_script_ranks

    tmp_path = tmp_path_factory.mktemp("guard_ranks")
    codes, logs = run_script_ranks(__file__, [tmp_path], WORLD)
    if None in codes:
        pytest.fail("a rank hung (killed after 120 s)")
    assert codes == [0] * WORLD, "\n".join(log[-3000:] for log in logs)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.xdist_group("guard_launch")  # one module launch of the ranks: its tests on one worker (--dist loadgroup)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_ddp_ranks_decide_alike(ranks):
    r0, r1 = ranks
    for scenario in ("skip", "rewind", "fsdp2_rewind"):
        assert r0[scenario]["events"] == r1[scenario]["events"], scenario
        if not scenario.startswith("fsdp2"):  # (FSDP2 makes its own collectives)
            assert r0[scenario]["reductions_per_step"] == 1.0
        for k, v in r0[scenario]["params"].items():
            assert torch.equal(v, r1[scenario]["params"][k]), (scenario, k)
    assert [e[:2] for e in r0["skip"]["events"]] == [(BAD, "skip")]
    assert [e[:2] for e in r0["rewind"]["events"]] == [(BAD, "rewind")]
    # FSDP2: the same decisions, and the rewind restored every rank's shards to what DDP's replicas hold
    assert [e[:2] for e in r0["fsdp2_rewind"]["events"]] == [(BAD, "rewind")]
    for k, v in r0["rewind"]["params"].items():
        torch.testing.assert_close(r0["fsdp2_rewind"]["params"][k], v, rtol=1e-5, atol=1e-6)
    # the skip = data parallelism without that batch, in one process
    ref = make_model()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for i, (x, y) in enumerate(batches()):
        if i == BAD:
            continue
        sum(loss_fn(ref, x[4 * r:4 * r + 4], y[4 * r:4 * r + 4]) for r in range(WORLD)).div(WORLD).backward()
        opt.step()
        opt.zero_grad()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(r0["skip"]["params"][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.xdist_group("guard_launch")  # one module launch of the ranks: its tests on one worker (--dist loadgroup)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("given, own", [("skip_given", "skip"), ("rewind_given", "rewind"),
                                        ("skip_observed", "skip")])
def test_ddp_given_norm_decides_as_the_guards_own(ranks, given, own):
    """Under DDP a norm handed over (step's grad_norm=, or observe_grad_norm) is the same global norm on every rank:
    one all-reduce per step still, the same events on both ranks as the guard computing the norm itself, and the
    same parameters bit for bit."""
    r0, r1 = ranks
    assert r0[given]["events"] == r1[given]["events"] == r0[own]["events"] and r0[own]["events"]
    assert r0[given]["reductions_per_step"] == r1[given]["reductions_per_step"] == 1.0
    for k, v in r0[own]["params"].items():
        assert torch.equal(r0[given]["params"][k], v) and torch.equal(r1[given]["params"][k], v), (given, k)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
