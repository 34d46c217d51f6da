"""tools/patch_fairseq_imports.py attacked as a user would: read-only files and directories, a write that fails
half-way, a leftover temporary that is a link, symbolic and hard links into a shared cache, LF files, one file
already repaired (the installed fairseq's metrics, keyword calls included: test_patch_fairseq_imports.py)."""

import errno
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "patch_fairseq_imports.py"
NAMES = ("criterions/sentence_prediction.py", "tasks/audio_classification.py")

# the lines of fairseq 0.12.3's two files the tool edits, as they stand there (CRLF line endings)
SENTENCE_PREDICTION = '''import numpy as np
from sklearn.metrics import f1_score
from sklearn.metrics import matthews_corrcoef as _matthews_corrcoef
from scipy.stats import pearsonr, spearmanr


def simple_accuracy(preds, labels):
    return (preds == labels).mean()
'''
AUDIO_CLASSIFICATION = '''import numpy as np
from sklearn import metrics as sklearn_metrics


def _compute_eer(target_list, lprobs):
    if True:
        if True:
            fpr, tpr, thresholds = sklearn_metrics.roc_curve(target_list, lprobs)
            return fpr, tpr
'''


def _load_tool():
    """The tool as a module, its directory first on the import path as when it runs as a script (it imports
    ``installed_package`` from beside it)."""
    spec = importlib.util.spec_from_file_location("patch_fairseq_imports_under_test", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(TOOL.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(TOOL.parent))
    return module


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=60)


