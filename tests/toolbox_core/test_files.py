"""`toolbox_core.files`: `atomic_write` (a temporary file beside the target, renamed over it on success),
`publish_directory` (a whole directory swapped in atomically, one writer at a time) and `check_output_path` (an
output that is a directory, lacks its directory, or is one of the inputs is refused).

The contract is ``open``'s where it applies: the same error class and errno for the same situation, "x" refusing
an existing file, read and append modes refused naming ``mode``. Concurrency is tested with real processes.

Atomicity is observed from outside: while the body runs the target still holds the old bytes (a reader never
sees a half-written file), a body that raises leaves the old file and no temporary behind, and the new file has
the permissions a plain ``open()`` would give it under the process umask, not ``mkstemp``'s 0600.
"""

import errno
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolbox_core import files
from toolbox_core.files import atomic_write, check_output_path, publish_directory


@pytest.fixture
def umask():
    """``os.umask``, to set the process umask in the test; the previous umask comes back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def listing(path):
    return sorted(os.listdir(path))


# ------------------------------------------------------------------ atomic_write


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    with atomic_write(target) as f:
        f.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["f.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600


def test_readers_see_the_old_file_until_the_body_ends(tmp_path):
    target = tmp_path / "data.tsv"
    target.write_text("old\n")
    inode = target.stat().st_ino
    with atomic_write(target) as f:
        f.write("new\n" * 1000)
        f.flush()
        assert target.read_text() == "old\n" and target.stat().st_ino == inode
        (tmp,) = [name for name in listing(tmp_path) if name != "data.tsv"]  # beside the target: same file system
        assert tmp.startswith(".data.tsv.") and tmp.endswith(".tmp")
    assert target.read_text() == "new\n" * 1000 and target.stat().st_ino != inode  # renamed over, not rewritten
    assert listing(tmp_path) == ["data.tsv"]


def test_a_new_file_is_created(tmp_path):
    target = tmp_path / "out.json"
    with atomic_write(str(target)) as f:  # a str path as well as a Path
        f.write("{}")
    assert target.read_text() == "{}" and listing(tmp_path) == ["out.json"]


def test_binary_mode_and_open_arguments(tmp_path):
    with atomic_write(tmp_path / "blob.bin", "wb") as f:
        f.write(b"\x00\xff")
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\xff"
    with atomic_write(tmp_path / "text.txt", encoding="latin-1", newline="\r\n") as f:
        f.write("caf\xe9\n")
    assert (tmp_path / "text.txt").read_bytes() == b"caf\xe9\r\n"


@pytest.mark.parametrize("error", [RuntimeError("crash"), KeyboardInterrupt(), SystemExit(3)])
@pytest.mark.parametrize("existed", [True, False])
def test_a_body_that_raises_leaves_the_old_state_and_no_temporary(tmp_path, error, existed):
    target = tmp_path / "f.txt"
    if existed:
        target.write_text("old")
    with pytest.raises(type(error)):
        with atomic_write(target) as f:
            f.write("partial")
            raise error
    assert listing(tmp_path) == (["f.txt"] if existed else [])
    if existed:
        assert target.read_text() == "old"


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o000])
@pytest.mark.parametrize("existed", [True, False])
def test_permissions_follow_the_umask_as_open_would(tmp_path, umask, mask, existed):
    umask(mask)
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as f:  # what open() gives a new file under this umask
        f.write("x")
    target = tmp_path / "f.txt"
    if existed:
        target.write_text("old")
    with atomic_write(target) as f:
        f.write("new")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~mask


@pytest.mark.parametrize("permissions", [0o640, 0o600, 0o755])
def test_a_replaced_file_keeps_its_permissions(tmp_path, permissions):
    target = tmp_path / "f.txt"
    target.write_text("old")
    os.chmod(target, permissions)
    with atomic_write(target) as f:
        f.write("new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == permissions


def test_a_symlink_is_written_through(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    with atomic_write(link) as f:
        f.write("new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "real.txt"]


def test_a_missing_directory_fails_before_the_body_runs(tmp_path):
    ran = []
    with pytest.raises(FileNotFoundError):
        with atomic_write(tmp_path / "missing" / "f.txt"):
            ran.append(True)
    assert not ran and listing(tmp_path) == []


# ------------------------------------------------------------------ check_output_path


def test_check_output_path(tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes(b"x")
    with pytest.raises(ValueError, match="is the input"):
        check_output_path(src, [src])
    with pytest.raises(ValueError, match="is the input"):
        check_output_path(tmp_path / "." / "in.pt", [src])
    with pytest.raises(ValueError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "out.pt", [src])
    with pytest.raises(ValueError, match="is a directory"):
        check_output_path(tmp_path, [src])
    assert check_output_path(tmp_path / "out.pt", [src]) == tmp_path / "out.pt"


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "data" / "in.pt"
    src.parent.mkdir()
    src.write_bytes(b"weights")
    return src


def test_a_fresh_output_comes_back_as_a_path(tmp_path, source):
    out = check_output_path(str(tmp_path / "out.pt"), [source, tmp_path / "never-written.pt"])
    assert out == tmp_path / "out.pt" and isinstance(out, os.PathLike)
    existing = tmp_path / "old-out.pt"
    existing.write_bytes(b"old")
    assert check_output_path(existing, [source]) == existing  # overwriting a non-input is allowed
    assert check_output_path(existing) == existing


@pytest.mark.parametrize("name", ["output", "--save"])
def test_a_directory_is_refused_naming_the_argument(tmp_path, name):
    with pytest.raises(ValueError, match=rf"^{name} {tmp_path} is a directory; give a file name$"):
        check_output_path(tmp_path, name=name)


def test_a_missing_parent_is_refused_naming_it(tmp_path):
    out = tmp_path / "no" / "such" / "out.pt"
    with pytest.raises(ValueError, match=rf"^output {out}: directory {out.parent} does not exist$"):
        check_output_path(out)


def make_same_file(kind, source, tmp_path):
    """Another name for ``source``: a relative path, a path through ``..``, a symlink to it, a hard link to it,
    or a symlinked directory above it."""
    if kind == "relative":
        return os.path.relpath(source)
    if kind == "dotdot":
        return source.parent / ".." / source.parent.name / source.name
    if kind == "symlink":
        link = tmp_path / "link.pt"
        link.symlink_to(source)
        return link
    if kind == "hardlink":
        link = tmp_path / "hard.pt"
        os.link(source, link)
        return link
    linked_dir = tmp_path / "alias"
    linked_dir.symlink_to(source.parent, target_is_directory=True)
    return linked_dir / source.name


@pytest.mark.parametrize("kind", ["relative", "dotdot", "symlink", "hardlink", "symlinked_dir"])
@pytest.mark.parametrize("as_output", [True, False])
def test_the_same_file_under_another_name_is_refused(tmp_path, source, kind, as_output, monkeypatch):
    """Whichever side (output or input) carries the other name, and among several inputs."""
    monkeypatch.chdir(tmp_path)
    other = make_same_file(kind, source, tmp_path)
    out, inputs = (other, [tmp_path / "unrelated.pt", source]) if as_output else (source, [other])
    with pytest.raises(ValueError, match=r"is the input .*; write to another file \(inputs are never overwritten\)$"):
        check_output_path(out, inputs)
    assert source.read_bytes() == b"weights"


def test_a_symlink_output_pointing_at_a_future_input_location_is_refused(tmp_path):
    """Neither exists yet, but both names resolve to the same path."""
    link = tmp_path / "out.pt"
    link.symlink_to(tmp_path / "later.pt")
    with pytest.raises(ValueError, match="is the input"):
        check_output_path(link, [tmp_path / "later.pt"])


# ------------------------------------------------------------------ atomic_write: open()'s conventions


def test_mode_x_refuses_an_existing_file_before_the_body_runs(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    ran = []
    with pytest.raises(FileExistsError):
        with atomic_write(target, "x"):
            ran.append(True)
    assert not ran and target.read_text() == "old" and listing(tmp_path) == ["f.txt"]


@pytest.mark.parametrize("mode", ["x", "xb", "x+"])
def test_mode_x_creates_a_missing_file(tmp_path, mode):
    with atomic_write(tmp_path / "f", mode) as f:
        f.write(b"new" if "b" in mode else "new")
    assert (tmp_path / "f").read_bytes() == b"new" and listing(tmp_path) == ["f"]


def test_mode_x_never_overwrites_a_file_created_while_the_body_runs(tmp_path):
    """Another process creates the file after the check: the rename refuses atomically, the other file stays."""
    target = tmp_path / "f.txt"
    with pytest.raises(FileExistsError):
        with atomic_write(target, "x") as f:
            f.write("mine")
            target.write_text("theirs")
    assert target.read_text() == "theirs" and listing(tmp_path) == ["f.txt"]


def test_mode_x_counts_a_dangling_symlink_as_existing(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        with atomic_write(tmp_path / "link", "x"):
            pass
    assert listing(tmp_path) == ["link"] and (tmp_path / "link").is_symlink()


@pytest.mark.parametrize("mode", ["a", "ab", "a+", "at"])
def test_append_modes_are_refused_naming_mode_and_the_accepted_ones(tmp_path, mode):
    target = tmp_path / "log.txt"
    target.write_text("old\n")
    with pytest.raises(ValueError, match=rf"^mode '{re.escape(mode)}': atomic_write replaces the whole file and does "
                                         r"not append.*accepted: 'w', 'wb'"):
        with atomic_write(target, mode):
            pytest.fail("the body ran")
    assert target.read_text() == "old\n" and listing(tmp_path) == ["log.txt"]


@pytest.mark.parametrize("mode", ["r", "rb", "r+", "rt", "r+b"])
def test_read_modes_are_refused_and_the_file_is_not_emptied(tmp_path, mode):
    target = tmp_path / "data.txt"
    target.write_text("precious")
    with pytest.raises(ValueError, match=rf"^mode '{re.escape(mode)}': atomic_write writes a new file; a read mode"):
        with atomic_write(target, mode):
            pytest.fail("the body ran")
    assert target.read_text() == "precious" and listing(tmp_path) == ["data.txt"]


@pytest.mark.parametrize("mode", ["", "ww", "wx", "wbt", "wz", "w b", "U"])
def test_malformed_modes_are_refused(tmp_path, mode):
    with pytest.raises(ValueError, match=r"^mode .* is not a write mode; accepted: "):
        with atomic_write(tmp_path / "f", mode):
            pass
    assert listing(tmp_path) == []


@pytest.mark.parametrize("mode", ["w+", "w+b", "bw", "tw", "+x"])
def test_write_modes_in_any_letter_order_are_accepted(tmp_path, mode):
    with atomic_write(tmp_path / "f", mode) as f:
        f.write(b"ab" if "b" in mode else "ab")
        if "+" in mode:
            f.seek(0)
            assert f.read() in (b"ab", "ab")
    assert (tmp_path / "f").read_bytes() == b"ab"


@pytest.mark.parametrize("path,mode,kwargs,error,match", [
    (None, "w", {}, TypeError, "^path must be a path"),
    (b"f", "w", {}, TypeError, "^path must be a path"),
    ("", "w", {}, ValueError, "^path must be a non-empty path"),
    ("f", 1, {}, TypeError, "^mode must be a str"),
    ("f", "w", {"encoding": "no-such-codec"}, ValueError, "^encoding / errors: unknown encoding"),
    ("f", "w", {"errors": "no-such-handler"}, ValueError, "^errors: unknown error handler"),
    ("f", "wb", {"encoding": "utf-8"}, ValueError, "encoding"),
    ("f", "w", {"newline": "x"}, ValueError, "newline"),
    ("f", "w", {"closefd": False}, TypeError, r"not \['closefd'\]"),
])
def test_bad_arguments_are_named_and_nothing_is_created(tmp_path, monkeypatch, path, mode, kwargs, error, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        with atomic_write(path, mode, **kwargs):
            pytest.fail("the body ran")
    assert listing(tmp_path) == []


def test_a_directory_target_is_refused_as_open_would(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        with atomic_write(tmp_path / "d"):
            pytest.fail("the body ran")
    assert listing(tmp_path) == ["d"] and listing(tmp_path / "d") == []


def test_a_symlink_loop_is_refused_and_left(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(OSError) as info:
        with atomic_write(tmp_path / "a"):
            pytest.fail("the body ran")
    assert info.value.errno == errno.ELOOP
    assert listing(tmp_path) == ["a", "b"] and (tmp_path / "a").is_symlink()


@pytest.fixture
def read_only():
    """``read_only(path)``: chmod ``path`` a-w; write permission comes back after the test (for its clean-up)."""
    done = []

    def make(path):
        os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) & ~0o222)
        done.append(path)
    yield make
    for path in done:
        os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) | 0o200)


def test_a_read_only_file_is_refused_and_kept(tmp_path, read_only):
    """open() refuses it (root aside); atomic_write would replace it by rename: refused for root too."""
    target = tmp_path / "f.txt"
    target.write_text("protected")
    read_only(target)
    with pytest.raises(PermissionError, match="is read-only"):
        with atomic_write(target):
            pytest.fail("the body ran")
    assert target.read_text() == "protected" and listing(tmp_path) == ["f.txt"]


@pytest.mark.parametrize("existed", [True, False])
def test_a_read_only_directory_is_refused_and_unchanged(tmp_path, read_only, existed):
    directory = tmp_path / "ro"
    directory.mkdir()
    if existed:
        (directory / "f.txt").write_text("old")
    read_only(directory)
    with pytest.raises(PermissionError, match="its directory .* is read-only"):
        with atomic_write(directory / "f.txt"):
            pytest.fail("the body ran")
    assert listing(directory) == (["f.txt"] if existed else [])


def _failing(monkeypatch, module, name, error):
    real = getattr(module, name)
    calls = []

    def fail(*args, **kwargs):
        calls.append(args)
        raise error
    monkeypatch.setattr(module, name, fail)
    return real, calls


@pytest.mark.parametrize("call", ["fsync", "replace"])
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failure_after_the_body_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, call, error):
    """A full disk seen only at the fsync, a rename that fails, Ctrl-C at either point."""
    target = tmp_path / "f.txt"
    target.write_text("old")
    _failing(monkeypatch, os, call, error)
    with pytest.raises(type(error)):
        with atomic_write(target) as f:
            f.write("new" * 1000)
    monkeypatch.undo()
    assert target.read_text() == "old" and listing(tmp_path) == ["f.txt"]


def test_the_file_then_its_directory_are_synced_around_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    target = tmp_path / "f.txt"
    with atomic_write(target) as f:
        f.write("x")
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(str(tmp_path / ".f.txt.")) and events[1][1] == str(target)
    assert events[2][1] == str(tmp_path)  # the rename itself made durable


def test_a_body_that_closes_the_file_still_publishes_it(tmp_path):
    with atomic_write(tmp_path / "f.txt") as f:
        f.write("done")
        f.close()
    assert (tmp_path / "f.txt").read_text() == "done" and listing(tmp_path) == ["f.txt"]


def test_the_temporary_name_carries_the_process_id(tmp_path):
    with atomic_write(tmp_path / "f.txt") as f:
        (tmp,) = [n for n in listing(tmp_path) if n != "f.txt"]
        f.write("x")
    assert tmp.startswith(f".f.txt.{os.getpid()}.") and tmp.endswith(".tmp")


# ------------------------------------------------------------------ publish_directory

REPO = Path(__file__).resolve().parents[2]


def tree(path):
    """{relative file path: content} of a directory, or None when there is none."""
    if not os.path.isdir(path):
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def writer(files_to_write):
    def write(tmp):
        for rel, data in files_to_write.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            Path(tmp, rel).write_bytes(data)
        return len(files_to_write)
    return write


OLD = {"weights.bin": b"old weights", "config.json": b"{}", "tokenizer.json": b"tok", "runs/events": b"e"}
NEW = {"weights.bin": b"new weights", "config.json": b'{"new": 1}'}


@pytest.fixture
def ckpt(tmp_path):
    """An existing checkpoint directory ``tmp_path/"ckpt"`` holding OLD."""
    path = tmp_path / "ckpt"
    writer(OLD)(path)
    return path


def kept(entry):
    return os.path.basename(entry) in ("tokenizer.json", "runs")


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_publish_replaces_the_directory_and_carries_what_keep_keeps(ckpt, tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    inode = ckpt.stat().st_ino
    assert publish_directory(ckpt, writer(NEW), keep=kept) == 2
    assert tree(ckpt) == {**NEW, "tokenizer.json": b"tok", "runs/events": b"e"}
    assert ckpt.stat().st_ino != inode and listing(tmp_path) == ["ckpt"]
    publish_directory(ckpt, writer(NEW))  # keep nothing: the new content alone
    assert tree(ckpt) == NEW and listing(tmp_path) == ["ckpt"]


def test_publish_creates_a_missing_directory_and_its_parents_under_the_umask(tmp_path, umask):
    umask(0o027)
    out = tmp_path / "a" / "b" / "ckpt"
    publish_directory(str(out), writer(NEW))
    assert tree(out) == NEW and listing(out.parent) == ["ckpt"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # as mkdir makes it, not mkdtemp's 0700


def test_publish_keeps_a_replaced_directorys_permissions(ckpt):
    os.chmod(ckpt, 0o710)
    publish_directory(ckpt, writer(NEW))
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o710


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(),
                                   ValueError("bad state")])
def test_a_write_that_fails_leaves_the_old_directory_and_nothing_beside_it(ckpt, tmp_path, error):
    def write(tmp):
        writer(NEW)(tmp)
        raise error
    with pytest.raises(type(error)):
        publish_directory(ckpt, write, keep=kept)
    assert tree(ckpt) == OLD and listing(tmp_path) == ["ckpt"]  # no temporary directory, no lock file
    publish_directory(ckpt, writer(NEW), keep=kept)  # and the next one works
    assert tree(ckpt)["weights.bin"] == b"new weights"


def test_a_failed_second_rename_puts_the_old_directory_back(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="I/O error"):
        publish_directory(ckpt, writer(NEW))
    monkeypatch.undo()
    assert tree(ckpt) == OLD and listing(tmp_path) == ["ckpt"]


def test_a_killed_writers_leftovers_are_removed_by_the_next_one(ckpt, tmp_path):
    stale = tmp_path / ".ckpt.publish-999999-0badc0de"
    writer({"half": b"x"})(stale)
    (tmp_path / ".ckpt.publish.lock").write_text("pid 999999 on nowhere\n")  # not locked: its process died
    os.chmod(stale, 0o500)  # even a read-only one
    publish_directory(ckpt, writer(NEW))
    assert listing(tmp_path) == ["ckpt"] and tree(ckpt) == NEW
    (tmp_path / ".other.publish-1-1").mkdir()  # another directory's: not ours to remove
    publish_directory(ckpt, writer(NEW))
    assert listing(tmp_path) == [".other.publish-1-1", "ckpt"]


def test_a_read_only_subdirectory_that_is_carried_leaves_no_old_copy_behind(ckpt, tmp_path):
    os.chmod(ckpt / "runs", 0o555)
    try:
        publish_directory(ckpt, writer(NEW), keep=kept)
        assert tree(ckpt)["runs/events"] == b"e" and listing(tmp_path) == ["ckpt"]
        assert stat.S_IMODE((ckpt / "runs").stat().st_mode) == 0o555
    finally:
        os.chmod(ckpt / "runs", 0o755)


def test_a_symlinked_directory_is_published_through(ckpt, tmp_path):
    link = tmp_path / "latest"
    link.symlink_to(ckpt, target_is_directory=True)
    publish_directory(link, writer(NEW))
    assert link.is_symlink() and os.readlink(link) == str(ckpt)
    assert tree(ckpt) == NEW and listing(tmp_path) == ["ckpt", "latest"]


def test_a_file_in_place_of_the_directory_is_refused_intact(tmp_path):
    path = tmp_path / "a_file"
    path.write_bytes(b"precious")
    with pytest.raises(ValueError, match=r"^out must be a directory, got the file .*a_file.*nothing was written"):
        publish_directory(path, writer(NEW), name="out")
    assert path.read_bytes() == b"precious" and listing(tmp_path) == ["a_file"]


@pytest.mark.parametrize("where", ["itself", "inside", "deep_inside"])
def test_the_working_directory_and_those_above_it_are_refused(ckpt, tmp_path, monkeypatch, where):
    """Publishing swaps the directory away: the process would be left in a deleted directory."""
    cwd = {"itself": ckpt, "inside": ckpt / "runs", "deep_inside": ckpt / "runs"}[where]
    monkeypatch.chdir(cwd)
    path = "." if where == "itself" else ".." if where == "inside" else str(ckpt)
    with pytest.raises(ValueError, match=r"is the current working directory or contains it.*Nothing was written"):
        publish_directory(path, writer(NEW))
    assert os.getcwd() == str(cwd) and os.path.samefile(".", cwd)
    assert tree(ckpt) == OLD and listing(tmp_path) == ["ckpt"]
    with pytest.raises(ValueError, match="current working directory"):
        publish_directory(tmp_path, writer(NEW))  # a parent of it too
    monkeypatch.chdir(tmp_path)
    publish_directory("ckpt", writer(NEW))  # from its parent, by its name: fine
    assert tree(ckpt) == NEW


@pytest.mark.parametrize("what", ["directory", "parent", "replaced_file"])
def test_a_read_only_checkpoint_is_refused_untouched(ckpt, tmp_path, read_only, what):
    """No swap-in of a fresh directory with the old one left beside it: PermissionError, nothing changed."""
    read_only({"directory": ckpt, "parent": tmp_path, "replaced_file": ckpt / "weights.bin"}[what])
    with pytest.raises(PermissionError, match=r"is read-only \(mode 0o[0-7]+\); nothing was written"):
        publish_directory(ckpt, writer(NEW), keep=kept, name="save_directory")
    assert tree(ckpt) == OLD and listing(tmp_path) == ["ckpt"]


def test_a_read_only_file_that_is_kept_does_not_block_the_publish(ckpt, read_only):
    read_only(ckpt / "tokenizer.json")
    publish_directory(ckpt, writer(NEW), keep=kept)
    assert tree(ckpt)["tokenizer.json"] == b"tok"


def test_a_missing_parent_under_a_read_only_directory_is_refused(tmp_path, read_only):
    read_only(tmp_path)
    with pytest.raises(PermissionError, match="the directory above it"):
        publish_directory(tmp_path / "new" / "ckpt", writer(NEW))
    assert listing(tmp_path) == []


@pytest.mark.parametrize("kwargs,error,match", [
    ({"path": None}, TypeError, "^path must be a path"),
    ({"path": ""}, ValueError, "^path must be a non-empty path"),
    ({"write": "not callable"}, TypeError, "^write must be a callable"),
    ({"keep": ["tokenizer.json"]}, TypeError, "^keep must be None or a callable"),
    ({"tag": "a/b"}, ValueError, "^tag must be"),
    ({"tag": ""}, ValueError, "^tag must be"),
])
def test_publish_bad_arguments_are_named_and_nothing_changes(ckpt, tmp_path, kwargs, error, match):
    args = {"path": ckpt, "write": writer(NEW), **kwargs}
    with pytest.raises(error, match=match):
        publish_directory(args.pop("path"), args.pop("write"), **args)
    assert tree(ckpt) == OLD and listing(tmp_path) == ["ckpt"]


# ------------------------------------------------------------------ publish_directory: two real processes

#: a writer in its own process: publishes ``target`` and, inside its write, says it started and waits for "go"
HOLDER = """
import os, sys, time
from toolbox_core.files import publish_directory
target, sync, tag = sys.argv[1:4]

