"""The timing harness every speed benchmark uses: warm-up, interleaved randomized order, median and IQR.

Each repetition runs every candidate once, in a freshly shuffled order, so machine load and clock
changes hit all candidates alike; CUDA work is synchronized before and after each timed call.

    >>> times = time_interleaved({"a": lambda: sum(range(1000)), "b": lambda: sum(range(2000))}, reps=5)
    >>> times["b"]["median_ms"] > 0
    True
"""

import os
import platform
import random
import statistics
import time
from typing import Callable, Dict, Mapping, Optional

import torch

from toolbox_core import checks


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: Mapping[str, Callable[[], object]], reps: int, *, device: str = "cpu", warmup: int = 1,
                     inner: int = 1, seed: int = 0,
                     progress: Optional[Callable[[int, Dict[str, float]], None]] = None) -> Dict[str, dict]:
    """Time each of ``fns`` ``reps`` times, interleaved in random order; seconds per call.

    Args:
        fns: name -> a callable with no arguments (one unit of work, e.g. a training step).
        reps: timed repetitions per candidate (each repetition shuffles the order anew).
        device: "cuda..." synchronizes around every timed call.
        warmup: untimed calls of every candidate first (allocations, autotuning, lazy init).
        inner: calls per timed sample (the sample is their mean), for calls shorter than the timer's noise.
        seed: the shuffling seed.
        progress: called after every repetition with (repetition, {name: last sample in seconds}).

    Returns:
        name -> {"median_ms", "iqr_ms", "q1_ms", "q3_ms", "reps", "samples_s"}.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    samples = {name: [] for name in fns}
    order, rng = list(fns), random.Random(seed)
    for rep in range(reps):
        rng.shuffle(order)
        for name in order:
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / inner)
        if progress is not None:
            progress(rep + 1, {name: s[-1] for name, s in samples.items()})
    out = {}
    for name, s in samples.items():
        q1, _, q3 = statistics.quantiles(s, n=4) if len(s) > 1 else (s[0],) * 3
        out[name] = {"median_ms": 1e3 * statistics.median(s), "iqr_ms": 1e3 * (q3 - q1), "q1_ms": 1e3 * q1,
                     "q3_ms": 1e3 * q3, "reps": len(s), "samples_s": s}
    return out


def stable_allocator() -> bool:
    """Keep glibc's allocator from returning and re-mapping large blocks between steps (``mallopt``: a fixed 32 MiB
    mmap threshold, a 1 GiB trim threshold), as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` would.
    Otherwise a step's large activations may come from fresh pages every step: page faults that made a 12-layer
    BART's backward 25% slower on this machine and its step times noisy, for every candidate alike. True where
    applied (Linux with glibc), False elsewhere (nothing changed)."""
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def paired_differences(fns: Mapping[str, Callable[[], object]], reps: int, *, seed: int = 0,
                       clock: Callable[[], float] = time.perf_counter) -> Dict[str, list]:
    """Seconds per call of each of ``fns``, ``reps`` times, every repetition running each once in a fresh random
    order (after one untimed call of each): name -> samples, aligned by repetition, so that ``a[i] - b[i]`` is a
    paired difference (both under the same moment's load). ``clock``: e.g. ``time.thread_time`` for one thread.

        >>> out = paired_differences({"a": lambda: None, "b": lambda: None}, reps=3)
        >>> sorted(out), len(out["a"])
        (['a', 'b'], 3)
    """
    reps = checks.as_int("reps", reps, minimum=1)  # no repetition: empty samples, no median to take
    if not fns or not all(callable(fn) for fn in fns.values()):
        raise TypeError(f"fns must map at least one name to a callable with no arguments, got {fns!r}")
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    order, rng = list(fns), random.Random(seed)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            start = clock()
            fns[name]()
            samples[name].append(clock() - start)
    return samples


def median_with_interval(values, seed: int = 0, resamples: int = 1000):
    """(median, 5th, 95th percentile of the bootstrap medians) of ``values``.

        >>> median_with_interval([1.0, 2.0, 3.0])[0]
        2.0
    """
    values = list(values)
    if not values:  # was statistics' StatisticsError
        raise ValueError("values must hold at least one number")
    resamples = checks.as_int("resamples", resamples, minimum=1)  # was an IndexError for 0
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    low = int(0.05 * resamples)  # and its mirror from the top: a symmetric interval for any number of resamples
    return statistics.median(values), meds[low], meds[resamples - 1 - low]


def write_lines(path: "os.PathLike", lines) -> None:
    """A table's ``lines`` to ``path``, one per line, through a temporary file renamed into place (its directory
    made first): a run stopped part-way leaves the previous table whole."""
    from toolbox_core.files import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def machine(device: str = "cpu") -> str:
    """One line naming the machine a table was measured on: CPU, cores, torch threads, GPU, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return text


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_package_at(rev: str, package: str = "stability_toolbox", into: Optional["os.PathLike"] = None):
    """``package`` as it was at git revision ``rev``, imported under the name ``<package>_at_<rev>`` (its modules
    import each other relatively, so the copy runs its own code; everything else it imports is today's). Read-only
    git (``git ls-tree`` / ``git show``); the files go to ``into`` (default: a new temporary directory)."""
    import importlib.util
    import re
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    if not re.fullmatch(r"[A-Za-z0-9_.^~/-]+", rev):
        raise ValueError(f"rev must be a git revision (letters, digits, _.^~/-), got {rev!r}")
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, f"{package}/"], cwd=_REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    alias = f"{package}_at_{re.sub(r'[^A-Za-z0-9]', '_', rev)}"
    root = Path(into) if into is not None else Path(tempfile.mkdtemp(prefix=f"bench_ref_{package}_"))
    (root / alias).mkdir(parents=True, exist_ok=True)
    for name in names:
        if name.endswith(".py"):
            text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=_REPO, capture_output=True, text=True,
                                  check=True).stdout
            (root / alias / Path(name).name).write_text(text)
    # imported from its folder as a package (its relative imports find its own modules); the import path is untouched
    spec = importlib.util.spec_from_file_location(alias, root / alias / "__init__.py",
                                                  submodule_search_locations=[str(root / alias)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[alias]
        raise
    return module
