"""transformer_admin end to end with the real fairseq tools: train, resume, generate, fold.

For each initialization (closed-form Admin with trainable omega vectors, profiled Admin, DeepNorm):
fairseq-train 2 updates, resume to 3, then fold the checkpoint with
the command ``python -m fairseq_plugins.fold_checkpoint`` (its ``main``, in-process) and check that fairseq-generate WITHOUT --user-dir
on the folded checkpoint gives the same hypotheses as fairseq-generate with --user-dir on the
Admin checkpoint.

The tools run in two processes for the whole module (``run_tools_batch``: fairseq's start-up is paid once per
process): every training run, then every generation, the three without --user-dir first, before the plugins
are loaded in that process.
"""

import contextlib
import io
import re

import pytest

from fairseq_plugins.fold_checkpoint import main as fold_main
from fairseq_helpers import PLUGINS_DIR, TINY_TRANSFORMER_ARGS, check_run, run_tools_batch

# the module's runs are one fixture: its tests stay on one worker under `pytest --dist loadgroup` (make test)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("fairseq_admin_e2e")]

INITS = {
    "admin": ["--admin-init", "admin", "--encoder-as-parameter", "--decoder-as-parameter"],
    "profiled": ["--admin-init", "profiled"],
    "deepnorm": ["--admin-init", "deepnorm"],
}


def admin_train_args(data, save_dir, init_args):
    args = list(TINY_TRANSFORMER_ARGS)
    args[args.index("--arch") + 1] = "transformer_admin"
    return [data, "--user-dir", PLUGINS_DIR, *args, *init_args, "--save-dir", save_dir,
            "--no-epoch-checkpoints", "--disable-validation"]


def hypotheses(log: str):
    """{sentence id: hypothesis tokens} of a fairseq-generate log (scores left out)."""
    out = {}
    for line in log.splitlines():
        m = re.match(r"H-(\d+)\t\S+\t(.*)$", line)
        if m:
            out[int(m.group(1))] = m.group(2)
    return out


def generate_args(data, checkpoint, *extra):
    # --required-batch-size-multiple 1: without --user-dir (the folded run) fairseq-fixed would drop
    # the last batch (fairseq_plugins.batching fixes that only where the plugins are loaded).
    return [data, "--gen-subset", "valid", "--beam", "2", "--batch-size", "64", "--cpu", "--num-workers", "0",
            "--max-len-b", "20", "--required-batch-size-multiple", "1", "--path", checkpoint, *extra]


@pytest.fixture(scope="module")
def runs(tiny_translation_data, tmp_path_factory):
    """{init: (first training run, resumed run, (fold's exit status, its output), admin generate run, folded
    generate run, dir)}: each test checks its own runs (one init's failure is reported by its own test)."""
    data, root = tiny_translation_data.bin, tmp_path_factory.mktemp("admin_e2e")
    trains = []
    for init, init_args in INITS.items():
        ck = root / init / "ck"
        (root / init).mkdir()
        first_args, resume_args = list(init_args), list(init_args)
        if init == "profiled":
            # the resumed run names a profile file that does not exist (the first run's is elsewhere): it must
            # take the omegas from the checkpoint, not profile again
            first_args += ["--admin-profile", root / init / "profile.json"]
            resume_args += ["--admin-profile", root / init / "resume_profile.json"]
        trains += [("train", [*admin_train_args(data, ck, first_args), "--max-update", "2"]),
                   ("train", [*admin_train_args(data, ck, resume_args), "--max-update", "3"])]
    logs = run_tools_batch(trains)

    folds = {}
    for i, init in enumerate(INITS):
        if logs[2 * i + 1].returncode != 0:
            folds[init] = (None, "not folded: the training failed")
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # the command's main() in-process
            code = fold_main([str(root / init / "ck" / "checkpoint_last.pt"), str(root / init / "folded.pt")])
        folds[init] = (code, out.getvalue())

    # without --user-dir first: the folded checkpoints are generated before the plugins load in that process
    generates = [("generate", generate_args(data, root / init / "folded.pt")) for init in INITS]
    generates += [("generate", generate_args(data, root / init / "ck" / "checkpoint_last.pt", "--user-dir",
                                             PLUGINS_DIR)) for init in INITS]
    gen_logs = run_tools_batch(generates)
    n = len(INITS)
    return {init: (logs[2 * i], logs[2 * i + 1], folds[init], gen_logs[n + i], gen_logs[i], root / init)
            for i, init in enumerate(INITS)}


@pytest.mark.parametrize("init", list(INITS))
def test_train_resume_fold_generate(init, runs):
    first, resumed, (fold_code, fold_out), admin_log, folded_log, root = runs[init]
    first, resumed = check_run(first).stdout, check_run(resumed).stdout
    assert "num_updates 2" in first
    if init == "profiled":
        assert "profiled 10 omegas" in first and (root / "profile.json").exists()

    assert "Loaded checkpoint" in resumed and "num_updates 3" in resumed
    if init == "profiled":
        assert "profiled 10 omegas" not in resumed and not (root / "resume_profile.json").exists()

    assert fold_code == 0
    assert "folded 10 residual omegas" in fold_out

    admin_hyps, folded_hyps = hypotheses(check_run(admin_log).stdout), hypotheses(check_run(folded_log).stdout)
    assert len(admin_hyps) == 50  # the whole valid split
    assert folded_hyps == admin_hyps
