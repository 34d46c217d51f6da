"""The real fairseq command-line tools with ``--user-dir fairseq_plugins``: train, kill, resume,
decode, score, distributed training on two CPU ranks, and the failure modes users hit.

The one-line failures of every test here run in one fairseq process for the module (``refusals``, with
``run_tools_batch``: fairseq's start-up is paid once), and one short training run (``trained``) gives the
checkpoints that the interactive, allowlist and corruption tests read."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fairseq_helpers import (PLUGINS_DIR, REPO_ROOT, TINY_TRANSFORMER_ARGS, check_run, run_ranks, run_tool,
                             run_tools_batch, tool_env, tool_path)

pytestmark = pytest.mark.slow
# the tests that read `trained` or `refusals` stay on one worker under `pytest --dist loadgroup` (make test)
SHARED_RUNS = pytest.mark.xdist_group("fairseq_stack_shared_runs")


def train_args(data, save_dir, max_update, *extra):
    return [data.bin, "--user-dir", "fairseq_plugins", *TINY_TRANSFORMER_ARGS,
            "--max-update", str(max_update), "--save-dir", save_dir,
            "--save-interval-updates", "5", "--keep-interval-updates", "2", *extra]


def last_update(save_dir: Path) -> int:
    from fairseq import checkpoint_utils

    import fairseq_plugins  # noqa: F401  (safe loading of fairseq checkpoints)

    state = checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "checkpoint_last.pt"))
    return state["optimizer_history"][-1]["num_updates"]


def validate_args(data, checkpoint: Path) -> list:
    return [data.bin, "--user-dir", "fairseq_plugins", "--path", checkpoint, "--task", "translation", "--cpu",
            "--max-tokens", "500", "--valid-subset", "valid"]


def validation_loss(log: str) -> float:
    """The loss a ``fairseq-validate`` log reports on the valid subset."""
    line = next(line for line in log.splitlines() if "valid on 'valid' subset" in line)
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
    # A run killed with SIGKILL after its checkpoint at update 10 (its own process).
    full, broken = tmp_path / "full", tmp_path / "broken"
    rc = start_training_and_kill(train_args(tiny_translation_data, broken, 40), tmp_path / "killed.log", 10)
    assert rc == -signal.SIGKILL, f"training was not killed mid-run (exit {rc})"
    assert 10 <= last_update(broken) < 40
    # Then, in one fairseq process: the unbroken reference run, the restart of the killed one, validation of
    # both and decoding.
    unbroken, resumed, *validated, gen = map(check_run, run_tools_batch([
        ("train", train_args(tiny_translation_data, full, 40)),
        ("train", train_args(tiny_translation_data, broken, 40)),
        *[("validate", validate_args(tiny_translation_data, run / "checkpoint_last.pt")) for run in (full, broken)],
        ("generate", [tiny_translation_data.bin, "--user-dir", "fairseq_plugins", "--path",
                      broken / "checkpoint_last.pt", "--cpu", "--beam", "2", "--max-tokens", "500",
                      "--gen-subset", "test"])]))
    assert last_update(full) == 40 and "Loaded checkpoint" not in unbroken.stdout
    assert "Loaded checkpoint" in resumed.stdout
    assert last_update(broken) == 40

    # The resumed model is as good as the unbroken one (fairseq re-seeds each update, but a
    # mid-epoch resume does not reproduce the weights bit for bit, so compare validation loss).
    losses = [validation_loss(run.stdout) for run in validated]
    assert abs(losses[0] - losses[1]) < 0.05 * losses[0], losses

    # Decode and score the resumed model with the plugins loaded.
    assert "Generate test with beam=2" in gen.stdout
    # Every test sentence, also the 2 that fairseq-fixed's batching would drop (50 % 8 != 0).
    assert "Translated 50 sentences" in gen.stdout and gen.stdout.count("\nH-") == 50


@pytest.fixture(scope="module")
def trained(tiny_translation_data, tmp_path_factory):
    """5 updates with validation (best_loss saved), run from an unrelated directory with the package's absolute
    path, as an installed user would; the save directory (read only: tests copy what they change)."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    save = elsewhere / "ck"
    run_tool("train", tiny_translation_data.bin, "--user-dir", PLUGINS_DIR, *TINY_TRANSFORMER_ARGS,
             "--max-update", "5", "--save-dir", save, cwd=elsewhere)
    assert last_update(save) == 5
    return save


