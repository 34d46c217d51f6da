"""Decoder-only language models: fairseq's language_modeling task on NumPy 2, ``transformer_lm_admin``,
and its fold into a stock ``transformer_lm`` that ``fairseq-eval-lm`` scores identically without --user-dir."""

import re

import pytest

from fairseq_helpers import PLUGINS_DIR, make_lm_data, run_ranks, run_tool

pytestmark = pytest.mark.slow

TINY_LM = ["--task", "language_modeling", "--sample-break-mode", "eos", "--tokens-per-sample", "64",
           "--decoder-layers", "3", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
           "--decoder-attention-heads", "2", "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "400",
           "--cpu", "--seed", "1", "--no-progress-bar", "--log-format", "simple", "--num-workers", "0",
           "--max-update", "12", "--no-epoch-checkpoints"]


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    return make_lm_data(tmp_path_factory.mktemp("lm"))


def eval_lm(data, checkpoint, *extra):
    out = run_tool("eval-lm", data, "--path", checkpoint, "--cpu", "--max-tokens", "400", "--num-workers", "0",
                   "--sample-break-mode", "eos", "--tokens-per-sample", "64", "--gen-subset", "valid", *extra).stdout
    match = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", out)
    assert match, out[-2000:]
    return float(match.group(1)), float(match.group(2))


def test_stock_language_modeling_runs_on_numpy_2(lm_data, tmp_path):
    """fairseq's own language_modeling task and fairseq-eval-lm (np.compat removed in NumPy 2)."""
    run_tool("train", lm_data, "--arch", "transformer_lm", *TINY_LM, "--save-dir", tmp_path)
    loss, ppl = eval_lm(lm_data, tmp_path / "checkpoint_last.pt")
    assert 0 < loss < 7 and ppl == pytest.approx(2 ** loss, rel=1e-3)


@pytest.mark.parametrize("init", ["admin", "deepnorm", "profiled"])
def test_admin_lm_trains_folds_and_scores_identically_without_user_dir(lm_data, tmp_path, init):
    extra = ["--admin-init", init] + (["--admin-profile", tmp_path / "profile.json"] if init == "profiled" else [])
    log = run_tool("train", lm_data, "--user-dir", PLUGINS_DIR, "--arch", "transformer_lm_admin", *TINY_LM,
                   *extra, "--save-dir", tmp_path / "ck").stdout
    assert "TransformerLMAdmin" in log or "transformer_lm_admin" in log
    ckpt = tmp_path / "ck" / "checkpoint_last.pt"
    admin_loss, admin_ppl = eval_lm(lm_data, ckpt, "--user-dir", PLUGINS_DIR)
    folded = tmp_path / "folded.pt"
    from fairseq_plugins.fold_checkpoint import main as fold_main
    assert fold_main([str(ckpt), str(folded)]) == 0
    stock_loss, stock_ppl = eval_lm(lm_data, folded)  # no --user-dir: a stock transformer_lm
    assert stock_loss == admin_loss and stock_ppl == admin_ppl
    import torch
    state = torch.load(folded, weights_only=True)
    assert state["cfg"]["model"]["_name"] == "transformer_lm" and not any("residuals" in k for k in state["model"])


def test_admin_lm_refuses_pre_ln_with_one_line(lm_data, tmp_path):
    proc = run_tool("train", lm_data, "--user-dir", PLUGINS_DIR, "--arch", "transformer_lm_admin", *TINY_LM,
                    "--decoder-normalize-before", "--save-dir", tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("fairseq-train: error: --encoder-normalize-before / "
                                                           "--decoder-normalize-before are not accepted")


def test_profiled_admin_on_two_ranks_averages_and_a_restart_with_one_profile_file_does_not_hang(lm_data, tmp_path):
    """Rank 0 writes the averaged profile. A fresh run where only rank 0 finds its profile file profiles
    again on both ranks (a collective decision) instead of leaving rank 0 out of the average (a hang)."""
    def args(rank, save):
        return [lm_data, "--user-dir", PLUGINS_DIR, "--arch", "transformer_lm_admin", *TINY_LM, "--max-update", "4",
                "--admin-init", "profiled", "--admin-profile", tmp_path / f"rank{rank}" / "profile.json",
                "--save-dir", save]
    for rank in (0, 1):
        (tmp_path / f"rank{rank}").mkdir()
    codes, logs = run_ranks([args(r, tmp_path / "ck1") for r in (0, 1)], tmp_path, timeout=240)
    assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert (tmp_path / "rank0" / "profile.json").exists() and not (tmp_path / "rank1" / "profile.json").exists()
    codes, logs = run_ranks([args(r, tmp_path / "ck2") for r in (0, 1)], tmp_path, timeout=240)
    assert codes == [0, 0], "a rank hung or failed:\n" + logs[0][-2000:] + logs[1][-2000:]
