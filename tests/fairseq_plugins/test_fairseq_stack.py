"""The real fairseq command-line tools with ``--user-dir fairseq_plugins``: train, kill, resume,
decode, score, distributed training on two CPU ranks, and the failure modes users hit."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fairseq_helpers import PLUGINS_DIR, REPO_ROOT, TINY_TRANSFORMER_ARGS, run_ranks, run_tool, tool_env, tool_path

pytestmark = pytest.mark.slow


def train_args(data, save_dir, max_update, *extra):
    return [data.bin, "--user-dir", "fairseq_plugins", *TINY_TRANSFORMER_ARGS,
            "--max-update", str(max_update), "--save-dir", save_dir,
            "--save-interval-updates", "5", "--keep-interval-updates", "2", *extra]


def last_update(save_dir: Path) -> int:
    from fairseq import checkpoint_utils

    import fairseq_plugins  # noqa: F401  (safe loading of fairseq checkpoints)

    state = checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "checkpoint_last.pt"))
    return state["optimizer_history"][-1]["num_updates"]


def validation_loss(data, checkpoint: Path) -> float:
    """The loss ``fairseq-validate`` reports for ``checkpoint`` on the valid subset."""
    out = run_tool("validate", data.bin, "--user-dir", "fairseq_plugins", "--path", checkpoint,
                   "--task", "translation", "--cpu", "--max-tokens", "500", "--valid-subset", "valid")
    line = next(line for line in out.stdout.splitlines() if "valid on 'valid' subset" in line)
    return float(line.split("| loss ")[1].split()[0])


def start_training_and_kill(args, log: Path, kill_after_update: int) -> int:
    """Start fairseq-train, SIGKILL it once a checkpoint after ``kill_after_update`` updates exists."""
    with open(log, "w") as out:
        proc = subprocess.Popen([tool_path("train"), *map(str, args)], cwd=REPO_ROOT, env=tool_env(),
                                stdout=out, stderr=subprocess.STDOUT)
        marker = f"@ {kill_after_update} updates"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if any("Saved checkpoint" in line and marker in line for line in log.read_text().splitlines()):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        return proc.wait(timeout=60)


def test_sigkilled_training_resumes_to_the_same_updates_and_quality(tiny_translation_data, tmp_path):
    # Unbroken reference run.
    full = tmp_path / "full"
    run_tool("train", *train_args(tiny_translation_data, full, 40))
    assert last_update(full) == 40

    # The same run, killed with SIGKILL after its checkpoint at update 10, then restarted.
    broken = tmp_path / "broken"
    rc = start_training_and_kill(train_args(tiny_translation_data, broken, 40), tmp_path / "killed.log", 10)
    assert rc == -signal.SIGKILL, f"training was not killed mid-run (exit {rc})"
    assert 10 <= last_update(broken) < 40
    resumed = run_tool("train", *train_args(tiny_translation_data, broken, 40))
    assert "Loaded checkpoint" in resumed.stdout
    assert last_update(broken) == 40

    # The resumed model is as good as the unbroken one (fairseq re-seeds each update, but a
    # mid-epoch resume does not reproduce the weights bit for bit, so compare validation loss).
    losses = [validation_loss(tiny_translation_data, run / "checkpoint_last.pt") for run in (full, broken)]
    assert abs(losses[0] - losses[1]) < 0.05 * losses[0], losses

    # Decode and score the resumed model with the plugins loaded.
    gen = run_tool("generate", tiny_translation_data.bin, "--user-dir", "fairseq_plugins",
                   "--path", broken / "checkpoint_last.pt", "--cpu", "--beam", "2",
                   "--max-tokens", "500", "--gen-subset", "test")
    assert "Generate test with beam=2" in gen.stdout
    # Every test sentence, also the 2 that fairseq-fixed's batching would drop (50 % 8 != 0).
    assert "Translated 50 sentences" in gen.stdout and gen.stdout.count("\nH-") == 50


def test_interactive_and_absolute_user_dir_from_another_directory(tiny_translation_data, tmp_path):
    save = tmp_path / "ck"
    # Run from an unrelated directory with the package's absolute path, as an installed user would.
    run_tool("train", *train_args(tiny_translation_data, save, 5)[:1], "--user-dir", PLUGINS_DIR,
             *TINY_TRANSFORMER_ARGS, "--max-update", "5", "--save-dir", save, cwd=tmp_path)
    out = run_tool("interactive", tiny_translation_data.bin, "--user-dir", PLUGINS_DIR, "--path",
                   save / "checkpoint_last.pt", "--cpu", "--beam", "2", "--source-lang", "src",
                   "--target-lang", "tgt", cwd=tmp_path, stdin="w1 w2 w3\nw4 w5\n")
    assert out.stdout.count("\nH-") == 2


def run_two_ranks(data, save_dir: Path, max_update: int, logs: Path):
    return run_ranks([train_args(data, save_dir, max_update)] * 2, logs)


def test_two_cpu_ranks_train_and_resume(tiny_translation_data, tmp_path):
    save = tmp_path / "ck"
    codes, logs = run_two_ranks(tiny_translation_data, save, 8, tmp_path)
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    # Only rank 0 logs training; rank 1 logs its own init.
    assert "training on 2 devices" in logs[0] and "done training" in logs[0]
    assert "distributed init (rank 1)" in logs[1]
    assert last_update(save) == 8

    codes, logs = run_two_ranks(tiny_translation_data, save, 12, tmp_path)
    assert codes == [0, 0], logs[0][-3000:]
    assert "Loaded checkpoint" in logs[0] and "8 updates" in logs[0]
    assert last_update(save) == 12


def test_checkpoints_hold_only_allowlisted_globals(tiny_translation_data, tmp_path):
    from fairseq_plugins.safe_checkpoint import safe_globals

    save = tmp_path / "ck"
    run_tool("train", *train_args(tiny_translation_data, save, 5))  # with validation: best_loss saved
    allowed = {f"{cls.__module__}.{cls.__qualname__}" for cls in safe_globals()}
    for path in save.glob("*.pt"):
        assert set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) <= allowed, path


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("tool", ["generate", "train"])
def test_checkpoint_that_would_run_code_is_refused(tiny_translation_data, tmp_path, tool):
    marker = tmp_path / "code-ran"
    bad = tmp_path / "ck" / "checkpoint_last.pt"
    bad.parent.mkdir()
    torch.save({"model": {}, "payload": _RunsCode(marker)}, bad)
    if tool == "generate":
        args = [tiny_translation_data.bin, "--user-dir", "fairseq_plugins", "--path", bad, "--cpu"]
    else:
        args = train_args(tiny_translation_data, bad.parent, 5)
    proc = run_tool(tool, *args, check=False, timeout=120)
    assert proc.returncode != 0
    assert "refusing to load checkpoint" in proc.stdout and "posix.system" in proc.stdout
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupted_checkpoint_fails_clearly(tiny_translation_data, tmp_path, damage):
    save = tmp_path / "ck"
    run_tool("train", *train_args(tiny_translation_data, save, 2), "--disable-validation")
    path = save / "checkpoint_last.pt"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 3], "garbage": b"not a checkpoint" * 10,
                      "empty": b""}[damage])
    for tool, args in [("train", train_args(tiny_translation_data, save, 4)),
                       ("generate", [tiny_translation_data.bin, "--user-dir", "fairseq_plugins",
                                     "--path", path, "--cpu"])]:
        proc = run_tool(tool, *args, check=False, timeout=120)
        assert proc.returncode != 0, tool
        assert f"checkpoint {path}" in proc.stdout or "checkpoint_last.pt is truncated" in proc.stdout
        assert "truncated or corrupted" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("tool", ["train", "generate", "validate", "interactive"])
def test_wrong_user_dir_fails_with_the_path(tiny_translation_data, tmp_path, tool):
    wrong = tmp_path / "no_such_plugins"
    proc = run_tool(tool, tiny_translation_data.bin, "--user-dir", wrong, "--cpu", check=False,
                    timeout=120, stdin="")
    assert proc.returncode != 0
    assert str(wrong) in proc.stdout


def test_registration_happens_once_across_reimports():
    # Import the package, then let fairseq import the same directory as a user dir, then import
    # every plugin module again through fairseq's own auto-import: no duplicate-registration error.
    code = f"""
