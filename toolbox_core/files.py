"""Writing files and directories safely: to a temporary name beside the target, then renamed over it.

* `atomic_write`: one file. A reader never sees a half-written file, a failure (an exception, a full disk,
  Ctrl-C) leaves the old file and no temporary, and ``open``'s conventions hold where they make sense for a
  writer ("x" refuses an existing file, a read-only file or directory is refused, a directory is refused).
* `publish_directory`: a whole directory (a model checkpoint), written into a sibling temporary directory and
  swapped in by one atomic rename; one writer at a time per directory (a lock file beside it), a read-only
  checkpoint refused untouched, the current working directory (or one above it) refused.
* `check_output_path`: an output that is a directory, lacks its directory, or is one of the inputs is refused.

"Read-only" here is what ``open`` refuses *or* a target with no write permission bit at all: the second part
makes a ``chmod a-w`` protection hold for root too, who ``open`` would let through.
"""

import codecs
import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Callable, Iterator, Optional, Sequence, TypeVar, Union

try:  # POSIX; the lock of publish_directory needs it (Windows is not a target of this project)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["atomic_write", "check_output_path", "publish_directory", "WRITE_MODES"]

PathLike = Union[str, "os.PathLike[str]"]
T = TypeVar("T")

#: the modes `atomic_write` accepts: a new file written from the start, ``"x"`` refusing an existing one; any
#: of them with ``"+"`` (read back what was written) and ``"t"`` (text, the default) or ``"b"`` (binary)
WRITE_MODES = ("w", "wb", "wt", "w+", "w+b", "w+t", "x", "xb", "xt", "x+", "x+b", "x+t")


def check_output_path(output: PathLike, inputs: Sequence[PathLike] = (), name: str = "output") -> Path:
    """``output`` as a Path, or ValueError when its directory is missing, it is a directory, or it
    is (the same file as) one of ``inputs``: nothing would ever overwrite an input.

    Examples:
        >>> check_output_path("out.json", ["in.json"])
        PosixPath('out.json')
    """
    out = Path(output)
    if out.is_dir():
        raise ValueError(f"{name} {out} is a directory; give a file name")
    if not out.parent.is_dir():
        raise ValueError(f"{name} {out}: directory {out.parent} does not exist")
    for src in inputs:
        src = Path(src)
        if out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src)):
            raise ValueError(f"{name} {out} is the input {src}; write to another file (inputs are never overwritten)")
    return out


# ------------------------------------------------------------------------------------------------- checks


def _as_path(path, name: str) -> str:
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise TypeError(f"{name} must be a path (str or os.PathLike of str), got {type(path).__name__}")
    if not os.fspath(path):
        raise ValueError(f"{name} must be a non-empty path, got ''")
    return os.fspath(path)


def _check_mode(mode) -> None:
    """ValueError / TypeError naming ``mode`` unless it is one of `WRITE_MODES` (any order of its letters)."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, one of {', '.join(WRITE_MODES)}; got {type(mode).__name__}")
    letters = set(mode)
    accepted = f"accepted: {', '.join(repr(m) for m in WRITE_MODES)}"
    if "r" in letters:
        raise ValueError(f"mode {mode!r}: atomic_write writes a new file; a read mode ('r', 'r+') makes no sense "
                         f"for it (open the file itself to read it); {accepted}")
    if "a" in letters:
        raise ValueError(f"mode {mode!r}: atomic_write replaces the whole file and does not append (an append "
                         "through a copy would lose another process's appends); open(path, 'a') appends, or read "
                         f"the old content and write it all; {accepted}")
    if len(mode) != len(letters) or not letters <= set("wxbt+") or len(letters & set("wx")) != 1 \
            or {"b", "t"} <= letters:
        raise ValueError(f"mode {mode!r} is not a write mode; {accepted}")


def _check_open_kwargs(mode: str, open_kwargs: dict) -> None:
    """What ``open`` would refuse in ``open_kwargs`` (with its own messages, each naming the argument),
    found by opening the null device with them: nothing is created."""
    unknown = sorted(set(open_kwargs) - {"buffering", "encoding", "errors", "newline"})
    if unknown:
        raise TypeError(f"atomic_write takes open()'s buffering, encoding, errors and newline, not {unknown}")
    try:
        with open(os.devnull, mode.replace("x", "w"), **open_kwargs):
            pass
    except LookupError as err:  # an unknown codec: open raises LookupError, not a ValueError
        raise ValueError(f"encoding / errors: {err}") from None
    except (TypeError, ValueError) as err:  # open's own words do not always name the argument
        given = ", ".join(f"{k}={v!r}" for k, v in open_kwargs.items())
        raise type(err)(f"open() arguments of atomic_write (mode={mode!r}{', ' + given if given else ''}): "
                        f"{err}") from None
    if open_kwargs.get("errors") is not None:
        try:
            codecs.lookup_error(open_kwargs["errors"])
        except LookupError as err:
            raise ValueError(f"errors: {err}") from None


def _is_read_only(path: str, directory: bool = False) -> bool:
    """``open`` would refuse to write ``path`` (for a directory: to create or remove an entry), or no one has a
    write permission bit on it (what ``chmod a-w`` protects, honoured for root as well)."""
    access = os.W_OK | (os.X_OK if directory else 0)
    return not os.access(path, access) or not os.stat(path).st_mode & 0o222


def _refuse_read_only(path: str, what: str, name: str, given: str) -> None:
    if _is_read_only(path, directory=os.path.isdir(path)):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        raise PermissionError(errno.EACCES, f"{name} {given}: {what} {path} is read-only (mode {mode:#o}); nothing "
                              "was written and it is left as it is (make it writable to replace it)", path)


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


# --------------------------------------------------------------------------------------------- renaming


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """Linux ``renameat2(src, dst, flags)``: True when done, False where the system or the file system does not
    offer it, OSError on any other failure."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), dst)


