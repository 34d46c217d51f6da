"""Expert parallelism misused, on 4 gloo ranks: one launch of tests/distributed/expert_parallel_adversarial_worker.py
(each rank with a timeout: a hang fails instead of blocking), every misuse recorded on every rank.

* ``fsdp_misuse``: `fully_shard_experts` on a model without an expert-parallel layer, with a mesh of other names,
  on a layer of another group, after ``fully_shard(model)``, twice: a ValueError naming the argument on every rank,
  nothing sharded; ``state_dict`` and ``load_state_dict`` of the sharded model refused by name, the model unchanged
  and still training; ``reduce_expert_gradients`` / ``gather_experts`` (the DDP path) refused by name.
* ``fsdp_clip``: `expert_parallel.clip_grad_norm_` on its DTensor gradients equals one process's clipping.
* ``eager_misuse``: frozen experts train the router; a state dict whose experts are DTensors over another group of
  the same size (``mesh["dp"]`` for a layer on ``mesh["ep"]``) loads each rank's own experts (not the rows it holds
  of the other group's sharding).
* ``compiled_misuse``: the compiled capacity mode with different token counts, then different dtypes, on the two
  ranks of a pair: the same RuntimeError on both (before the exchange, which gloo aborts the process on), and the
  group still works.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fairseq_helpers import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from expert_parallel_cases import CLIP, Model, model_loss  # noqa: E402
from test_expert_parallel import assert_model_equal  # noqa: E402

WORKER = Path(__file__).resolve().parent / "expert_parallel_adversarial_worker.py"
WORLD = 4
# the ranks are launched once per module (module fixtures): its tests stay on one worker under
# `pytest --dist loadgroup` (make test), else each worker that gets one of them launches them again
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("expert_parallel_adversarial_launch"),
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_adversarial")
    env = dict(os.environ, WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", EP_TIMEOUT="120")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), "fsdp_misuse", "fsdp_clip",
                               "eager_misuse", "compiled_misuse"], env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a rank hung (killed after 240 s)")
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return out


def load(out: Path, name: str, rank: int) -> dict:
    return torch.load(out / f"{name}-{rank}.pt", weights_only=False)


@pytest.mark.parametrize("rank", range(WORLD))
def test_fully_shard_experts_refuses_what_it_cannot_shard_by_name(launched, rank):
    got = load(launched, "fsdp_misuse", rank)
    none = "ValueError: model must hold a RoutedFeedForward built with expert_parallel_group=mesh['ep']"
    assert got["no_routed_layer"].startswith(none + " for fully_shard_experts, got 0"), got["no_routed_layer"]
    assert got["no_group"].startswith(none + " for fully_shard_experts, got 1"), got["no_group"]
    assert got["no_group_untouched"]
    assert got["names"].startswith("ValueError: mesh must be a 2-D DeviceMesh with dimensions named 'dp'")
    assert got["wrong_group"].startswith("ValueError: mesh['ep'] must be each expert-parallel layer's group")
    already = "ValueError: model must not be sharded by fully_shard before fully_shard_experts, got "
    assert got["after_fully_shard"].startswith(already + "'the model' already sharded"), got["after_fully_shard"]
    assert got["twice"].startswith(already + "'moe' already sharded"), got["twice"]
    assert got["sibling_first"] == "accepted"
    assert got["twice_rows"] == 1  # the refused second call changed nothing: fully_shard(model) then works


@pytest.mark.parametrize("rank", range(WORLD))
def test_the_state_dict_of_fully_shard_experts_is_refused_both_ways_and_training_goes_on(launched, rank):
    got = load(launched, "fsdp_misuse", rank)
    assert got["state_dict"].startswith("ValueError: state_dict of an expert-parallel RoutedFeedForward (moe.)")
    assert got["load_single"].startswith("ValueError: load_state_dict of an expert-parallel RoutedFeedForward "
                                         "(moe.) whose experts are sharded by fully_shard"), got["load_single"]
    assert got["load_unchanged"] and got["trains_after"]
    fsdp = "takes a model whose experts are plain tensors (DDP + expert parallelism), got experts sharded by fully_shard"
    assert got["reduce"].startswith(f"ValueError: reduce_expert_gradients {fsdp}"), got["reduce"]
    assert got["reduce_unchanged"]
    assert got["gather"].startswith(f"ValueError: gather_experts {fsdp}"), got["gather"]


@pytest.mark.parametrize("rank", range(WORLD))
def test_eager_frozen_experts_and_a_dtensor_state_over_another_group(launched, rank):
    got = load(launched, "eager_misuse", rank)
    assert got["frozen"] == "accepted" and got["frozen_router_grad"]
    assert got["other_mesh"] == "accepted"
    assert got["other_mesh_rows"]  # this rank's experts of the single-process layer, whatever the DTensor's group


@pytest.mark.parametrize("rank", range(2))
def test_compiled_mismatches_fail_alike_on_every_rank_before_the_exchange(launched, rank):
    got = load(launched, "compiled_misuse", rank)
    assert got["different_tokens"].startswith("RuntimeError: under torch.compile every rank of the expert-parallel "
                                              "group must give the layer the same number of tokens")
    assert got["dtypes"].startswith("RuntimeError: x must have the same dtype on every rank of the "
                                    "expert-parallel group"), got["dtypes"]
    assert got["after"] == "accepted"


def test_clip_grad_norm_under_fully_shard_experts_equals_one_process(launched):
    """DTensor gradients (FSDP2 over the experts' replicas and HSDP elsewhere): the norm of the mean loss's gradient
    with every expert counted, on every rank, and the gradients clipped like torch.nn.utils.clip_grad_norm_."""
    model = Model()
    (sum(model_loss(model, model.moe, WORLD, r, 0) for r in range(WORLD)) / WORLD).backward()
    want = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    assert want > 2 * CLIP  # the clipping is active
    for rank in range(WORLD):
        got = load(launched, "fsdp_clip", rank)
        assert not isinstance(got["norm"], str), got["norm"]
        torch.testing.assert_close(got["norm"], want, rtol=1e-10, atol=0)
        assert_model_equal(got["grads"], got["experts"], model, atol=1e-10, grads=True)
