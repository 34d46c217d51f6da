"""Decoder-only language models: fairseq's language_modeling task on NumPy 2, ``transformer_lm_admin``,
and its fold into a stock ``transformer_lm`` that ``fairseq-eval-lm`` scores identically without --user-dir.

The single-process tool runs of the module go in two fairseq processes (``run_tools_batch``: fairseq's start-up
is paid once per process): one with --user-dir (the Admin runs), one that never loads the plugins (the stock
model and the folded checkpoints)."""

import re

import pytest

from fairseq_helpers import PLUGINS_DIR, check_run, lm_data_case, run_ranks, run_tools_batch

# the module's runs are one fixture: its tests stay on one worker under `pytest --dist loadgroup` (make test)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("fairseq_lm_admin")]

TINY_LM = ["--task", "language_modeling", "--sample-break-mode", "eos", "--tokens-per-sample", "64",
           "--decoder-layers", "3", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
           "--decoder-attention-heads", "2", "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "400",
           "--cpu", "--seed", "1", "--no-progress-bar", "--log-format", "simple", "--num-workers", "0",
           "--max-update", "12", "--no-epoch-checkpoints"]
INITS = ["admin", "deepnorm", "profiled"]


@pytest.fixture(scope="module")
def lm_corpus(tmp_path_factory):
    """(the binarized directory, the fairseq-preprocess run that makes it: the first case of ``runs``)."""
    return lm_data_case(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def lm_data(lm_corpus, runs):
    """The binarized corpus (made by the first case of ``runs``)."""
    return lm_corpus[0]


def eval_lm_args(data, checkpoint, *extra):
    return [data, "--path", checkpoint, "--cpu", "--max-tokens", "400", "--num-workers", "0",
            "--sample-break-mode", "eos", "--tokens-per-sample", "64", "--gen-subset", "valid", *extra]


def loss_and_perplexity(run):
    out = check_run(run).stdout
    match = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", out)
    assert match, out[-2000:]
    return float(match.group(1)), float(match.group(2))


@pytest.fixture(scope="module")
def runs(lm_corpus, tmp_path_factory):
    """{name: result}: fairseq-preprocess (``preprocess``); per init, ``train/<init>``, ``eval/<init>`` (with
    --user-dir), ``fold/<init>`` (the fold's exit status, in-process) and ``eval_folded/<init>`` (without);
    ``refuse_pre_ln``; ``train/stock`` and ``eval/stock`` (fairseq's transformer_lm, no plugins); ``dir/<name>``:
    the save directories."""
    lm_data, preprocess = lm_corpus
    root = tmp_path_factory.mktemp("lm_admin")
    admin = [lm_data, "--user-dir", PLUGINS_DIR, "--arch", "transformer_lm_admin", *TINY_LM]
    dirs = {init: root / init for init in INITS}
    for directory in dirs.values():
        directory.mkdir()
    cases, names = [preprocess], ["preprocess"]
    for init in INITS:
        extra = ["--admin-init", init]
        if init == "profiled":
            extra += ["--admin-profile", dirs[init] / "profile.json"]
        cases += [("train", [*admin, *extra, "--save-dir", dirs[init] / "ck"]),
                  ("eval-lm", eval_lm_args(lm_data, dirs[init] / "ck" / "checkpoint_last.pt", "--user-dir",
                                           PLUGINS_DIR))]
        names += [f"train/{init}", f"eval/{init}"]
    cases.append(("train", [*admin, "--decoder-normalize-before", "--save-dir", root / "pre_ln"]))
    names.append("refuse_pre_ln")
    results = dict(zip(names, run_tools_batch(cases)))
    check_run(results["preprocess"])

    from fairseq_plugins.fold_checkpoint import main as fold_main
    for init in INITS:
        if results[f"train/{init}"].returncode == 0:
            results[f"fold/{init}"] = fold_main([str(dirs[init] / "ck" / "checkpoint_last.pt"),
                                                 str(dirs[init] / "folded.pt")])
    # no --user-dir in this process: stock fairseq
    stock = root / "stock"
    cases = [("train", [lm_data, "--arch", "transformer_lm", *TINY_LM, "--save-dir", stock]),
             ("eval-lm", eval_lm_args(lm_data, stock / "checkpoint_last.pt"))]
    cases += [("eval-lm", eval_lm_args(lm_data, dirs[init] / "folded.pt")) for init in INITS]
    names = ["train/stock", "eval/stock"] + [f"eval_folded/{init}" for init in INITS]
    results.update(zip(names, run_tools_batch(cases)))
    results.update({f"dir/{init}": dirs[init] for init in INITS})
    return results


def test_stock_language_modeling_runs_on_numpy_2(runs):
    """fairseq's own language_modeling task and fairseq-eval-lm (np.compat removed in NumPy 2)."""
    check_run(runs["train/stock"])
    loss, ppl = loss_and_perplexity(runs["eval/stock"])
    assert 0 < loss < 7 and ppl == pytest.approx(2 ** loss, rel=1e-3)


@pytest.mark.parametrize("init", INITS)
def test_admin_lm_trains_folds_and_scores_identically_without_user_dir(runs, init):
    log = check_run(runs[f"train/{init}"]).stdout
    assert "TransformerLMAdmin" in log or "transformer_lm_admin" in log
    admin_loss, admin_ppl = loss_and_perplexity(runs[f"eval/{init}"])
    folded = runs[f"dir/{init}"] / "folded.pt"
    assert runs[f"fold/{init}"] == 0
    stock_loss, stock_ppl = loss_and_perplexity(runs[f"eval_folded/{init}"])  # no --user-dir: a stock transformer_lm
    assert stock_loss == admin_loss and stock_ppl == admin_ppl
    import torch
    state = torch.load(folded, weights_only=True)
    assert state["cfg"]["model"]["_name"] == "transformer_lm" and not any("residuals" in k for k in state["model"])


def test_admin_lm_refuses_pre_ln_with_one_line(runs):
    proc = runs["refuse_pre_ln"]
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
