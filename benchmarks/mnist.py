"""MNIST from its four gzipped IDX files: the one reader of the benchmarks that train on it.

The files live outside the repository, in ``<repo>/../shared/data/mnist`` (:data:`DEFAULT_ROOT`; its
``SOURCE.md`` says where they come from); nothing is downloaded or copied. A benchmark checks
:func:`missing` first and skips (or refuses its ``--data``) with that reason; :func:`load` raises
:class:`MNISTNotFound` with the same reason.

    >>> reason = missing(Path("/nonexistent"))
    >>> reason.startswith("MNIST not found at /nonexistent")
    True
"""

import gzip
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch

__all__ = ["DEFAULT_ROOT", "FILES", "MNIST", "MNISTNotFound", "missing", "read_idx", "load"]

#: ``<repo>/../shared/data/mnist``
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"

#: field of :class:`MNIST` -> file name
FILES = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
         "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}


class MNISTNotFound(FileNotFoundError):
    """The MNIST folder or one of its four files is absent; the message names what is missing."""


class MNIST(NamedTuple):
    train_images: torch.Tensor  # (60000, 784) float32 grey levels in [0, 1]
    train_labels: torch.Tensor  # (60000,) int64 digits
    test_images: torch.Tensor   # (10000, 784) float32 in [0, 1]
    test_labels: torch.Tensor   # (10000,) int64


def missing(root: Union[str, Path]) -> Optional[str]:
    """None when ``root`` holds the four files, else why not (one line, starting "MNIST not found at")."""
    root = Path(root)
    if not root.is_dir():
        return (f"MNIST not found at {root} (no such folder; expected the four gzipped IDX files of "
                f"{DEFAULT_ROOT}, see its SOURCE.md)")
    absent = [name for name in FILES.values() if not (root / name).is_file()]
    if absent:
        return f"MNIST not found at {root}: missing {', '.join(absent)} (the four gzipped IDX files)"
    return None


def read_idx(path: Union[str, Path]) -> torch.Tensor:
    """One gzipped IDX file of unsigned bytes as a uint8 tensor of its shape."""
    with gzip.open(path, "rb") as f:
        raw = bytearray(f.read())
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned bytes
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = 1
    for n in shape:
        count *= n
    if len(raw) - offset != count:
        raise ValueError(f"{path}: header says {shape} ({count} bytes), file holds {len(raw) - offset}")
    return torch.frombuffer(raw, dtype=torch.uint8, offset=offset).reshape(shape)


def load(root: Union[str, Path] = DEFAULT_ROOT) -> MNIST:
    """The four files of ``root``: images flattened to 784 grey levels in [0, 1] (float32), labels int64.

    Raises :class:`MNISTNotFound` (with the reason of :func:`missing`) when a file is absent.
    """
    reason = missing(root)
    if reason is not None:
        raise MNISTNotFound(reason)
    root = Path(root)

    def images(name):
        return read_idx(root / name).reshape(-1, 784).to(torch.float32) / 255

    def labels(name):
        return read_idx(root / name).to(torch.int64)

    return MNIST(images(FILES["train_images"]), labels(FILES["train_labels"]), images(FILES["test_images"]),
                 labels(FILES["test_labels"]))
