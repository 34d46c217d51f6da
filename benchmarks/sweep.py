"""What the quality sweeps share: running their runs a few at a time with progress, and mean +- std."""

import argparse
import concurrent.futures
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from toolbox_core.files import atomic_write


def run_jobs(fn: Callable, jobs: Sequence[tuple], workers: int, *, processes: bool = False, label: str = "",
             describe: Callable[[object], str] = str) -> List:
    """``fn(*job)`` for every job, ``workers`` at a time (threads, or processes for in-process training);
    prints ``[label i/N seconds] describe(result)`` as each finishes. Returns the results in job order."""
    pool_type = concurrent.futures.ProcessPoolExecutor if processes else concurrent.futures.ThreadPoolExecutor
    t0 = time.time()
    with pool_type(workers) as pool:
        futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
        results = [None] * len(jobs)
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            results[futures[future]] = future.result()
            print(f"[{label} {done}/{len(jobs)} {time.time() - t0:5.0f}s] {describe(results[futures[future]])}",
                  flush=True)
    return results


def mean_std(values: Iterable[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation of the finite values (std 0 for one value; (None, None) for none)."""
    xs = [x for x in values if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def write_json(path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary name (:func:`toolbox_core.files.atomic_write`),
    so a killed run never leaves half a file."""
    with atomic_write(path) as f:
        f.write(json.dumps(obj))


REPO = Path(__file__).resolve().parents[1]


def repo_relative(value: object) -> object:
    """``value`` as recorded in a committed result: a path (``Path`` or an absolute path string) relative to the
    repository root, so that no file under ``results/`` names a directory of the machine that produced it;
    anything else unchanged.

        >>> repo_relative(REPO / "results" / "admin")
        'results/admin'
        >>> repo_relative(str(REPO.parent / "shared" / "data"))
        '../shared/data'
        >>> repo_relative("/tmp/run-1")
        '<elsewhere>/run-1'
        >>> repo_relative(3)
        3
    """
    if isinstance(value, os.PathLike) or (isinstance(value, str) and os.path.isabs(value)):
        path = Path(os.path.abspath(os.fspath(value)))
        if path == REPO.parent or REPO.parent in path.parents:  # the repository and its siblings (../shared)
            return os.path.relpath(path, REPO)
        return f"<elsewhere>/{path.name}"  # a temporary or private directory: only its name means anything
    return value


def recorded_args(args: Union[argparse.Namespace, Dict[str, object]]) -> Dict[str, object]:
    """A command's arguments as a results file records them: JSON values, paths relative to the repository
    (:func:`repo_relative`), anything else as ``str``."""
    items = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    out = {}
    for key, value in items.items():
        value = repo_relative(value)
        out[key] = value if isinstance(value, (int, float, bool, type(None))) else str(value)
    return out


def recorded_command(module: str, argv: Sequence[str]) -> str:
    """The command line ``python -m module argv...`` as a results file records it: absolute paths among the
    arguments (``--work /x`` or ``--work=/x``) relative to the repository (:func:`repo_relative`).

        >>> recorded_command("benchmarks.sweep", ["--work", str(REPO / "work" / "a"), f"--out={REPO}/results"])
        'python -m benchmarks.sweep --work work/a --out=results'
    """
    def one(arg: str) -> str:
        flag, eq, value = arg.partition("=")
        if eq and flag.startswith("-"):
            return f"{flag}={repo_relative(value)}"
        return str(repo_relative(arg))
    return " ".join(["python", "-m", module, *(one(str(a)) for a in argv)])


def parse_list(parser, flag: str, text: str, kind=float, positive: bool = True) -> list:
    """A comma-separated ``flag`` value as a list of ``kind``; a bad item ends the command via ``parser.error``
    (one line naming the flag, exit 2)."""
    try:
        values = [kind(x) for x in text.split(",")]
    except ValueError:
        parser.error(f"{flag}: expected comma-separated {kind.__name__} values, got {text!r}")
    if positive and any(not v > 0 for v in values):
        parser.error(f"{flag}: every value must be > 0, got {text!r}")
    return values
