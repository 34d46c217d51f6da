"""A converted HuggingFace model under transformers.Trainer on two processes (DDP, gloo, CPU) with
sign_optim.AddSign + CosineInternalDecay: Trainer checkpoints, resume equal to the unbroken run, fold at
the end. The ranks run tests/admin_torch/hf_trainer_worker.py."""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

WORKER = os.path.join(os.path.dirname(__file__), "hf_trainer_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RANK_TIMEOUT_S = 150  # a hung rank (a collective waiting for its peer) fails the test


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args, world_size=2):
    """Start ``world_size`` ranks of the worker; fail (after killing the others) if any fails or hangs."""
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                   OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                   CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, WORKER, *args], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs, failed = [], []
    try:
        for rank, p in enumerate(procs):
            try:
                out, _ = p.communicate(timeout=RANK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
                failed.append(f"rank {rank} hung (> {RANK_TIMEOUT_S} s)")
            outputs.append(out)
            if p.returncode:
                failed.append(f"rank {rank} exited with {p.returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    if failed:
        pytest.fail("; ".join(failed) + "\n" + "\n".join(f"--- rank {r}\n{o[-4000:]}" for r, o in enumerate(outputs)))


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_trainer_ddp_resume_with_sign_optimizer_equals_unbroken_run_and_folds(tmp_path):
    _launch("full", str(tmp_path))
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "model.safetensors").is_file()
    # the Trainer checkpoint holds the sign optimizer's state; it loads with weights_only=True as Trainer does
    state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    assert state["sign_internal_decay"] == {"kind": "cosine", "T_max": 6, "num_periods": 0.5, "zero_after": None}
    assert all(float(s["step"]) == 3 for s in state["state"].values())
    resume_from = tmp_path / "ckpt3"
    shutil.copytree(ckpt, resume_from)  # the unbroken run's later checkpoint is not around
    _launch("resume", str(tmp_path), str(resume_from))

    full = torch.load(tmp_path / "full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    lost = torch.load(tmp_path / "lost.pt", weights_only=True)
    assert full["opt_steps"] == resumed["opt_steps"] == [6.0]
    assert full["world_size"] == resumed["world_size"] == 2 and full["ddp"]
    assert any("admin_omegas" in k for k in full["params"])  # the Admin form was resumed (trainable omegas)
    err = _max_diff(resumed["params"], full["params"])
    lost_err = _max_diff(lost["params"], full["params"])
    print(f"resume error {err:.3g}, with the moving averages lost {lost_err:.3g}")
    tol = 1e-6
    assert err <= tol, err
    assert lost_err > 100 * tol, lost_err  # the tolerance would catch a lost moving average
    for r in (full, resumed):
        assert not r["folded_has_omegas"] and r["fold_err"] <= 1e-5, r["fold_err"]


@pytest.mark.slow
def test_accelerate_loop_resume_equals_unbroken_run_and_folds(tmp_path):
    """The same training as a plain accelerate loop on two processes: accelerator.save_state after 3 steps,
    a fresh converted model + optimizer resumed with load_state ends where the unbroken run ended."""
    _launch("accelerate", str(tmp_path))
    state = tmp_path / "accelerate_state"
    assert state.is_dir()
    resume_from = tmp_path / "state3"
    shutil.copytree(state, resume_from)
    _launch("accelerate_resume", str(tmp_path), str(resume_from))
    full = torch.load(tmp_path / "accelerate.pt", weights_only=True)
    resumed = torch.load(tmp_path / "accelerate_resumed.pt", weights_only=True)
    assert full["opt_steps"] == resumed["opt_steps"] == [6.0]
    assert full["world_size"] == resumed["world_size"] == 2 and full["ddp"]
    assert any("admin_omegas" in k for k in full["params"])
    err = _max_diff(resumed["params"], full["params"])
    assert err <= 1e-6, err
    for r in (full, resumed):
        assert not r["folded_has_omegas"] and r["fold_err"] <= 1e-5, r["fold_err"]
