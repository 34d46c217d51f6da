"""``torchrun --nnodes 2 --nproc-per-node 1`` with the c10d rendezvous on localhost (two "nodes"): the torch.nn
example (recipes/distributed/train_torch.py: Admin by convert, FSDP2, AddSign, distributed checkpoints) trains
and a killed run resumes to the same result; fairseq-train with the plugins trains on both nodes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fairseq_helpers import PLUGINS_DIR, REPO_ROOT, TINY_TRANSFORMER_ARGS, free_port, tool_env, tool_path

pytestmark = pytest.mark.slow
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
RECIPE = REPO_ROOT / "recipes" / "distributed" / "train_torch.py"


def start_nodes(program, logs: Path, tag: str):
    """Two torchrun agents (one process each) meeting at one c10d rendezvous; each in its own session."""
    port = free_port()
    procs = []
    for node in range(2):
        log = open(logs / f"{tag}-node{node}.log", "w")
        cmd = [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", tag, *map(str, program)]
        procs.append((subprocess.Popen(cmd, cwd=REPO_ROOT, env=tool_env(), stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
    return procs


def wait(procs, timeout=300):
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            codes.append(None)
        log.close()
    return codes


def logs_of(path: Path, tag: str) -> str:
    return "".join((path / f"{tag}-node{n}.log").read_text() for n in range(2))


def test_torch_example_on_two_nodes_trains_and_resumes_after_a_kill(tmp_path):
    full = tmp_path / "full"
    codes = wait(start_nodes([RECIPE, "--steps", "12", "--save-every", "3", "--save", full], tmp_path, "full"))
    assert codes == [0, 0], logs_of(tmp_path, "full")[-4000:]
    unbroken = json.loads((full / "final.json").read_text())
    assert unbroken["world"] == 2 and unbroken["steps"] == 12

    broken = tmp_path / "broken"
    procs = start_nodes([RECIPE, "--steps", "12", "--save-every", "3", "--save", broken], tmp_path, "killed")
    deadline = time.time() + 240
    while time.time() < deadline and not (broken / "checkpoint.json").exists():
        time.sleep(0.05)
    # both nodes lost at once: the agents and their workers (torchrun starts the workers in their own sessions)
    subprocess.run(["pkill", "-KILL", "-f", str(broken)], check=False)
    wait(procs)
    saved = json.loads((broken / "checkpoint.json").read_text())["step"]
    assert 3 <= saved < 12 and not (broken / "final.json").exists()
    codes = wait(start_nodes([RECIPE, "--steps", "12", "--save-every", "3", "--save", broken], tmp_path, "resumed"))
    assert codes == [0, 0], logs_of(tmp_path, "resumed")[-4000:]
    assert f"resumed from step {saved}" in logs_of(tmp_path, "resumed")
    resumed = json.loads((broken / "final.json").read_text())
    assert abs(resumed["loss"] - unbroken["loss"]) <= 1e-5 * abs(unbroken["loss"]), (resumed, unbroken)


def test_fairseq_train_on_two_nodes(tiny_translation_data, tmp_path):
    args = list(TINY_TRANSFORMER_ARGS)
    args[args.index("--arch") + 1] = "transformer_admin"
    args[args.index("--optimizer") + 1] = "addsign"
    save = tmp_path / "ck"
    program = [tool_path("train"), tiny_translation_data.bin, "--user-dir", PLUGINS_DIR, *args, "--max-update", "6",
               "--save-dir", save, "--distributed-backend", "gloo", "--disable-validation"]
    codes = wait(start_nodes(program, tmp_path, "fairseq"))
    out = logs_of(tmp_path, "fairseq")
    assert codes == [0, 0], out[-4000:]
    assert "training on 2 devices" in out and "distributed init (rank 1): env://" in out
    from fairseq import checkpoint_utils

    import fairseq_plugins  # noqa: F401  (safe loading)

    state = checkpoint_utils.load_checkpoint_to_cpu(str(save / "checkpoint_last.pt"))
    assert state["optimizer_history"][-1]["num_updates"] == 6