def _snapshot(root: Path):
    """Every file under root (names, bytes, modes), the temporaries included."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode) for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(params=["\r\n", "\n"], ids=["crlf", "lf"])
def fake_fairseq(tmp_path, request) -> Path:
    root = tmp_path / "fairseq"
    for name, text in zip(NAMES, (SENTENCE_PREDICTION, AUDIO_CLASSIFICATION)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.replace("\n", request.param).encode())
    return root


def _one_line_exit_2(proc, word):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and word in proc.stderr, proc.stderr


def test_a_read_only_file_is_one_line_exit_2_and_nothing_changes(fake_fairseq):
    # the second file read-only: the first, writable, must not be repaired alone (no write bit: read-only for
    # root too)
    (fake_fairseq / NAMES[1]).chmod(0o444)
    before = _snapshot(fake_fairseq)
    _one_line_exit_2(_run(fake_fairseq), "read-only")
    assert _snapshot(fake_fairseq) == before


def test_a_read_only_directory_is_one_line_exit_2_and_nothing_changes(fake_fairseq):
    tasks = fake_fairseq / "tasks"
    if os.geteuid() != 0:
        tasks.chmod(0o555)
        undo = lambda: tasks.chmod(0o755)  # noqa: E731
    else:  # root writes any directory whatever its mode: an immutable one, where the file system allows it
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(tasks)]).returncode != 0:
            pytest.skip("root, and no chattr +i here: no read-only directory to test with")
        undo = lambda: subprocess.run(["chattr", "-i", str(tasks)], check=True)  # noqa: E731
    try:
        before = _snapshot(fake_fairseq)
        _one_line_exit_2(_run(fake_fairseq), "read-only")
        assert _snapshot(fake_fairseq) == before
    finally:
        undo()


@pytest.mark.parametrize("fail_at", ["write", "replace"])
def test_a_write_failing_half_way_leaves_both_files_as_they_were(fake_fairseq, monkeypatch, capsys, fail_at):
    """A full disk while writing the second file, or its rename failing: both files unrepaired, no temporary
    left, one line and exit 2."""
    tool = _load_tool()
    before = _snapshot(fake_fairseq)
    calls = []

    def failing(real):
        def call(*args, **kwargs):
            if fail_at == "replace" or "w" in (args[1:2] or [kwargs.get("mode", "r")])[0]:
                calls.append(args)
                if len(calls) == 2:  # the second file's
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)
        return call

    if fail_at == "replace":
        monkeypatch.setattr(tool.os, "replace", failing(os.replace))
    else:  # every open for writing in the tool's module (the module's `open` shadows the builtin)
        monkeypatch.setattr(tool, "open", failing(open), raising=False)
    assert tool.main([str(fake_fairseq)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "No space left" in err
    monkeypatch.undo()
    assert _snapshot(fake_fairseq) == before
    assert _run(fake_fairseq).returncode == 0  # and a later run repairs both


def test_a_leftover_temporary_that_is_a_link_is_not_written_through(fake_fairseq, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for name in NAMES:
        leftover = (fake_fairseq / name).with_name(f".{Path(name).name}.tmp")  # an earlier run's temporary
        leftover.symlink_to(victim)
    proc = _run(fake_fairseq)
    assert proc.returncode == 0 and "2 file(s) repaired" in proc.stdout, proc.stderr
    assert victim.read_text() == "keep me"
    assert all(not (fake_fairseq / n).is_symlink() and b"patch_fairseq_imports" in (fake_fairseq / n).read_bytes()
               for n in NAMES)


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_linked_file_is_replaced_under_its_name_and_its_cache_copy_kept(fake_fairseq, tmp_path, link):
    """An installer that links the package's files to its cache (uv's link modes): the cache stays as it was."""
    cache = tmp_path / "cache"
    cache.mkdir()
    originals = {}
    for name in NAMES:
        target = cache / Path(name).name
        shutil.move(fake_fairseq / name, target)
        originals[name] = target.read_bytes()
        (fake_fairseq / name).symlink_to(target) if link == "symlink" else os.link(target, fake_fairseq / name)
    proc = _run(fake_fairseq)
    assert proc.returncode == 0 and "2 file(s) repaired" in proc.stdout, proc.stderr
    for name in NAMES:
        assert (cache / Path(name).name).read_bytes() == originals[name]
        assert b"patch_fairseq_imports" in (fake_fairseq / name).read_bytes()


def test_a_failed_rename_puts_a_symbolic_link_back_as_the_link(fake_fairseq, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in NAMES:
        shutil.move(fake_fairseq / name, cache / Path(name).name)
        (fake_fairseq / name).symlink_to(cache / Path(name).name)
    before = _snapshot(cache)
    tool = _load_tool()
    real, calls = os.replace, []

    def failing(*args):
        calls.append(args)
        if len(calls) == 2:  # the second file's rename
            raise OSError(errno.EIO, "Input/output error")
        return real(*args)

    monkeypatch.setattr(tool.os, "replace", failing)
    assert tool.main([str(fake_fairseq)]) == 2 and "Input/output error" in capsys.readouterr().err
    monkeypatch.undo()
    assert _snapshot(cache) == before
    assert all((fake_fairseq / n).is_symlink() and (fake_fairseq / n).resolve() == (cache / Path(n).name).resolve()
               for n in NAMES)
    assert sorted(p.name for p in fake_fairseq.rglob("*")) == ["audio_classification.py", "criterions",
                                                                 "sentence_prediction.py", "tasks"]


def test_one_file_repaired_and_the_other_not_ends_as_both_repaired(fake_fairseq, tmp_path):
    eol = b"\r\n" if b"\r\n" in (fake_fairseq / NAMES[1]).read_bytes() else b"\n"
    reference = tmp_path / "reference"
    shutil.copytree(fake_fairseq, reference)
    assert _run(reference).returncode == 0
    shutil.copy2(reference / NAMES[0], fake_fairseq / NAMES[0])  # an interrupted run of another version
    proc = _run(fake_fairseq)
    assert proc.returncode == 0 and "1 file(s) repaired" in proc.stdout, proc.stderr
    for name in NAMES:
        data = (fake_fairseq / name).read_bytes()
        assert data == (reference / name).read_bytes()
        # the file's own line ending throughout: no bare LF in a CRLF file, no CR in an LF one
        assert data.count(b"\n") == data.count(eol) and (b"\r" in data) == (eol == b"\r\n")
    assert sorted(p.name for p in fake_fairseq.rglob("*") if p.is_file()) == sorted(Path(n).name for n in NAMES)
