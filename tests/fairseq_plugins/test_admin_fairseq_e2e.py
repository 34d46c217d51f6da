"""transformer_admin end to end with the real fairseq tools: train, resume, generate, fold.

For each initialization (closed-form Admin with trainable omega vectors, profiled Admin, DeepNorm):
fairseq-train 2 updates, resume to 3, then fold the checkpoint with
the command ``python -m fairseq_plugins.fold_checkpoint`` (its ``main``, in-process) and check that fairseq-generate WITHOUT --user-dir
on the folded checkpoint gives the same hypotheses as fairseq-generate with --user-dir on the
Admin checkpoint.
"""

import re
import subprocess

import pytest

from fairseq_plugins.fold_checkpoint import main as fold_main
from fairseq_helpers import PLUGINS_DIR, REPO_ROOT, TINY_TRANSFORMER_ARGS, run_tool, tool_env, tool_path

pytestmark = pytest.mark.slow

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


def generate_both(data, admin_ckpt, folded_ckpt):
    """fairseq-generate on both checkpoints, run side by side (the admin one needs --user-dir)."""
    # --required-batch-size-multiple 1: without --user-dir (the folded run) fairseq-fixed would drop
    # the last batch (fairseq_plugins.batching fixes that only where the plugins are loaded).
    common = [data, "--gen-subset", "valid", "--beam", "2", "--batch-size", "64", "--cpu", "--num-workers", "0",
              "--max-len-b", "20", "--required-batch-size-multiple", "1"]
    cmds = [[tool_path("generate"), *map(str, common), "--path", str(admin_ckpt), "--user-dir", str(PLUGINS_DIR)],
            [tool_path("generate"), *map(str, common), "--path", str(folded_ckpt)]]
    procs = [subprocess.Popen(c, cwd=REPO_ROOT, env=tool_env(), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for c in cmds]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, c, log in zip(procs, cmds, logs):
        assert p.returncode == 0, f"{' '.join(c)} exited {p.returncode}:\n{log[-4000:]}"
    return logs


@pytest.mark.parametrize("init", list(INITS))
def test_train_resume_fold_generate(init, tiny_translation_data, tmp_path, capsys):
    data, ck = tiny_translation_data.bin, tmp_path / "ck"
    init_args = list(INITS[init])
    profile = tmp_path / "profile.json"
    if init == "profiled":
        init_args += ["--admin-profile", profile]

    first = run_tool("train", *admin_train_args(data, ck, init_args), "--max-update", "2").stdout
    assert "num_updates 2" in first
    if init == "profiled":
        assert "profiled 10 omegas" in first and profile.exists()
        profile.unlink()  # a resumed run must take the omegas from the checkpoint, not profile again

    resumed = run_tool("train", *admin_train_args(data, ck, init_args), "--max-update", "3").stdout
    assert "Loaded checkpoint" in resumed and "num_updates 3" in resumed
    if init == "profiled":
        assert "profiled 10 omegas" not in resumed and not profile.exists()

    folded = tmp_path / "folded.pt"
    # the command's main() in-process (a subprocess would only add fairseq's import time)
    assert fold_main([str(ck / "checkpoint_last.pt"), str(folded)]) == 0
    assert "folded 10 residual omegas" in capsys.readouterr().out

    admin_log, folded_log = generate_both(data, ck / "checkpoint_last.pt", folded)
    admin_hyps, folded_hyps = hypotheses(admin_log), hypotheses(folded_log)
    assert len(admin_hyps) == 50  # the whole valid split
    assert folded_hyps == admin_hyps

