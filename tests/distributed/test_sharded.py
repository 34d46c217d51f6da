"""Sharded training on 2 gloo ranks (CPU): FSDP2 and tensor-parallel DTensors, distributed checkpoints,
ZeroRedundancyOptimizer, Admin/DeepNorm/converted models and the MoE layer, each against one process.

The ranks run tests/distributed/sharded_worker.py once for the module (each rank with a timeout, so a
hang fails instead of blocking); the references here train the same seeded models in this process,
each step on the ranks' chunks of the batch with their losses averaged (what data parallelism computes).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import admin_torch
from reinmax import RoutedFeedForward
from sign_optim import AddSign, CosineInternalDecay, PowerSign, fused

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sharded_models import BATCH, STEPS, admin_batches, encoder_stack, moe_batches, sign_model  # noqa: E402

from fairseq_helpers import free_port  # noqa: E402

WORLD = 2
WORKER = Path(__file__).resolve().parent / "sharded_worker.py"
SCENARIOS = ["fsdp2_sign", "dcp_resume", "tensor_parallel", "zero", "admin_fsdp2", "moe_fsdp2"]
# the ranks are launched once per module (module fixtures): its tests stay on one worker under
# `pytest --dist loadgroup` (make test), else each worker that gets one of them launches them again
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sharded_launch"),
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    env = dict(os.environ, WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), *SCENARIOS], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a rank hung (killed after 300 s)")
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return out


def load(out, name):
    return torch.load(out / f"{name}.pt", weights_only=False)


def reference(model, opt, batches, loss_fn, world=WORLD):
    """Data-parallel training emulated in one process: each step averages the loss over the ranks' chunks."""
    for x in batches:
        sum(loss_fn(model, chunk) for chunk in x.chunk(world)).div(world).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def square(m, x):
    return m(x).pow(2).mean()


def assert_params_close(got, model, atol=1e-6):
    want = [p.detach() for p in model.parameters()]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("path", ["default", "fused", "foreach"])
@pytest.mark.parametrize("rule", ["AddSign", "PowerSign"])
def test_sign_optimizers_on_fsdp2_shards_equal_one_process(ranks, rule, path):
    got = load(ranks, f"{rule}-{path}")
    model = sign_model(seed=0)
    opt = {"AddSign": AddSign, "PowerSign": PowerSign}[rule](model.parameters(), lr=1e-2, foreach=True,
                                                             sign_internal_decay=CosineInternalDecay(10))
    reference(model, opt, admin_batches(), square)
    assert_params_close(got["params"], model)
    for a, p in zip(got["avgs"], model.parameters()):
        torch.testing.assert_close(a, opt.state[p]["exp_avg"], rtol=0, atol=1e-6)
    if path != "foreach" and fused.available(torch.device("cpu")):
        assert got["fused_buckets"] and all(got["fused_buckets"])  # the fused operator ran on local shards only
    total = sum(p.numel() * 4 for p in model.parameters())
    assert got["state_bytes_per_rank"] <= total // WORLD + 64  # one tensor per parameter, sharded


@pytest.mark.parametrize("rule", ["AddSign", "PowerSign"])
def test_single_process_state_into_fsdp2_shards_is_refused_naming_the_fix(ranks, rule):
    """load_state_dict of a plain (unsharded) state into DTensor parameters would make every later step fail
    ("mixed torch.Tensor and DTensor"): it is refused before anything changes, naming set_optimizer_state_dict."""
    got = load(ranks, f"{rule}-single-process-state")
    assert "set_optimizer_state_dict" in got["refused"] and "DTensor" in got["refused"]
    assert got["unchanged"]


def test_distributed_checkpoint_resume_equals_the_unbroken_run(ranks):
    got = load(ranks, "dcp_resume")
    err = max(float((a - b).abs().max()) for a, b in zip(got["resumed"], got["unbroken"]))
    lost = max(float((a - b).abs().max()) for a, b in zip(got["optimizer_state_lost"], got["unbroken"]))
    assert err <= 1e-6, err
    assert lost > 1e-4, lost  # the tolerance would catch a lost moving average or a reset decay