@SHARED_RUNS
def test_interactive_and_absolute_user_dir_from_another_directory(tiny_translation_data, trained, tmp_path):
    save = trained  # trained from another directory with the absolute --user-dir (the fixture)
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


@SHARED_RUNS
def test_checkpoints_hold_only_allowlisted_globals(trained):
    from fairseq_plugins.safe_checkpoint import safe_globals

    allowed = {f"{cls.__module__}.{cls.__qualname__}" for cls in safe_globals()}
    paths = list(trained.glob("*.pt"))  # with validation: best_loss saved
    assert {"checkpoint_last.pt", "checkpoint_best.pt"} <= {p.name for p in paths}
    for path in paths:
        assert set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) <= allowed, path


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


CODE_TOOLS = ["generate", "train"]
DAMAGES = ["truncated", "garbage", "empty"]
USER_DIR_TOOLS = ["train", "generate", "validate", "interactive"]


@pytest.fixture(scope="module")
def refusals(tiny_translation_data, trained, tmp_path_factory):
    """Every failure case of this module, run in one fairseq process (each a tool run that must fail with a
    clear message): {(kind, case): (result, what the case needs to check)}."""
    root = tmp_path_factory.mktemp("refusals")
    data = tiny_translation_data
    cases, keys, extra = [], [], {}
    # a wrong --user-dir first, while no plugin has been loaded in the process
    for tool in USER_DIR_TOOLS:
        wrong = root / f"no_such_plugins_{tool}"
        keys.append(("user_dir", tool)); cases.append((tool, [data.bin, "--user-dir", wrong, "--cpu"]))
        extra[("user_dir", tool)] = wrong
    # a checkpoint that would run code when unpickled
    for tool in CODE_TOOLS:
        marker = root / f"code-ran-{tool}"
        bad = root / f"code_{tool}" / "checkpoint_last.pt"
        bad.parent.mkdir()
        torch.save({"model": {}, "payload": _RunsCode(marker)}, bad)
        args = ([data.bin, "--user-dir", "fairseq_plugins", "--path", bad, "--cpu"] if tool == "generate"
                else train_args(data, bad.parent, 5))
        keys.append(("code", tool)); cases.append((tool, args))
        extra[("code", tool)] = marker
    # a damaged checkpoint_last.pt of a real run; training to more updates than it holds must load it
    for damage in DAMAGES:
        save = root / f"damaged_{damage}"
        save.mkdir()
        path = save / "checkpoint_last.pt"
        good = (trained / "checkpoint_last.pt").read_bytes()
        path.write_bytes({"truncated": good[: len(good) // 3], "garbage": b"not a checkpoint" * 10,
                          "empty": b""}[damage])
        for tool, args in [("train", train_args(data, save, 8)),
                           ("generate", [data.bin, "--user-dir", "fairseq_plugins", "--path", path, "--cpu"])]:
            keys.append(("damaged", damage, tool)); cases.append((tool, args))
        extra[("damaged", damage)] = path
    results = run_tools_batch(cases)
    return dict(zip(keys, results)), extra


@pytest.mark.parametrize("tool", CODE_TOOLS)
@SHARED_RUNS
def test_checkpoint_that_would_run_code_is_refused(refusals, tool):
    runs, extra = refusals
    proc, marker = runs[("code", tool)], extra[("code", tool)]
    assert proc.returncode != 0
    assert "refusing to load checkpoint" in proc.stdout and "posix.system" in proc.stdout
    assert not marker.exists()


@pytest.mark.parametrize("damage", DAMAGES)
@SHARED_RUNS
def test_corrupted_checkpoint_fails_clearly(refusals, damage):
    runs, extra = refusals
    path = extra[("damaged", damage)]
    for tool in ("train", "generate"):
        proc = runs[("damaged", damage, tool)]
        assert proc.returncode != 0, tool
        assert f"checkpoint {path}" in proc.stdout or "checkpoint_last.pt is truncated" in proc.stdout
        assert "truncated or corrupted" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("tool", USER_DIR_TOOLS)
@SHARED_RUNS
def test_wrong_user_dir_fails_with_the_path(refusals, tool):
    runs, extra = refusals
    proc = runs[("user_dir", tool)]
    assert proc.returncode != 0
    assert str(extra[("user_dir", tool)]) in proc.stdout


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
