"""`toolbox_core.files`: `atomic_write` (a temporary file beside the target, renamed over it on success) and
`check_output_path` (an output that is a directory, lacks its directory, or is one of the inputs is refused).

Atomicity is observed from outside: while the body runs the target still holds the old bytes (a reader never
sees a half-written file), a body that raises leaves the old file and no temporary behind, and the new file has
the permissions a plain ``open()`` would give it under the process umask, not ``mkstemp``'s 0600.
"""

import os
import stat

import pytest

from toolbox_core.files import atomic_write, check_output_path


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
