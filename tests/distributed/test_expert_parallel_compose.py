"""Expert parallelism composed with torch.compile and FSDP2, on 4 gloo ranks (one launch of
tests/distributed/expert_parallel_worker.py, each rank with a timeout: a hang fails instead of blocking).

* ``compiled``: on ranks 0 and 1 (P = 2), the capacity mode under ``torch.compile(fullgraph=True)`` (the exchange
  is torch's traceable functional ``all_to_all_single``) equals the same layer in eager mode: outputs, dropped
  tokens, input, router and expert gradients; ranks whose capacities differ fail alike (the check compiled calls
  make, run eagerly here).
* ``fsdp2``: ``expert_parallel.fully_shard_experts`` + ``fully_shard`` on a (dp=2, ep=2) mesh trains with AdamW
  like one process holding every expert, stepping on the mean of the 4 ranks' losses.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_expert_parallel import WORLD, assert_model_equal, launch, load, reference_training  # noqa: E402

# the ranks are launched once per module (module fixtures): its tests stay on one worker under
# `pytest --dist loadgroup` (make test), else each worker that gets one of them launches them again
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("expert_parallel_compose_launch"),
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("EP_TIMEOUT", "300")  # the waiting ranks outlast the compilation
    return launch(tmp_path_factory.mktemp("ep_compose"), WORLD, ["fsdp2", "compiled"], timeout=300)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_compiled_capacity_mode_equals_eager_at_two_ranks(launched):
    for rank in range(2):
        got = load(launched, "compiled", rank)
        eager, compiled = got["eager"], got["compiled"]
        assert got["experts"] == [2 * rank, 2 * rank + 1]
        assert torch.equal(eager["index"], compiled["index"])  # the same routing samples
        assert float(eager["dropped"]) > 0  # the capacity drops tokens: the dropped ones must match too
        for key in ("out", "x_grad", "dropped"):
            torch.testing.assert_close(compiled[key], eager[key], rtol=0, atol=1e-12, msg=f"rank {rank} {key}")
        assert set(compiled["grads"]) == set(eager["grads"])
        assert "every rank of the expert-parallel group must give the layer the same number of tokens" in \
            got["different_capacity"]
        assert got["same_capacity"] == 2
        for name, grad in eager["grads"].items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(compiled["grads"][name], grad, rtol=0, atol=1e-12, msg=f"rank {rank} {name}")


def test_fsdp2_over_a_dp_ep_mesh_trains_like_one_process(launched):
    reference = reference_training("AdamW", 3)
    for rank in range(WORLD):
        got = load(launched, "fsdp2", rank)
        assert got["experts"] == [2 * (rank % 2), 2 * (rank % 2) + 1]  # the "ep" dimension of the (2, 2) mesh
        assert got["expert_rows_held"] == 1  # 2 experts per ep rank, sharded over the 2 dp replicas
        assert_model_equal(got["params"], got["experts"], reference)
        assert got["one_d_mesh"].startswith("ValueError: mesh must be a 2-D DeviceMesh"), got["one_d_mesh"]
        assert got["state_dict"].startswith("ValueError: state_dict of an expert-parallel"), got["state_dict"]
