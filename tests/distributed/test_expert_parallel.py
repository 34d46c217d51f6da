"""Expert parallelism on 2 and 4 gloo ranks (CPU) against one process.

The ranks run tests/distributed/expert_parallel_worker.py once, on 4 ranks (each with a timeout, so a hang
fails instead of blocking): expert parallelism over the 4 ranks and over the pairs of ranks. The reference
here is the single-process layer with every expert, built from the same seed, run on each rank's part of
the global batch with that rank's routing samples: each rank's outputs, input and router gradients and stats
must equal the reference's on its tokens (the same tokens dropped), and each expert's gradient the sum over
the ranks' losses of the reference gradients. The same launch runs the edge cases of ``EDGES`` on the pairs
(an empty rank, a rank receiving no token, eval, double backward, ...), refuses bad arguments (the same error on
every rank), trains DDP + expert parallelism on a 2-D mesh (and clips its gradient), saves and reloads
distributed checkpoints at another P, and kills a rank.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from expert_parallel_cases import (CASES, CLIP, EDGES, OPTIMIZERS, Model, edge_layer, layer,  # noqa: E402
                                   model_loss, optimizer, rank_batch, run, run_edge)
from reinmax import expert_parallel  # noqa: E402

from fairseq_helpers import free_port  # noqa: E402

WORKER = Path(__file__).resolve().parent / "expert_parallel_worker.py"
WORLD = 4
SCENARIOS = ["equality", "edges", "refusals", "composition", "checkpoint", "dead_rank"]
# the ranks are launched once per module (module fixtures): its tests stay on one worker under
# `pytest --dist loadgroup` (make test), else each worker that gets one of them launches them again
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("expert_parallel_launches"),
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")]


def launch(out: Path, world: int, scenarios, timeout: float = 120):
    env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), *scenarios], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"a rank hung (killed after {timeout} s)")
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return out


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ep"), WORLD, SCENARIOS)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"P{p}")
def ranks(request, launched):
    return request.param, launched


def load(out: Path, name: str, rank: int, world=None):
    got = torch.load(out / f"{name}-{rank}.pt", weights_only=False)
    return got if world is None else got[world]


@pytest.fixture(scope="module")
def references(ranks):
    world, _ = ranks
    refs = {}
    for router, capacity in CASES:
        per_rank = [run(layer(router, capacity), world, r) for r in range(world)]
        # one process, every rank's loss: each expert's gradient is the sum over the ranks
        total = {n: sum(ref["expert_grads"][n] for ref in per_rank) for n in per_rank[0]["expert_grads"]}
        refs[f"{router}-{capacity}"] = per_rank, total
    return refs


@pytest.mark.parametrize("case", [f"{r}-{c}" for r, c in CASES])
def test_each_rank_equals_the_single_process_layer(ranks, references, case):
    world, out = ranks
    per_rank, total = references[case]
    experts_per_rank = 4 // world
    for rank in range(world):
        got, want = load(out, "equality", rank, world)[case], per_rank[rank]
        assert got["experts"] == list(range(rank * experts_per_rank, (rank + 1) * experts_per_rank))
        assert torch.equal(got["index"], want["index"])  # the same routing samples
        for key in ("out", "x_grad", "router_grad", "balance_loss", "load", "dropped"):
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-12, msg=f"{case} rank {rank} {key}")
        local = slice(rank * experts_per_rank, (rank + 1) * experts_per_rank)
        for name, grad in got["expert_grads"].items():
            assert grad.shape[0] == experts_per_rank  # this rank holds E / P experts
            torch.testing.assert_close(grad, total[name][local], rtol=0, atol=1e-12, msg=f"{case} {name}")


def test_the_capacity_cases_drop_tokens(ranks, references):
    """The capacity cases are meaningful: tokens are dropped on some rank, and a dropped token's output is 0."""
    world, out = ranks
    for router, capacity in CASES:
        if capacity is None:
            continue
        runs = [load(out, "equality", r, world)[f"{router}-{capacity}"] for r in range(world)]
        assert max(float(g["dropped"]) for g in runs) > 0, router
        for g in runs:
            zero_rows = (g["out"] == 0).all(1).double().mean()
            torch.testing.assert_close(zero_rows, g["dropped"].double(), rtol=0, atol=1e-12)


