"""No tracked file names a directory of the machine it was written on: code defaults to paths under the
repository or the system's temporary directory, and committed results record paths relative to the repository
(``benchmarks.sweep.repo_relative``). A clone elsewhere must read and rerun everything as it is."""

import re
import shutil
import subprocess

import pytest

from benchmarks.sweep import REPO, recorded_args, recorded_command, repo_relative

# the home directories of this project's machines and of typical Linux users, as absolute paths
MACHINE_PATH = re.compile(r"(?<![\w.$<>~-])/(?:work|root|home/\w+)/")


def _tracked_files():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    return [name for name in out.stdout.decode().split("\0") if name]


def test_no_tracked_file_holds_a_machine_path():
    offenders = []
    for name in _tracked_files():
        # .gitignore's "/work/" is a pattern relative to the repository root; this file holds examples
        if name in (".gitignore", "tests/packaging/test_machine_paths.py"):
            continue
        path = REPO / name
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (plots)
        for number, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                offenders.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not offenders, "machine paths in tracked files:\n" + "\n".join(offenders)


@pytest.mark.parametrize("line, found", [
    ('"work": "/work/main/work/lm"', True),
    ("WORK = Path('/root/runs')", True),
    ("cd /home/alice/x", True),
    ("default <repo>/work/lm", False),
    ('"work": "work/lm"', False),
    ("$REPO_DIR/work/lm", False),
])
def test_the_pattern_tells_machine_paths_from_repository_paths(line, found):
    assert bool(MACHINE_PATH.search(line)) is found


def test_results_record_paths_relative_to_the_repository(tmp_path):
    import argparse

    args = argparse.Namespace(work=REPO / "work" / "x", data=str(REPO.parent / "shared" / "data"), out=tmp_path,
                              seeds="1,2", lr=0.5, steps=3, name=None)
    got = recorded_args(args)
    assert got["work"] == "work/x" and got["data"] == "../shared/data"
    assert not got["out"].startswith("/") and got["lr"] == 0.5 and got["steps"] == 3 and got["name"] is None
    assert repo_relative("relative/already") == "relative/already"
    command = recorded_command("benchmarks.x", ["--work", str(tmp_path), "--seeds", "1,2"])
    assert str(tmp_path) not in command and command.endswith("--seeds 1,2")
