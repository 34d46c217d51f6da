"""Every plugin flag's bad values, and unusable data, through the real fairseq command-line tools.

The contract: one line ``fairseq-<tool>: error: <flag> ...`` naming the flag and the accepted values,
exit status 2 (like argparse), before any data is loaded -- no traceback. The data directories
given here hold files that would fail differently if they were read, so a message about the flag
proves the check came first.
"""

import sys
from pathlib import Path

import pytest

from fairseq_helpers import PLUGINS_DIR, REPO_ROOT, run_tool_batch, tool_env

# every fairseq-train run below runs in one process (tool_runs): fairseq's start-up is paid once per module
# (xdist_group keeps the module on one worker under `pytest --dist loadgroup`, as make test runs it)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("fairseq_flag_checks")]

LISTOPS = ["--user-dir", PLUGINS_DIR, "--task", "listops", "--arch", "listops_tree",
           "--criterion", "listops_cross_entropy", "--optimizer", "adam", "--lr", "1e-3",
           "--batch-size", "2", "--max-update", "1", "--cpu", "--no-save", "--num-workers", "0"]
ADMIN = ["--user-dir", PLUGINS_DIR, "--task", "translation", "--arch", "transformer_admin",
         "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "100", "--cpu", "--no-save"]


@pytest.fixture(scope="module")
def unreadable_listops(tmp_path_factory):
    """A ListOps directory whose files are not ListOps: reading them would fail with another message."""
    root = tmp_path_factory.mktemp("unreadable_listops")
    for split in ("train", "valid"):
        (root / f"{split}.tsv").write_text("this is not listops\n")
    return root


def assert_one_line(proc, tool: str, *needles: str, status: int = 2):
    err = proc.stdout.strip().splitlines()
    assert proc.returncode == status, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert err[-1].startswith(f"fairseq-{tool}: error: "), proc.stdout[-3000:]
    for needle in needles:
        assert needle in err[-1], err[-1]
    assert not any("loaded" in line and "examples" in line for line in err), "data was loaded before the check"


LISTOPS_CASES = [
    (["--tau", "0"], ["--tau", "> 0"]),
    (["--gap", "-1"], ["--gap", ">= 0"]),
    (["--gumbel-rao-k", "0"], ["--gumbel-rao-k", ">= 1"]),
    (["--hidden-dim", "0"], ["--hidden-dim", ">= 1"]),
    (["--dropout", "1.5"], ["--dropout", "[0, 1)"]),
    (["--max-train-length", "-3"], ["--max-train-length", ">= 0"]),
    (["--optimizer", "addsign", "--sign-beta", "1.5"], ["--sign-beta", "[0, 1)"]),
    (["--optimizer", "powersign", "--sign-alpha", "-1"], ["--sign-alpha", "> 0"]),
    (["--optimizer", "addsign", "--weight-decay", "-1"], ["--weight-decay", ">= 0"]),
    (["--optimizer", "addsign", "--sign-decay", "linear", "--sign-decay-periods", "2"],
     ["--sign-decay-periods", "cosine or restart"]),
    (["--optimizer", "addsign", "--sign-decay", "none", "--sign-decay-zero-after", "1"],
     ["--sign-decay-zero-after", "cosine or restart"]),
    (["--optimizer", "powersign", "--sign-decay", "cosine", "--sign-decay-periods", "0"],
     ["--sign-decay-periods", "> 0"]),
    (["--optimizer", "powersign", "--sign-decay", "restart", "--sign-decay-steps", "0"],
     ["--sign-decay-steps", ">= 1"]),
    (["--optimizer", "addsign", "--sign-decay", "cosine", "--max-update", "0"], ["--sign-decay-steps"]),
]
ADMIN_CASES = [
    (["--admin-profile", "/tmp/p.json"], ["--admin-profile", "--admin-init profiled"]),
    (["--admin-init", "profiled", "--admin-profile", "/no/such/dir/p.json"], ["--admin-profile", "does not exist"]),
    (["--encoder-normalize-before"], ["--encoder-normalize-before", "--arch transformer"]),
    (["--decoder-normalize-before"], ["--decoder-normalize-before"]),
    (["--admin-init", "deepnorm", "--encoder-as-parameter"], ["--encoder-as-parameter", "--admin-init admin"]),
    # a plugin flag's bad value is refused whether or not its feature is on (no --moe-experts here)
    (["--moe-tau", "-1"], ["--moe-tau", "> 0", "got -1.0"]),
    (["--moe-capacity-factor", "nan"], ["--moe-capacity-factor", ">= 0"]),
]


SPLIT_CASES = [  # (train.tsv, flags, needle)
    ("", [], "the file is empty"),
    ("0\t( ( ( [MIN 0 ) 1 ) ] )\n", ["--max-train-length", "3"], "longer than --max-train-length 3"),
]


def listops_dir(root: Path, train: str) -> Path:
    root.mkdir()
    (root / "train.tsv").write_text(train)
    (root / "valid.tsv").write_text("0\t( ( ( [MIN 0 ) 1 ) ] )\n")
    return root


@pytest.fixture(scope="module")
def tool_runs(unreadable_listops, tmp_path_factory):
    """Every fairseq-train run of this module (the refusals and one good run), in one process (fairseq's start-up
    is paid once): (kind, case index) -> its run."""
    no_data = tmp_path_factory.mktemp("admin") / "no-data-here"
    cases = {("listops", i): [unreadable_listops, *LISTOPS, *flags] for i, (flags, _) in enumerate(LISTOPS_CASES)}
    cases.update({("admin", i): [no_data, *ADMIN, *flags] for i, (flags, _) in enumerate(ADMIN_CASES)})
    cases[("missing", 0)] = [tmp_path_factory.mktemp("missing") / "missing", *LISTOPS]
    root = tmp_path_factory.mktemp("splits")
    cases.update({("split", i): [listops_dir(root / f"split{i}", train), *LISTOPS, *flags]
                  for i, (train, flags, _) in enumerate(SPLIT_CASES)})
    good = listops_dir(root / "good", "0\t( ( ( [MIN 0 ) 1 ) ] )\n3\t( ( ( [SM 1 ) 2 ) ] )\n")
    cases[("good", 0)] = [good, *LISTOPS, "--optimizer", "powersign", "--sign-decay", "cosine",
                          "--sign-decay-periods", "1", "--tau", "1.3"]
    runs = run_tool_batch("train", list(cases.values()))
    return dict(zip(cases, runs))


@pytest.mark.parametrize("case", range(len(LISTOPS_CASES)), ids=[" ".join(f) for f, _ in LISTOPS_CASES])
def test_listops_and_optimizer_flags(tool_runs, case):
    assert_one_line(tool_runs["listops", case], "train", *LISTOPS_CASES[case][1])


@pytest.mark.parametrize("case", range(len(ADMIN_CASES)), ids=[" ".join(f) for f, _ in ADMIN_CASES])
def test_transformer_admin_flags(tool_runs, case):
    assert_one_line(tool_runs["admin", case], "train", *ADMIN_CASES[case][1])


def test_listops_data_dir_is_checked_first(tool_runs):
    assert_one_line(tool_runs["missing", 0], "train", "DATA must be a directory")


@pytest.mark.parametrize("case", range(len(SPLIT_CASES)), ids=["empty", "filtered"])
def test_empty_or_fully_filtered_training_set_is_one_line(tool_runs, case):
    needle = SPLIT_CASES[case][2]
    proc = tool_runs["split", case]
    err = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stdout and "IndexError" not in proc.stdout
    assert err.startswith("fairseq-train: error: ListOps split 'train'") and needle in err


def test_good_flags_still_train(tool_runs):
    proc = tool_runs["good", 0]  # powersign, cosine decay over 1 period, --tau 1.3
    assert proc.returncode == 0, proc.stdout[-3000:]


# ---------------------------------------------------------------- fold_checkpoint

def fold_cli(*args):
    import subprocess
    return subprocess.run([sys.executable, "-m", "fairseq_plugins.fold_checkpoint", *map(str, args)],
                          cwd=REPO_ROOT, env=tool_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("case, needle", [
    ("missing", "not found"), ("directory", "is a directory"), ("no-dir", "does not exist"),
    ("same", "is the input"), ("same-other-spelling", "is the input"),
])
def test_fold_checkpoint_bad_paths_write_nothing(tmp_path, capsys, case, needle):
    from fairseq_plugins.fold_checkpoint import main
    ckpt = tmp_path / "checkpoint_last.pt"
    ckpt.write_bytes(b"training state that must survive")
    args = {"missing": (tmp_path / "missing.pt", tmp_path / "out.pt"), "directory": (tmp_path, tmp_path / "out.pt"),
            "no-dir": (ckpt, tmp_path / "no-dir" / "out.pt"), "same": (ckpt, ckpt),
            "same-other-spelling": (ckpt, tmp_path / "." / "checkpoint_last.pt")}[case]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("python -m fairseq_plugins.fold_checkpoint: error:")
    assert ckpt.read_bytes() == b"training state that must survive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.pt"]


def test_fold_checkpoint_command_line_refuses_its_input_as_output(tmp_path):
    """The real command: one line, exit 2, the input untouched."""
    ckpt = tmp_path / "checkpoint_last.pt"
    ckpt.write_bytes(b"training state that must survive")
    proc = fold_cli(ckpt, ckpt)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "is the input" in lines[0], proc.stdout
    assert ckpt.read_bytes() == b"training state that must survive"