def test_switch_without_capacity_equals_one_call_on_the_global_batch(ranks):
    """switch routes deterministically: the ranks' outputs are one single-process call on the concatenated batch."""
    world, out = ranks
    whole = torch.cat([rank_batch(world, r)[0] for r in range(world)])
    want = layer("switch", None)(whole).detach()
    got = torch.cat([load(out, "equality", r, world)["switch-None"]["out"] for r in range(world)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _close(got, want, tol, msg):
    if want is None:
        assert got is None or not got.abs().max() > 0, msg  # no gradient, or an exactly zero one
    else:
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=msg)


@pytest.mark.parametrize("case", list(EDGES))
def test_edge_cases_at_two_ranks_equal_the_single_process_layer(launched, case):
    """Each pair of ranks ran the edge case (the two pairs must agree, and each rank equal one process on its
    tokens): an empty rank, all tokens on one expert with an input needing no gradient (a rank then receives no
    token and must still run the backward exchange), capacities 1e-9 and 1e308, eval + no_grad, a non-contiguous
    3-D input, a double backward (the exchange's backward is differentiable), bfloat16."""
    spec = EDGES[case]
    # bfloat16: an expert's gradient is one matmul over both ranks' slots here, a sum of two rounded ones there
    atol = 1.6e-2 if spec.get("dtype") == torch.bfloat16 else 1e-12
    wants = [run_edge(edge_layer(spec), r, spec) for r in range(2)]
    for rank in range(WORLD):
        got, want = load(launched, "edges", rank)[case], wants[rank % 2]
        assert torch.equal(got["index"], want["index"]), (case, rank)
        for key in ("out", "dropped", "x_grad", "router_grad"):
            if key in want:
                _close(got[key], want[key], atol, f"{case} rank {rank} {key}")
        if "expert_grads" not in want:
            continue
        local = slice(2 * (rank % 2), 2 * (rank % 2) + 2)  # 2 of the 4 experts
        for name, grad in got["expert_grads"].items():
            parts = [w["expert_grads"][name] for w in wants if w["expert_grads"][name] is not None]
            _close(grad, sum(parts)[local] if parts else None, atol, f"{case} rank {rank} {name}")
    if spec.get("sizes", (1,))[0] == 0:
        assert load(launched, "edges", 0)[case]["out"].shape == (0, 6)
    if spec.get("skew"):  # the case is what it claims: rank 1's experts received no token
        assert all((w["index"] == 0).all() for w in wants)
        assert load(launched, "edges", 1)[case]["expert_grads"]["fc1_weight"].abs().max() == 0


def test_bad_arguments_are_refused_the_same_on_every_rank(launched):
    world, out = WORLD, launched
    got = [load(out, "refusals", r) for r in range(world)]
    for key in ("router", "capacity", "bad_tau_on_one_rank", "not_dividing", "reinmax", "mesh_2d"):
        assert len({g[key] for g in got}) == 1, (key, [g[key] for g in got])  # the same error on every rank
        assert got[0][key].startswith(("ValueError", "TypeError")), got[0][key]
    assert "router must be the same on every rank" in got[0]["router"] and "'switch'" in got[0]["router"]
    assert "capacity_factor must be the same" in got[0]["capacity"]
    assert f"rank {world - 1}" in got[0]["bad_tau_on_one_rank"] and "tau" in got[0]["bad_tau_on_one_rank"]
    assert "expert_parallel_group" in got[0]["not_dividing"] and f"num_experts={world + 1}" in got[0]["not_dividing"]
    assert "reinmax" in got[0]["reinmax"] and "expert_parallel_group" in got[0]["reinmax"]
    assert "1-D DeviceMesh" in got[0]["mesh_2d"]
    for capacity in (None, 1.0):  # a rank converted to float32: the same ValueError everywhere, no crash
        key = f"dtype_{capacity}"
        assert len({g[key] for g in got}) == 1, [g[key] for g in got]
        assert got[0][key].startswith("ValueError: x must have the same dtype on every rank"), got[0][key]
        assert "torch.float32" in got[0][key] and "torch.float64" in got[0][key]
    for g in got[1:]:
        assert g["not_member"].startswith("ValueError: expert_parallel_group must be a group this process "
                                          "belongs to"), g["not_member"]
    assert all(g["after"] for g in got)


def test_a_stalled_or_dead_rank_fails_the_others_naming_the_group(launched):
    got = load(launched, "dead_rank", 0)
    for what in ("stalled", "died"):
        assert got[what] is not None and got[what].startswith("ExpertParallelError"), got[what]
        assert "expert-parallel group of ranks [0, 1] (gloo)" in got[what]
        assert got[what + "_seconds"] < 30  # the group's 3 s timeout, not a hang
    assert "Timed out" in got["stalled"]


def reference_training(name: str, steps: int, world: int = WORLD):
    """One process, every expert: each step on the mean of the ranks' losses (what DDP + expert parallelism
    with reduce_expert_gradients computes)."""
    model = Model()
    opt = optimizer(name, list(model.parameters()))
    for step in range(steps):
        (sum(model_loss(model, model.moe, world, r, step) for r in range(world)) / world).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def assert_model_equal(got: dict, experts, model, atol=1e-10, grads=False):
    """Non-expert parameters whole; expert parameters: this rank's rows of the reference's (``grads``: of the
    reference's gradients)."""
    want = {n: p.grad if grads else p for n, p in model.named_parameters()}
    assert set(got) == set(want)
    for name, value in got.items():
        ref = want[name].detach()
        if name.split(".")[-1] in expert_parallel.EXPERT_PARAMETERS:
            ref = ref[experts[0]:experts[-1] + 1]
        torch.testing.assert_close(value, ref, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_ddp_and_expert_parallel_on_a_2d_mesh_train_like_one_process(launched, name):
    reference = reference_training(name, 3)
    for rank in range(WORLD):
        got = load(launched, "composition", rank)[name]
        assert got["experts"] == [2 * (rank % 2), 2 * (rank % 2) + 1]  # the "ep" dimension of the (2, 2) mesh
        assert sorted(got["ignored"]) == [f"moe.{p}" for p in sorted(expert_parallel.EXPERT_PARAMETERS)]
        assert_model_equal(got["params"], got["experts"], reference)


def test_clip_grad_norm_counts_the_experts_of_every_rank(launched):
    """expert_parallel.clip_grad_norm_ gives every rank the norm of the whole model's gradient (one process's,
    every expert) and clips like torch; torch.nn.utils.clip_grad_norm_ sees this rank's experts only."""
    model = reference_training("AdamW", 3)
    (sum(model_loss(model, model.moe, WORLD, r, 3) for r in range(WORLD)) / WORLD).backward()
    want = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    assert want > 2 * CLIP  # the clipping is active
    got = [load(launched, "composition", r)["clip"] for r in range(WORLD)]
    for g in got:
        torch.testing.assert_close(g["norm"], want, rtol=1e-10, atol=0)
        assert_model_equal(g["grads"], g["experts"], model, atol=1e-10, grads=True)
    # what the helper is for: torch's norm differs between the two ranks of an expert-parallel group
    assert abs(float(got[0]["torch_norm"]) - float(got[1]["torch_norm"])) > 1e-6


def test_a_checkpoint_saved_at_two_ranks_loads_at_four_and_in_one_process(launched):
    reference = reference_training("AddSign", 2)
    untrained = Model(seed=1)
    for rank in range(WORLD):
        got = load(launched, "checkpoint", rank)
        assert got[4]["experts"] == [rank] and got[1]["experts"] == list(range(4))
        assert_model_equal(got[4]["params"], got[4]["experts"], reference)
        assert_model_equal(got[1]["params"], got[1]["experts"], reference)
        assert got["from_single"]
    # the comparison would see a checkpoint that did not load
    assert (untrained.moe.fc1_weight - reference.moe.fc1_weight).abs().max() > 1e-2
