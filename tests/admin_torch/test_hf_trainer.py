"""A converted HuggingFace model under transformers.Trainer on two processes (DDP, gloo, CPU) with
sign_optim.AddSign + CosineInternalDecay: Trainer checkpoints, resume equal to the unbroken run, fold at
the end. The ranks run tests/admin_torch/hf_trainer_worker.py."""

import os
import subprocess
import sys

import pytest
import torch
from fairseq_helpers import free_port

pytest.importorskip("transformers")

WORKER = os.path.join(os.path.dirname(__file__), "hf_trainer_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RANK_TIMEOUT_S = 150  # a hung rank (a collective waiting for its peer) fails the test


def _launch(*args, world_size=2):
    """Start ``world_size`` ranks of the worker; fail (after killing the others) if any fails or hangs."""
    port = free_port()
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
    # one launch (start-up paid once): the unbroken run, then the resume from a copy of its checkpoint-3 alone
    # (tmp_path/ckpt3: the unbroken run's later checkpoint is not around), made by rank 0 between the two
    _launch("trainer_all", str(tmp_path))
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "model.safetensors").is_file()
    # the Trainer checkpoint holds the sign optimizer's state; it loads with weights_only=True as Trainer does
    state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    assert state["sign_internal_decay"] == {"kind": "cosine", "T_max": 6, "num_periods": 0.5, "zero_after": None}
    assert all(float(s["step"]) == 3 for s in state["state"].values())
    resumed_from = tmp_path / "ckpt3"
    assert sorted(p.name for p in resumed_from.iterdir()) == sorted(p.name for p in ckpt.iterdir())
    assert all((resumed_from / p.name).read_bytes() == p.read_bytes() for p in ckpt.iterdir() if p.is_file())

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
    # one launch: the unbroken run, then the resume from tmp_path/state3, rank 0's copy of its saved state
    _launch("accelerate_all", str(tmp_path))
    state = tmp_path / "accelerate_state"
    assert state.is_dir()
    assert sorted(p.name for p in (tmp_path / "state3").iterdir()) == sorted(p.name for p in state.iterdir())
    full = torch.load(tmp_path / "accelerate.pt", weights_only=True)
    resumed = torch.load(tmp_path / "accelerate_resumed.pt", weights_only=True)
    assert full["opt_steps"] == resumed["opt_steps"] == [6.0]
    assert full["world_size"] == resumed["world_size"] == 2 and full["ddp"]
    assert any("admin_omegas" in k for k in full["params"])
    err = _max_diff(resumed["params"], full["params"])
    assert err <= 1e-6, err
    for r in (full, resumed):
        assert not r["folded_has_omegas"] and r["fold_err"] <= 1e-5, r["fold_err"]


@pytest.mark.slow
def test_trainer_checkpoints_and_resumes_a_model_that_cannot_be_folded(tmp_path):
    """ALBERT with its one layer shared across depth (the default) and trained per-feature omegas
    (as_parameter=True) cannot be folded: Trainer's checkpoints hold its Admin form (save_pretrained), and a fresh
    converted model resumed from one ends equal to the unbroken run (one process; the two-process runs above use
    BERT)."""
    import transformers
    from transformers import AlbertConfig, AlbertForMaskedLM, Trainer, TrainingArguments

    import admin_torch

    sys.path.insert(0, os.path.dirname(__file__))
    from hf_trainer_worker import Data  # noqa: E402  (the same fixed token sequences)

    transformers.utils.logging.set_verbosity_error()

    def build():
        torch.manual_seed(0)
        config = AlbertConfig(vocab_size=40, embedding_size=8, hidden_size=16, num_hidden_layers=3,
                              num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0, max_position_embeddings=32)
        return admin_torch.convert(AlbertForMaskedLM(config), as_parameter=True)

    def train(out, resume=None):
        model = build()
        args = TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, save_strategy="steps",
                                 per_device_train_batch_size=4, use_cpu=True, learning_rate=1e-2, seed=3,
                                 data_seed=3, report_to=[], logging_strategy="no", disable_tqdm=True,
                                 dataloader_num_workers=0)
        Trainer(model=model, args=args, train_dataset=Data()).train(resume_from_checkpoint=resume)
        return model

    full = train(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "admin_torch_config.json").is_file()  # the Admin form: no stock model computes it
    with pytest.raises(ValueError, match="shared across depth"):
        admin_torch.fold(full)
    resumed = train(tmp_path / "resumed", resume=str(ckpt))
    ref = dict(full.named_parameters())
    assert any("admin_omegas" in k for k in ref)
    err = max((p - ref[k]).abs().max().item() for k, p in resumed.named_parameters())
    assert err <= 1e-6, err
    moved = max((p - ref[k]).abs().max().item() for k, p in build().named_parameters())
    assert moved > 1e-3  # training moved the weights: the comparison above is not trivial