def test_tensor_parallel_dtensors_equal_one_process(ranks):
    got = load(ranks, "tensor_parallel")
    model = sign_model(seed=0)
    opt = AddSign(model.parameters(), lr=1e-2, sign_internal_decay=CosineInternalDecay(10), foreach=True)
    reference(model, opt, admin_batches(), square, world=1)  # every rank sees the whole batch
    assert_params_close(got["params"], model)
    if fused.available(torch.device("cpu")):
        assert any(got["fused_buckets"])


def test_zero_redundancy_optimizer_with_a_decay_saves_weights_only(ranks):
    got = load(ranks, "zero")  # rank 0 loaded the consolidated state dict with weights_only=True
    assert got["decay"] == CosineInternalDecay(10)
    assert got["steps"] == [float(STEPS)] * len(got["steps"]) and len(got["steps"]) == 4
    model = sign_model(seed=0)
    opt = AddSign(model.parameters(), lr=1e-2, sign_internal_decay=CosineInternalDecay(10))
    reference(model, opt, admin_batches(), square)
    assert_params_close(got["params"], model)


@pytest.mark.parametrize("kind", ["admin", "deepnorm"])
def test_admin_and_deepnorm_stacks_under_fsdp2(ranks, kind):
    model = admin_torch.make_stack(kind, depth=3, dim=8, seed=0)
    opt = AddSign(model.parameters(), lr=1e-2)
    reference(model, opt, admin_batches(shape=(BATCH, 5, 8)), square)
    assert_params_close(load(ranks, f"stack-{kind}"), model)


def test_profile_omegas_on_a_sharded_model_averages_the_ranks(ranks):
    got = load(ranks, "profile")
    batch = admin_batches(shape=(BATCH, 5, 8))[0]
    singles = []
    for chunk in batch.chunk(WORLD):
        model = admin_torch.make_stack("admin", depth=3, dim=8, seed=0)
        singles.append(admin_torch.profile_omegas(model, lambda: model(chunk)))
    assert list(got) == list(singles[0])
    for name in got:
        assert got[name] == pytest.approx(sum(s[name] for s in singles) / WORLD, rel=1e-6)


def test_converted_then_sharded_trains_like_one_process_and_folds(ranks):
    state = load(ranks, "converted")  # the full state dict gathered from the FSDP2 shards
    model = admin_torch.convert(encoder_stack(seed=0))
    opt = AddSign(model.parameters(), lr=1e-2)
    reference(model, opt, admin_batches(shape=(BATCH, 5, 16)), square)
    own = model.state_dict()
    assert set(state) == set(own) and any("omega" in k for k in own)
    for k in own:
        torch.testing.assert_close(state[k], own[k], rtol=0, atol=1e-6)
    trained = admin_torch.convert(encoder_stack(seed=1))
    trained.load_state_dict(state)
    folded = admin_torch.fold(trained, embedding=trained.proj)
    x = torch.randn(3, 5, 16)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    with torch.no_grad():
        torch.testing.assert_close(folded(x, src_key_padding_mask=mask), trained(x, src_key_padding_mask=mask),
                                   rtol=0, atol=1e-5)


def test_moe_layer_with_sharded_experts_equals_one_process(ranks):
    got = load(ranks, "moe")
    torch.manual_seed(0)
    moe = RoutedFeedForward(8, 16, num_experts=4, router="switch", capacity_factor=2.0)
    opt = AddSign(moe.parameters(), lr=1e-2)
    reference(moe, opt, moe_batches(), lambda m, x: m(x).pow(2).mean() + 0.01 * m.stats.balance_loss)
    for name, p in moe.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=0, atol=1e-6)
