"""Every ``--ddp-backend`` a user would pick, on 2 gloo CPU ranks with the real fairseq-train: profiled Admin,
AddSign with a decay and a mixture-of-experts FFN train, a SIGKILLed two-rank run resumes to the same update
count, and what cannot run on the CPU ends with one line naming the flag (exit 2) before any data loads."""

import importlib.util
import signal
import subprocess
import time

import pytest

from fairseq_helpers import PLUGINS_DIR, REPO_ROOT, TINY_TRANSFORMER_ARGS, free_port, run_ranks, run_tool, tool_env, \
    tool_path

pytestmark = pytest.mark.slow


def toolbox_args(data, save_dir, max_update, *extra):
    """Admin (profiled), AddSign with a cosine decay, 2 experts per FFN (Switch routing)."""
    args = list(TINY_TRANSFORMER_ARGS)
    args[args.index("--arch") + 1] = "transformer_admin"
    args[args.index("--optimizer") + 1] = "addsign"
    return [data.bin, "--user-dir", PLUGINS_DIR, *args, "--admin-init", "profiled",
            "--sign-decay", "cosine", "--sign-decay-steps", "100",
            "--moe-experts", "2", "--moe-router", "switch", "--criterion", "label_smoothed_cross_entropy_moe",
            "--label-smoothing", "0.1", "--max-update", str(max_update), "--save-dir", save_dir,
            "--save-interval-updates", "3", "--no-epoch-checkpoints", "--disable-validation", *extra]


def last_update(save_dir) -> int:
    from fairseq import checkpoint_utils

    import fairseq_plugins  # noqa: F401  (safe loading of fairseq checkpoints)

    return checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "checkpoint_last.pt"))["optimizer_history"][-1][
        "num_updates"]


# c10d (fairseq's default) trains and resumes in the SIGKILL test below; pytorch_ddp is fairseq's other name for
# it (the same branch of DistributedFairseqModel); legacy_ddp is every other two-rank test's back-end
@pytest.mark.parametrize("backend", ["no_c10d"])
def test_backend_trains_admin_sign_optimizer_and_moe_on_two_cpu_ranks(tiny_translation_data, tmp_path, backend):
    save = tmp_path / "ck"
    codes, logs = run_ranks([toolbox_args(tiny_translation_data, save, 6)] * 2, tmp_path, timeout=300,
                            ddp_backend=backend)
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "training on 2 devices" in logs[0] and "done training" in logs[0]
    assert last_update(save) == 6


@pytest.mark.skipif(importlib.util.find_spec("fairscale") is None, reason="fairscale is not installed (make install)")
def test_zero_sharding_os_trains_on_two_cpu_ranks(tiny_translation_data, tmp_path):
    save = tmp_path / "ck"
    codes, logs = run_ranks([toolbox_args(tiny_translation_data, save, 4, "--zero-sharding", "os")] * 2, tmp_path,
                            timeout=300, ddp_backend="legacy_ddp")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert last_update(save) == 4


def test_fully_sharded_on_cpu_is_one_line_before_data(tiny_translation_data, tmp_path):
    proc = run_tool("train", *toolbox_args(tiny_translation_data, tmp_path / "ck", 2, "--ddp-backend", "fully_sharded"),
                    check=False, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-2000:]
    # the whole output is the one line: no fairscale FutureWarning before it (tools/patch_fairscale_amp.py)
    assert len(lines) == 1, proc.stdout[-2000:]
    assert lines[-1].startswith("fairseq-train: error: --ddp-backend fully_sharded: ") and "CUDA only" in lines[-1]


def test_sigkilled_two_rank_c10d_run_resumes_to_the_same_update_count(tiny_translation_data, tmp_path):
    save = tmp_path / "ck"
    port = free_port()
    procs, logs = [], []
    for rank in range(2):
        args = [*toolbox_args(tiny_translation_data, save, 12), "--distributed-backend", "gloo", "--ddp-backend", "c10d",
                "--distributed-world-size", "2", "--distributed-rank", str(rank), "--distributed-no-spawn",
                "--distributed-init-method", f"tcp://127.0.0.1:{port}"]
        log = open(tmp_path / f"killed{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([tool_path("train"), *map(str, args)], cwd=REPO_ROOT, env=tool_env(), stdout=log,
                                      stderr=subprocess.STDOUT))
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if "@ 3 updates" in (tmp_path / "killed0.log").read_text() and \
                "Saved checkpoint" in (tmp_path / "killed0.log").read_text():
            break
        time.sleep(0.05)
    for p in procs:  # a node lost: both ranks die without a chance to clean up
        p.send_signal(signal.SIGKILL)
    codes = [p.wait(timeout=60) for p in procs]
    for log in logs:
        log.close()
    assert codes == [-signal.SIGKILL] * 2, f"training was not killed mid-run: {codes}"
    done = last_update(save)
    assert 3 <= done < 12
    codes, out = run_ranks([toolbox_args(tiny_translation_data, save, 12)] * 2, tmp_path, timeout=300,
                           ddp_backend="c10d")
    assert codes == [0, 0], out[0][-3000:]
    assert "Loaded checkpoint" in out[0] and f"{done} updates" in out[0]
    assert last_update(save) == 12