def write(tmp):
    with open(os.path.join(tmp, "owner"), "w") as f:
        f.write(str(os.getpid()))
    open(os.path.join(sync, "started"), "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(sync, "go")):
        if time.monotonic() > deadline:
            raise SystemExit("never told to go")
        time.sleep(0.005)

publish_directory(target, write, tag=tag)
"""


def spawn(code, *args):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def wait_for(path, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def test_a_second_writer_fails_cleanly_naming_the_first_which_completes(ckpt, tmp_path):
    sync = tmp_path.parent / f"{tmp_path.name}-sync"
    sync.mkdir()
    holder = spawn(HOLDER, ckpt, sync, "publish")
    try:
        wait_for(sync / "started", holder)
        (theirs,) = [n for n in listing(tmp_path) if n.startswith(".ckpt.publish-")]
        assert theirs.startswith(f".ckpt.publish-{holder.pid}-")  # pid + random
        with pytest.raises(BlockingIOError, match=rf"is being written by another save \(pid {holder.pid} on .*\); "
                                                  "this one wrote nothing"):
            publish_directory(ckpt, writer(NEW), keep=kept)
        assert theirs in listing(tmp_path) and tree(ckpt) == OLD  # its temporary directory was not touched
    finally:
        (sync / "go").touch()
        out, err = holder.communicate(timeout=30)
    assert holder.returncode == 0, err
    assert tree(ckpt) == {"owner": str(holder.pid).encode()} and listing(tmp_path) == ["ckpt"]


#: racing writers: each publishes ``rounds`` times a directory of five files that all say (pid, round)
RACER = """
import os, sys, time
from toolbox_core.files import publish_directory
target, go, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
open(f"{go}-ready-{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
won = lost = 0
for i in range(rounds):
    def write(tmp):
        for k in range(5):
            with open(os.path.join(tmp, f"part{k}"), "w") as f:
                f.write(f"{os.getpid()} {i}")
            time.sleep(0.002)
    try:
        publish_directory(target, write)
        won += 1
    except BlockingIOError as err:
        assert "is being written by another save (pid " in str(err), err
        lost += 1
print(won, lost)
"""


def race(where, rounds=12):
    """Three racers on ``where/"ckpt"``, started together: (their (won, lost) counts, the target's content)."""
    where.mkdir()
    target, go = where / "ckpt", where.parent / f"{where.name}-go"
    racers = [spawn(RACER, target, go, rounds) for _ in range(3)]
    for p in racers:
        wait_for(f"{go}-ready-{p.pid}", p)
    go.touch()
    results = [p.communicate(timeout=60) for p in racers]
    assert [p.returncode for p in racers] == [0, 0, 0], [err for _, err in results]
    assert listing(where) == ["ckpt"]
    return [tuple(map(int, out.split())) for out, _ in results], tree(target)


def test_racing_writers_each_publish_whole_or_fail_cleanly(tmp_path):
    """Three processes publish one directory 12 times each at once: every attempt is published whole or
    refused with BlockingIOError (no other error: nobody removes another's temporary directory or takes a
    lock that was being released); the result is one attempt's five files; nothing is left beside it.
    A race in which the writers never overlapped (a loaded machine) is run again, up to twice."""
    for attempt in range(3):
        counts, content = race(tmp_path / f"race{attempt}")
        assert sum(won for won, _ in counts) >= 1 and sum(map(sum, counts)) == 36
        assert len(content) == 5 and len(set(content.values())) == 1, content
        if sum(lost for _, lost in counts):
            break
    else:
        pytest.fail("the writers never overlapped in three races: the lock was not exercised")


def test_a_mount_point_is_refused_before_anything_changes(ckpt, tmp_path, monkeypatch):
    """No rename can swap a mount point (the temporary directory is on the file system above it)."""
    monkeypatch.setattr(files, "_same_device", lambda a, b: False)
    with pytest.raises(ValueError, match="is a mount point"):
        publish_directory(ckpt, writer(NEW))
    assert tree(ckpt) == OLD and listing(tmp_path) == ["ckpt"]


def test_a_second_writer_in_the_same_process_is_refused_too(ckpt, tmp_path):
    """The lock is per open of the lock file: a nested (or another thread's) publish of the same directory."""
    refused = []

    def outer(tmp):
        writer(NEW)(tmp)
        with pytest.raises(BlockingIOError, match=rf"another save \(pid {os.getpid()} "):
            publish_directory(ckpt, writer({"inner": b"x"}))
        refused.append(True)
    publish_directory(ckpt, outer)
    assert refused and tree(ckpt) == NEW and listing(tmp_path) == ["ckpt"]


def _situation(tmp_path, kind):
    """A path where ``open(path, mode)`` fails in a known way, and the mode."""
    if kind == "x_existing":
        (tmp_path / "f").write_text("old")
        return tmp_path / "f", "x"
    if kind == "directory":
        (tmp_path / "d").mkdir()
        return tmp_path / "d", "w"
    if kind == "missing_parent":
        return tmp_path / "no" / "f", "w"
    if kind == "parent_is_a_file":
        (tmp_path / "file").write_text("old")
        return tmp_path / "file" / "f", "w"
    if kind == "x_dangling_link":
        (tmp_path / "l").symlink_to(tmp_path / "nowhere")
        return tmp_path / "l", "x"
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    return tmp_path / "a", "w"


@pytest.mark.parametrize("kind", ["x_existing", "directory", "missing_parent", "parent_is_a_file", "x_dangling_link",
                                  "link_loop"])
def test_failures_are_opens_own(tmp_path, kind):
    """The same error class and errno as ``open`` with that mode, raised before the body, nothing changed."""
    path, mode = _situation(tmp_path, kind)
    before = {p.name: (p.is_symlink(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
              for p in tmp_path.iterdir()}
    with pytest.raises(OSError) as by_open:
        open(path, mode)
    with pytest.raises(OSError) as by_us:
        with atomic_write(path, mode):
            pytest.fail("the body ran")
    assert type(by_us.value) is type(by_open.value) and by_us.value.errno == by_open.value.errno
    after = {p.name: (p.is_symlink(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
             for p in tmp_path.iterdir()}
    assert after == before


# ------------------------------------------------------------------ adversarial review: open's words, forks, kills

@pytest.mark.parametrize("mode, kwargs, error", [
    ("w", {"buffering": "x"}, TypeError),   # open: "'str' object cannot be interpreted as an integer"
    ("w", {"buffering": 0}, ValueError),    # open: "can't have unbuffered text I/O"
    ("w", {"newline": 1}, TypeError),
    ("w", {"encoding": 1}, TypeError),
])
def test_open_arguments_open_refuses_are_named(tmp_path, monkeypatch, mode, kwargs, error):
    monkeypatch.chdir(tmp_path)
    (arg, value), = kwargs.items()
    with pytest.raises(error, match=rf"^open\(\) arguments of atomic_write \(mode='w', {arg}={re.escape(repr(value))}\)"):
        with atomic_write("f", mode, **kwargs):
            pytest.fail("the body ran")
    assert listing(tmp_path) == []


class _InChild(Exception):
    """Raised in a child forked inside a save, to run the save's own cleanup there."""


def _fork_and_end_the_child(how):
    """Fork; the child ends the body by ``how`` ('raise': an exception, 'return': normally) and is then ended with
    os._exit (0 when the save refused to go on in the child); the parent waits for it and returns its status."""
    pid = os.fork()
    if pid == 0:
        if how == "raise":
            raise _InChild()
        return None
    _, status = os.waitpid(pid, 0)
    return status


def _child_guard(save):
    """Run ``save()``; in a forked child, whatever it raises ends the child (never pytest's process)."""
    parent = os.getpid()
    try:
        return save()
    except BaseException as e:
        if os.getpid() != parent:
            os._exit(0 if isinstance(e, (_InChild, RuntimeError)) else 3)
        raise
    finally:
        if os.getpid() != parent:
            os._exit(4)  # the child returned from the save: it must not have


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
@pytest.mark.parametrize("how", ["raise", "return"])
def test_a_child_forked_in_publish_neither_publishes_nor_removes_the_parents_save(ckpt, tmp_path, how):
    """Before the review a child that raised ran the save's cleanup: it removed the parent's temporary
    directory and lock file, and the parent's rename then failed (FileNotFoundError)."""
    statuses = []

    def write(tmp):
        writer(NEW)(tmp)
        statuses.append(_fork_and_end_the_child(how))
        return "parent"
    assert _child_guard(lambda: publish_directory(ckpt, write)) == "parent"
    assert statuses == [0] and tree(ckpt) == NEW and listing(tmp_path) == ["ckpt"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
@pytest.mark.parametrize("mode", ["w", "wb", "w+"])
@pytest.mark.parametrize("how", ["raise", "return"])
def test_a_child_forked_in_atomic_write_leaves_the_parents_write(tmp_path, how, mode):
    """The child neither removes nor publishes the parent's temporary, and never writes its copy of the
    parent's unflushed buffer into it (before the review: 'newnew')."""
    path = tmp_path / "f"
    path.write_text("old")
    statuses = []

    def save():
        with atomic_write(path, mode) as f:
            f.write(b"new" if "b" in mode else "new")  # not flushed: the child holds a copy of the buffer
            statuses.append(_fork_and_end_the_child(how))
    _child_guard(save)
    assert statuses == [0] and path.read_text() == "new" and listing(tmp_path) == ["f"]


def test_a_sigkilled_writers_lock_does_not_block_and_does_not_accumulate(ckpt, tmp_path):
    """A real writer holds the lock (flock) and is killed with SIGKILL mid-save: the lock died with it; the next
    save takes over its lock file, removes its temporary directory, and leaves nothing beside the checkpoint."""
    import signal
    code = ("import os, sys, time; from toolbox_core.files import publish_directory\n"
            "def write(tmp):\n    open(os.path.join(tmp, 'half'), 'w').write('x'); print('writing', flush=True); "
            "time.sleep(60)\npublish_directory(sys.argv[1], write)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(ckpt)], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert child.stdout.readline() == b"writing\n"
        assert ".ckpt.publish.lock" in listing(tmp_path)
        with pytest.raises(BlockingIOError, match=rf"pid {child.pid}"):  # alive: it holds the lock
            publish_directory(ckpt, writer(NEW))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()
    assert ".ckpt.publish.lock" in listing(tmp_path) and tree(ckpt) == OLD  # what the killed writer left
    for _ in range(2):
        publish_directory(ckpt, writer(NEW))
        assert listing(tmp_path) == ["ckpt"] and tree(ckpt) == NEW


@pytest.mark.parametrize("mode", ["w", "x"])
@pytest.mark.parametrize("existed", [False, True])
def test_a_path_ending_in_a_separator_is_a_directory_as_open_says(tmp_path, monkeypatch, mode, existed):
    """Before the review ``atomic_write("f/")`` wrote (or replaced) the file ``f``; ``open("f/", "w")`` refuses."""
    monkeypatch.chdir(tmp_path)
    if existed:
        Path("f").write_text("old")
    with pytest.raises(IsADirectoryError):
        open("f" + os.sep, "w")
    with pytest.raises(IsADirectoryError, match="ending in a separator"):
        with atomic_write("f" + os.sep, mode):
            pytest.fail("the body ran")
    assert listing(tmp_path) == (["f"] if existed else []) and (not existed or Path("f").read_text() == "old")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
@pytest.mark.parametrize("through_link", [False, True])
def test_a_fifo_target_is_refused_and_left_as_it_is(tmp_path, through_link):
    """Before the review a FIFO (and so ``/dev/null`` for root) was replaced by a regular file."""
    os.mkfifo(tmp_path / "pipe")
    path = tmp_path / "pipe"
    if through_link:
        (tmp_path / "link").symlink_to("pipe")
        path = tmp_path / "link"
    with pytest.raises(ValueError, match=r"is not a regular file \(a FIFO, socket or device\)"):
        with atomic_write(path):
            pytest.fail("the body ran")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)
    assert listing(tmp_path) == (["link", "pipe"] if through_link else ["pipe"])


def test_ctrl_c_while_taking_the_lock_does_not_keep_it(ckpt, tmp_path, monkeypatch):
    """A KeyboardInterrupt right after the flock was taken (while checking the lock file is still the one
    locked) used to leak the descriptor: the process kept the lock, and each later save in it (a notebook after
    Ctrl-C) was refused as 'being written by another save' naming itself."""
    real = os.path.samestat

    def interrupted(a, b):
        monkeypatch.setattr(os.path, "samestat", real)
        raise KeyboardInterrupt
    monkeypatch.setattr(os.path, "samestat", interrupted)
    with pytest.raises(KeyboardInterrupt):
        publish_directory(ckpt, writer(NEW))
    assert tree(ckpt) == OLD
    publish_directory(ckpt, writer(NEW))
    assert tree(ckpt) == NEW and listing(tmp_path) == ["ckpt"]
