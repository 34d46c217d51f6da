"""What the quality sweeps share: running their runs a few at a time with progress, and mean +- std."""

import concurrent.futures
import json
import math
import statistics
import time
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

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