def _exchange(a: str, b: str) -> bool:
    """Swap the directories ``a`` and ``b`` in one atomic step (``RENAME_EXCHANGE``); False where unavailable."""
    return _renameat2(a, b, 2)


def _rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``, FileExistsError (and ``src`` left) when ``dst`` exists, even when another
    process creates it at the same moment: ``RENAME_NOREPLACE``, else a hard link (which never replaces)."""
    if _renameat2(src, dst, 1):
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system: the check and the rename are two steps here
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _fsync_dir(path: str) -> None:
    """Make a directory's entries (a rename into it) durable; a file system that cannot is skipped."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """``fsync`` every file and directory under ``path`` (links are not followed)."""
    for root, _, files in os.walk(path):
        for file in files:
            with contextlib.suppress(OSError):
                _fsync_file(os.path.join(root, file))
        _fsync_dir(root)


# ------------------------------------------------------------------------------------------ atomic_write


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; when the body ends without an exception it replaces
    ``path`` in one rename (then the directory entry is made durable with ``fsync``).

    Modes (`WRITE_MODES`): ``"w"`` (text) / ``"wb"`` (binary) write the file anew; ``"x"`` / ``"xb"`` refuse an
    existing ``path`` (FileExistsError, before the body runs and again, atomically, at the rename: a file another
    process creates meanwhile is never overwritten); ``"+"`` lets the body read back what it wrote. Appending
    (``"a"``) is refused (ValueError): a copy-append-rename would silently drop what another process appends
    meanwhile, so append with ``open(path, "a")`` itself. Read modes (``"r"``, ``"r+"``) are refused (ValueError).
    ``open_kwargs`` are ``open``'s ``buffering``, ``encoding``, ``errors`` and ``newline``, checked before
    anything is created.

    Refused before the body runs, ``path`` left as it is: an existing ``path`` that is not a regular file (a FIFO,
    a device such as ``/dev/null``, which a rename would replace by a file) raises ValueError. Like ``open`` for
    writing: a directory at ``path`` (or a path ending in a separator) raises IsADirectoryError, a missing
    directory FileNotFoundError, a file in place of the directory NotADirectoryError, a loop of links OSError
    (ELOOP), a read-only ``path`` or directory PermissionError (see the module doc: a target without any write
    bit is read-only for root too). Whatever the body raises (a full disk, Ctrl-C, ``SystemExit``), ``path``
    keeps its old content and the temporary file (``.<name>.<pid>.*.tmp``) is removed. A process forked inside
    the body (a data-loader worker) never publishes nor removes the parent's temporary: ending the body there
    raises RuntimeError in the child, and the parent's write completes.

    A replaced file keeps its permission bits (and its owner, where the process may set it); a new one gets what
    ``open()`` would give it under the process umask. A symbolic link is written through: its target is replaced
    and the link stays (in ``"x"`` mode an existing link is an existing file). A file with other hard links is
    replaced under this name only: the other names keep the old content (a rename cannot write through them).

    Examples:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "profile.json")
        >>> with atomic_write(path) as f:
        ...     _ = f.write("{}")
        >>> open(path).read()
        '{}'
        >>> with atomic_write(path, "x") as f:  # doctest: +ELLIPSIS
        ...     pass
        Traceback (most recent call last):
        FileExistsError: [Errno 17] File exists: '...profile.json'
    """
    given = _as_path(path, "path")
    _check_mode(mode)
    _check_open_kwargs(mode, open_kwargs)
    exclusive = "x" in mode
    if given.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):  # open("f/", "w") refuses it too:
        # the name of a directory is never a file to write (abspath/realpath would drop the separator)
        raise IsADirectoryError(errno.EISDIR, f"{os.strerror(errno.EISDIR)} (a path ending in a separator names a "
                                "directory)", given)
    target = os.path.abspath(given) if exclusive else os.path.realpath(given)  # "w": through symlinks
    if exclusive and os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), given)
    if os.path.islink(target):  # realpath stopped on a link: a loop of links
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), given)
    if os.path.isdir(target):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), given)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        if os.path.exists(parent):
            raise NotADirectoryError(errno.ENOTDIR, f"{parent} is not a directory", given)
        raise FileNotFoundError(errno.ENOENT, f"directory {parent} does not exist", given)
    try:
        old = os.stat(target)
    except FileNotFoundError:
        old = None
    if old is not None:
        if not stat.S_ISREG(old.st_mode):  # a FIFO, socket or device (/dev/null): a rename would destroy it
            raise ValueError(f"path {given}: {target} is not a regular file (a FIFO, socket or device); "
                             "atomic_write replaces regular files only, and left it as it is (write to it with open)")
        _refuse_read_only(target, "the file", "path", given)
    _refuse_read_only(parent, "its directory", "path", given)
    owner = os.getpid()
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.{owner}.", suffix=".tmp", dir=parent)
    try:
        if old is not None:
            permissions = stat.S_IMODE(old.st_mode)
            with contextlib.suppress(OSError):  # root may, others only to themselves: nothing else to do
                os.chown(tmp, old.st_uid, old.st_gid)
        else:
            umask = os.umask(0)
            os.umask(umask)
            permissions = 0o666 & ~umask  # as open() makes a new file
        os.chmod(tmp, permissions)  # mkstemp's 0600 would outlive the rename
        try:
            f = os.fdopen(fd, mode.replace("x", "w"), **open_kwargs)
        except BaseException:
            os.close(fd)
            raise
        try:
            yield f
            _check_owner(owner, "atomic_write", given)
            closed_by_body = f.closed
            if not closed_by_body:
                f.flush()
                os.fsync(f.fileno())
        finally:
            _close(f, owner)
        if closed_by_body:  # its data went to the file at close(), not yet to the disk
            _fsync_file(tmp)
        if exclusive:
            _rename_noreplace(tmp, target)
        else:
            os.replace(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        if os.getpid() == owner:  # a child forked in the body leaves the parent's temporary alone
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def _close(f: IO, owner: int) -> None:
    """Close the temporary file ``f``. In a process forked inside the body, ``f`` shares the parent's
    descriptor but holds its own copy of the parent's unwritten buffer: closing it would write that data a second
    time into the parent's file. The descriptor is pointed at the null device first, where the copy goes."""
    if os.getpid() != owner and not f.closed:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, f.fileno())
        finally:
            os.close(null)
        with contextlib.suppress(OSError):
            f.close()
        return
    f.close()


