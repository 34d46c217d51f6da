"""Adversarial uses of the monitor's and guard's training-loop flags (the repair ``training_flags``): tools that
run no training step, a ``Trainer`` built from a Namespace, a checkpoint trained with the flags then loaded and
resumed without them."""

import subprocess
import sys

import pytest

import fairseq_plugins  # noqa: F401  (installs the repairs: the flags in the training parser)
from fairseq_helpers import PLUGINS_DIR, REPO_ROOT, check_run, lm_data_case, run_tool, run_tools_batch, tool_env

FLAGS = ["--stability-monitor", "mon", "--stability-guard", "--stability-guard-threshold", "7"]


def _parser(kind: str):
    from fairseq import options

    return {"train": options.get_training_parser,
            "generate": options.get_generation_parser,
            "interactive": lambda: options.get_generation_parser(interactive=True),
            "eval-lm": options.get_eval_lm_parser}[kind]()


@pytest.mark.parametrize("kind", ["generate", "interactive", "eval-lm"])
@pytest.mark.parametrize("flag", ["--stability-monitor", "--stability-guard", "--stability-guard-threshold"])
def test_tools_without_a_training_step_reject_the_flags(kind, flag, tmp_path, capsys):
    """fairseq-generate/-interactive call ``add_checkpoint_args`` too; the flags would be accepted there and do
    nothing. Like fairseq-eval-lm, they reject them as unknown (argparse's exit status 2)."""
    from fairseq import options

    parser = _parser(kind)
    assert not any(flag in action.option_strings for action in parser._actions)
    value = [] if flag == "--stability-guard" else ["7" if flag.endswith("threshold") else str(tmp_path / "mon")]
    with pytest.raises(SystemExit) as exit:
        options.parse_args_and_arch(parser, [str(tmp_path), flag, *value])
    assert exit.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err
    assert not (tmp_path / "mon").exists()


def test_the_training_parser_still_has_every_flag():
    parser = _parser("train")
    for flag in ("--stability-monitor", "--stability-monitor-interval", "--stability-guard",
                 "--stability-guard-threshold", "--stability-guard-max-lr-cuts"):
        assert sum(flag in action.option_strings for action in parser._actions) == 1, flag


#: fairseq.trainer imported BEFORE the plugins (as fairseq-train does): its own name for the conversion, which a
#: Trainer built from a Namespace uses, must carry the flags too
_TRAINER_FIRST = r"""
import sys
import fairseq.trainer
import fairseq_plugins
from fairseq import options
args = options.parse_args_and_arch(options.get_training_parser(), [sys.argv[1], "--arch", "transformer",
    "--optimizer", "adam", "--stability-guard", "--stability-guard-threshold", "7"])
cfg = fairseq.trainer.convert_namespace_to_omegaconf(args)
print(cfg.common.get("stability_guard"), cfg.common.get("stability_guard_threshold"))
"""


def test_a_trainer_module_imported_before_the_plugins_carries_the_flags(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _TRAINER_FIRST, str(tmp_path)], cwd=REPO_ROOT, env=tool_env(),
                          text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["True", "7.0"], proc.stdout[-2000:]


LM_ARGS = ["--task", "language_modeling", "--arch", "transformer_lm", "--decoder-layers", "1",
           "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
           "--tokens-per-sample", "32", "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "256", "--cpu",
           "--seed", "1", "--no-progress-bar", "--log-interval", "1", "--log-format", "simple", "--num-workers", "0"]


@pytest.mark.slow
def test_a_checkpoint_trained_with_the_flags_resumes_and_loads_without_them(tmp_path):
    """cfg.common of the checkpoint holds the flags: resuming without them (the command line wins) starts no
    monitor or guard and writes nothing into the old monitor directory; fairseq-generate rejects them; stock
    fairseq-eval-lm (no --user-dir) loads the checkpoint."""
    data, preprocess = lm_data_case(tmp_path / "lm", sizes=(120, 20, 20))
    mon, ck = tmp_path / "mon", tmp_path / "ck"
    # fairseq-preprocess and the first training run in one fairseq process (its start-up paid once)
    for run in run_tools_batch([
            preprocess,
            ("train", [data, "--user-dir", PLUGINS_DIR, *LM_ARGS, "--max-update", "2", "--save-dir", ck,
                       "--stability-monitor", mon, "--stability-monitor-interval", "1", "--stability-guard"])]):
        check_run(run)
    before = {p: p.stat().st_mtime_ns for p in mon.rglob("*")}
    assert (mon / "monitor.jsonl").read_text().count("\n") == 2

    # the restart and fairseq-generate in one fairseq process (its start-up paid once)
    resumed, generate = run_tools_batch([
        ("train", [data, "--user-dir", PLUGINS_DIR, *LM_ARGS, "--max-update", "3", "--save-dir", ck]),
        ("generate", [data, "--user-dir", PLUGINS_DIR, "--task", "language_modeling", "--path",
                      ck / "checkpoint_last.pt", "--cpu", "--stability-monitor", mon])])
    check_run(resumed)
    assert "Loaded checkpoint" in resumed.stdout and "done training" in resumed.stdout, resumed.stdout[-2000:]
    assert "stability monitor:" not in resumed.stdout and "stability guard:" not in resumed.stdout
    assert {p: p.stat().st_mtime_ns for p in mon.rglob("*")} == before

    assert generate.returncode == 2 and "unrecognized arguments: --stability-monitor" in generate.stdout

    run_tool("eval-lm", data, "--path", ck / "checkpoint_last.pt", "--cpu", "--tokens-per-sample", "32",
             "--max-tokens", "256")
    assert {p: p.stat().st_mtime_ns for p in mon.rglob("*")} == before