import argparse, importlib, fairseq_plugins
from fairseq import utils
from fairseq.models import MODEL_REGISTRY, import_models
from fairseq.tasks import import_tasks
before = len(MODEL_REGISTRY)
utils.import_user_module(argparse.Namespace(user_dir={str(PLUGINS_DIR)!r}))
import_models({str(PLUGINS_DIR / 'models')!r}, "fairseq_plugins.models")
import_tasks({str(PLUGINS_DIR / 'tasks')!r}, "fairseq_plugins.tasks")
for name in list(__import__('sys').modules):
    if name.startswith('fairseq_plugins.') and name.count('.') == 2:
        importlib.reload(__import__('sys').modules[name])
assert len(MODEL_REGISTRY) == before, (before, len(MODEL_REGISTRY))
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=tool_env(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-3000:]


def test_libraries_do_not_import_fairseq():
    """The libraries need only torch: fairseq, HuggingFace and the monitor's writers are imported when used."""
    code = ("import sys, admin_torch, reinmax, sign_optim, stability_toolbox, stability_toolbox.hf_callback; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('fairseq', 'fairseq_cli', 'hydra', "
            "'transformers', 'accelerate', 'tensorboardX', 'matplotlib'));"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], env=tool_env(), text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, timeout=120)
    assert out.returncode == 0, out.stdout