def _check_owner(owner: int, what: str, given: str) -> None:
    """RuntimeError in a process forked inside the body of ``what``: only the process that began the write
    publishes it, and a child that ends the body (instead of ``os._exit``) must neither publish a copy nor remove
    the parent's temporary, lock or files."""
    if os.getpid() != owner:
        raise RuntimeError(f"{what}({given!r}): this process (pid {os.getpid()}) was forked inside the body of the "
                           f"write that pid {owner} began; only that process publishes it (end a forked child "
                           "with os._exit)")


# ------------------------------------------------------------------------------------- publish_directory


def _read_holder(fd: int) -> str:
    """Who holds the lock of ``fd``: the holder writes it right after taking the lock, so an empty file is
    read again for a moment."""
    for _ in range(20):
        with contextlib.suppress(OSError):
            text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            if text:
                return text
        time.sleep(0.005)
    return "a process that has not written its name"


def _acquire(lock: str, name: str, given: str) -> int:
    """An exclusive ``flock`` on the file ``lock`` (created if needed), or BlockingIOError naming the process
    that holds it. The lock file is removed when released, so after taking the lock we check that ``lock``
    still names the file we locked (a release may have removed it in between), else take it again."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except PermissionError:  # another user's lock file: a read-only descriptor locks it as well
            fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise BlockingIOError(errno.EAGAIN, f"{name} {given} is being written by another save ({holder}); this "
                                  "one wrote nothing and left it as it is: retry after that save ends, or save "
                                  f"elsewhere (lock file {lock})", given) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        except BaseException:  # Ctrl-C here must not leave this process holding the lock until it exits
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # who holds it, for the message of a second writer
            holder = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
            os.pwrite(fd, holder.encode(), 0)  # then cut what a killed holder left: never empty in between
            os.ftruncate(fd, len(holder.encode()))
    except BaseException:
        _release(fd, lock)
        raise
    return fd


def _release(fd: int, lock: str) -> None:
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # while still locked: a waiting writer then sees it gone and takes a new one
    finally:
        os.close(fd)


def _remove_tree(path: str) -> None:
    """Remove a temporary tree of this module (a failed save's, or the old checkpoint after a swap), read-only
    subdirectories included: their permissions are raised first (directories only; a file's mode is shared with
    its hard links in the published directory)."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            sub = os.path.join(root, d)
            if not os.path.islink(sub):
                with contextlib.suppress(OSError):
                    os.chmod(sub, stat.S_IMODE(os.lstat(sub).st_mode) | stat.S_IRWXU)
    with contextlib.suppress(OSError):
        os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | stat.S_IRWXU)
    shutil.rmtree(path, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry(old: str, new: str, keep: Callable[[str], bool]) -> None:
    """Hard-link (or copy) into ``new`` the entries of ``old`` that ``keep`` keeps and ``new`` lacks."""
    for entry in os.listdir(old):
        src, dst = os.path.join(old, entry), os.path.join(new, entry)
        if os.path.lexists(dst) or not keep(src):
            continue
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _same_device(a: str, b: str) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def _check_directory_target(path, keep: Callable[[str], bool], name: str) -> str:
    """The real absolute path a publish replaces, after every refusal that needs no change on disk."""
    given = _as_path(path, name)
    target = os.path.realpath(given)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"{name} must be a directory, got the file {given!r} (left as it is; nothing was written)")
    parent = os.path.dirname(target)
    if os.path.basename(target) == "":
        raise ValueError(f"{name} {given!r} is the root directory; a checkpoint goes in a directory of its own")
    try:
        cwd = os.path.realpath(os.getcwd())
    except FileNotFoundError:  # the working directory is gone already: nothing to protect
        cwd = None
    if cwd is not None and (cwd == target or cwd.startswith(target + os.sep)):
        raise ValueError(f"{name} {given!r} is the current working directory or contains it; a save replaces the "
                         "whole directory, which would leave this process in a deleted directory. Nothing was "
                         "written: give a path from outside it (e.g. chdir to its parent and save to its name)")
    if os.path.isdir(target) and not _same_device(target, parent):
        raise ValueError(f"{name} {given!r} is a mount point; a directory there cannot be swapped in by a rename. "
                         "Nothing was written: save into a directory inside it")
    if os.path.isdir(target):
        _refuse_read_only(target, "the directory", name, given)
        for entry in os.listdir(target):
            file = os.path.join(target, entry)
            if os.path.isfile(file) and not os.path.islink(file) and not keep(file):
                _refuse_read_only(file, "the file it replaces", name, given)
    _refuse_read_only(_existing_ancestor(parent), "the directory above it", name, given)
    return target


