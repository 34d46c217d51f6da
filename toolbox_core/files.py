"""Writing files safely: to a temporary name beside the target, then renamed over it.

A reader never sees a half-written file, a crash leaves the old file intact, and an output that
is one of the inputs is refused before anything is written.
"""

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator, Sequence, Union

__all__ = ["atomic_write", "check_output_path"]

PathLike = Union[str, "os.PathLike[str]"]


def check_output_path(output: PathLike, inputs: Sequence[PathLike] = (), name: str = "output") -> Path:
    """``output`` as a Path, or ValueError when its directory is missing, it is a directory, or it
    is (the same file as) one of ``inputs``: nothing would ever overwrite an input."""
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


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path`` atomically.

    A file that is replaced keeps its permission bits; a new one gets what ``open()`` would give it under the
    process umask. A symbolic link is written through: its target is replaced and the link stays.

    Examples:
        >>> with atomic_write("profile.json") as f:   # doctest: +SKIP
        ...     f.write("{}")
    """
    target = Path(os.path.realpath(path))  # through symlinks: renaming over a link would replace the link itself
    try:
        permissions = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        permissions = 0o666 & ~umask  # as open() makes a new file
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.chmod(tmp, permissions)  # mkstemp's 0600 would outlive the rename
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