def publish_directory(path: PathLike, write: Callable[[str], T], *, keep: Optional[Callable[[str], bool]] = None,
                      tag: str = "publish", name: str = "path") -> T:
    """Run ``write(tmp)`` on a new sibling directory of ``path``, then make it ``path`` in one rename and return
    what ``write`` returned.

    Atomic: an existing directory is swapped with the new one in one step (Linux ``renameat2`` exchange; where
    the file system lacks it, two renames, between which ``path`` is briefly absent), so a reader sees the old
    directory or the new one, never a mix; interrupted at any point (an exception in ``write``, Ctrl-C, a kill)
    ``path`` is the old directory or the new one. Entries of the old directory for which ``keep(entry_path)``
    is true and that the new one lacks are hard-linked (or copied) into it first; the rest are replaced (default:
    nothing is kept). Everything is ``fsync``-ed before the rename, the parent after it. A replaced directory's
    permission bits are kept; a new one gets what ``mkdir`` gives under the umask.

    One writer per directory: a writer holds an ``flock`` on ``.<name>.<tag>.lock`` beside ``path`` while it
    writes (the file is removed when it ends); a second writer raises BlockingIOError naming the first (pid,
    host, start time) before writing anything, and the first completes. Temporary directories are
    ``.<name>.<tag>-<pid>-<random>``, removed on any error; one left by a killed writer is removed by the next
    writer (only a lock holder removes them, so a live writer's is never touched). The lock dies with its
    holder (``flock``): a writer killed with SIGKILL never blocks the next one, which takes over its lock file
    and removes it when done. A process forked inside ``write`` neither publishes nor removes the parent's lock
    or temporary directory (it gets RuntimeError if it returns from ``write``); the parent's save completes.

    Refused before anything is changed: ``path`` is a file (ValueError naming ``name``); ``path`` is the
    current working directory or contains it (ValueError: the swap would leave the process in a deleted
    directory; another process inside it keeps the old, removed directory); ``path`` is a mount point
    (ValueError: no rename can replace it); ``path``, a file of it that would be replaced, or the directory
    above it is read-only (PermissionError; see the module doc: no write bit at all is read-only for root too).
    A symbolic link ``path`` is published through (its target is replaced, the link stays). A missing parent
    is created.

    Args:
        path: the directory to write (str or os.PathLike).
        write: writes the new directory's content into the directory it is given.
        keep: which entries (full paths) of the old directory survive the publish.
        tag: marks the temporary names.
        name: the argument's name in error messages.

    Examples:
        >>> import os, tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> def write(tmp):
        ...     with open(os.path.join(tmp, "weights.bin"), "wb") as f:
        ...         return f.write(b"\\x00" * 4)
        >>> publish_directory(out, write)
        4
        >>> sorted(os.listdir(os.path.dirname(out))), os.listdir(out)
        (['ckpt'], ['weights.bin'])
    """
    if not callable(write):
        raise TypeError(f"write must be a callable taking the directory to write, got {type(write).__name__}")
    if keep is not None and not callable(keep):
        raise TypeError(f"keep must be None or a callable taking an entry's path, got {type(keep).__name__}")
    if not isinstance(tag, str) or not tag or os.sep in tag or tag.startswith("."):
        raise ValueError(f"tag must be a non-empty str without '{os.sep}' or a leading '.', got {tag!r}")
    if fcntl is None:  # pragma: no cover
        raise OSError(errno.ENOSYS, "publish_directory needs POSIX file locks (fcntl)")
    keep = keep if keep is not None else (lambda entry: False)
    target = _check_directory_target(path, keep, name)
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    lock = os.path.join(parent, f".{base}.{tag}.lock")
    owner = os.getpid()
    lock_fd = _acquire(lock, name, os.fspath(path))
    try:
        for stale in os.listdir(parent):  # a killed writer's: a live one would hold the lock we hold
            if stale.startswith(f".{base}.{tag}-"):
                _remove_tree(os.path.join(parent, stale))
        tmp: Optional[str] = os.path.join(parent, f".{base}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(tmp, 0o777)  # as mkdir makes a directory under the umask
        try:
            if os.path.isdir(target):
                old = os.stat(target)
                with contextlib.suppress(OSError):
                    os.chown(tmp, old.st_uid, old.st_gid)
                os.chmod(tmp, stat.S_IMODE(old.st_mode))
            result = write(tmp)
            _check_owner(owner, "publish_directory", os.fspath(path))
            _fsync_tree(tmp)
            if os.path.isdir(target):
                _carry(target, tmp, keep)
                _fsync_dir(tmp)
                if not _exchange(tmp, target):
                    # no atomic exchange here: two renames, the old directory kept under a temporary name until
                    # the new one is in place (and put back if that fails)
                    old_name = os.path.join(parent, f".{base}.{tag}-{os.getpid()}-{secrets.token_hex(4)}-old")
                    os.rename(target, old_name)
                    try:
                        os.rename(tmp, target)
                    except BaseException:
                        os.rename(old_name, target)
                        raise
                    tmp = old_name
            else:
                _fsync_dir(tmp)
                os.rename(tmp, target)
                tmp = None
            _fsync_dir(parent)
        finally:
            if tmp is not None and os.getpid() == owner:  # the old directory after the exchange, or an unfinished
                _remove_tree(tmp)  # one (never from a child forked in write: it is the parent's)
    finally:
        if os.getpid() == owner:
            _release(lock_fd, lock)
        else:  # a forked child's copy of the descriptor: the lock and its file stay the parent's
            os.close(lock_fd)
    return result
