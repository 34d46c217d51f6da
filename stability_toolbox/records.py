"""The monitor's records and what is made of them: ``monitor.jsonl``, TensorBoard, the summary, the heatmaps.

A *record* is one logging step: ``{"step": int, "loss": ..., "log_z_rms": ..., "quantities": {quantity:
{row: value}}, "warnings": [line, ...]}`` ([`StabilityMonitor.history`][stability_toolbox.StabilityMonitor]
holds them). Under the monitor's ``log_dir``, a [`RecordWriter`][stability_toolbox.records.RecordWriter]
appends each to ``monitor.jsonl`` (one JSON object per line; a non-finite value as the string ``"NaN"``,
``"Infinity"`` or ``"-Infinity"``: JSON has no literal for them) and to TensorBoard (``tb/``, tensorboardX;
the warnings as text ``stability/warnings``). [`read_records`][stability_toolbox.records.read_records] reads
a ``monitor.jsonl`` back with its numbers; [`summary_table`][stability_toolbox.records.summary_table] and
[`write_heatmaps`][stability_toolbox.records.write_heatmaps] turn a history into ``summary.md`` and one
``heatmap_<quantity>.png`` (layer x step) per quantity (each written to a temporary name, then renamed).

How a ``monitor.jsonl`` is read and written:

* **a torn last line is skipped with a warning**: a run that crashed while appending leaves its last line
  without an end of line and not a whole JSON object; `read_records` skips it (``UserWarning`` naming the
  file and line) and returns every record before it. A line that is not JSON *with* an end of line (corrupt,
  anywhere in the file), or a JSON value that is not a record (`stability_toolbox.warning_rules.as_record`),
  is a ``ValueError`` naming the file and the line number.
* **a resumed run repairs the torn line**: a `RecordWriter` opening a ``monitor.jsonl`` that ends in a torn
  line drops it first (one warning to its log) and appends after the last whole record, so the file stays
  readable; an unterminated line that is a whole JSON object is kept and terminated.
* **several writers may append to one file** (two monitors, or two processes, on one ``log_dir``): each
  record is one ``write`` of the whole line to a file opened for appending, so lines never interleave (on a
  local file system); their records interleave in time order.
* **names and values round-trip**: non-ASCII layer names are written as JSON escapes (the file is ASCII),
  NaN and infinities as the strings above; ``read_records(path)`` gives back the records the writer got.

Examples:
    >>> import logging, math, tempfile
    >>> from pathlib import Path
    >>> log_dir = Path(tempfile.mkdtemp())
    >>> writer = RecordWriter(log_dir, tensorboard=False, log=logging.getLogger("demo"))
    >>> writer.write({"step": 0, "loss": float("nan"), "quantities": {"beta": {"layers.0": float("inf")}}})
    >>> writer.close()
    >>> (log_dir / "monitor.jsonl").read_text()
    '{"step": 0, "loss": "NaN", "quantities": {"beta": {"layers.0": "Infinity"}}}\\n'
    >>> back = read_records(log_dir / "monitor.jsonl")[0]
    >>> math.isnan(back["loss"]), back["quantities"]["beta"]["layers.0"]
    (True, inf)
"""

import json
import logging
import math
import numbers
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from toolbox_core import checks
from toolbox_core.files import atomic_write

from .quantities import LOG_SCALE, MODEL_QUANTITIES, QUANTITIES
from .warning_rules import as_history, as_record

try:  # advisory locks: a writer repairing a torn line never cuts a record another writer is appending
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; appends stay whole lines, the repair is unguarded
    fcntl = None

__all__ = ["read_records", "RecordWriter", "as_log_dir", "as_path", "summary_table", "write_summary",
           "write_heatmaps"]


def _json_safe(value):
    """``value`` with every non-finite float as a JSON string: ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
    (``float()`` reads them back; JSON has no literal for them), and NumPy numbers as Python ones."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return value
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


_NON_FINITE = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def as_path(path: Any, name: str = "path", *, what: str = "file path") -> Path:
    """``path`` checked as a file-system path (a non-empty ``str`` or ``os.PathLike`` of str) as a ``Path``;
    ``name`` and ``what`` word the error.

    An int is refused: ``open(3)`` would read (and then close) the caller's file descriptor 3.

    Examples:
        >>> as_path("runs/monitor.jsonl").name
        'monitor.jsonl'
        >>> as_path(3)
        Traceback (most recent call last):
        ...
        TypeError: path must be a file path (str or os.PathLike), got 3 (int)
    """
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a {what} (str or os.PathLike), got {path!r} ({type(path).__name__})")
    if not text:
        raise ValueError(f"{name} must be a non-empty {what}, got ''")
    return Path(text)


def _number(v: Any) -> Any:
    return _NON_FINITE.get(v, v) if isinstance(v, str) else v


def _parse(line: bytes) -> Any:
    """One line of a ``monitor.jsonl`` as JSON; ValueError with the reason when it is not JSON."""
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 (byte {e.start + 1})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg}: column {e.colno})") from None
    except RecursionError:
        raise ValueError("not JSON this reader can hold (nested too deeply)") from None


_GZIP_MAGIC = b"\x1f\x8b"


def _torn_record(tail: bytes) -> bool:
    """Whether an unterminated last line can be what a crashed writer left: ASCII (what `RecordWriter` writes)
    that is blank or begins with ``{``, after any NUL bytes (the zero-filled end that a power loss can leave on
    some file systems), holding no line break (a record is one line: a file whose lines end in a bare carriage
    return is one unterminated "line" of many records). Anything else (a compressed or binary file, another
    text) is not a torn record and is never skipped or dropped."""
    text = tail.lstrip(b" \t\r\x00")
    return tail.isascii() and b"\r" not in text.rstrip(b" \t\r\x00") and \
        (not text.rstrip(b"\x00") or text.startswith(b"{"))


def _not_records(path: Path, data: bytes) -> str:
    """What a file is instead of a monitor.jsonl, where that can be told from its first bytes."""
    if data.startswith(_GZIP_MAGIC):
        return f"{path} is gzip-compressed, not a monitor.jsonl: decompress it first (gunzip)"
    return ""


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path``, refused (ValueError) unless it is a regular file: a FIFO would block the read
    forever, a device (``/dev/zero``) never end. Opened without blocking so that a FIFO is refused, not waited
    on; ``/dev/null`` is not a file either."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ValueError(f"path {path} is a directory; give the monitor.jsonl file in it "
                             f"({path / 'monitor.jsonl'})")
        if not stat.S_ISREG(mode):
            raise ValueError(f"path {path} is not a regular file (a FIFO, socket or device); give a monitor.jsonl "
                             "file")
        if hasattr(os, "O_NONBLOCK"):  # a regular file reads the same either way; restore the usual mode
            os.set_blocking(fd, True)
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _record(value: Any) -> Dict[str, Any]:
    """A parsed line as a record of the history: the non-finite strings of the model-level values and the
    quantities back to floats, the record checked (`as_record`), the numbers as floats."""
    if not isinstance(value, dict):
        raise TypeError(f"a record is a JSON object {{\"step\": int, \"quantities\": ...}}, got a JSON "
                        f"{type(value).__name__}")
    record = {k: (v if k in ("quantities", "warnings", "step") else _number(v)) for k, v in value.items()}
    if isinstance(record.get("updates"), dict):  # the per-update stream: {"update": [int], signal: [value]}
        record["updates"] = {k: [_number(x) for x in xs] if isinstance(xs, list) else xs
                             for k, xs in record["updates"].items()}
    per_quantity = record.setdefault("quantities", {})
    if isinstance(per_quantity, dict):
        record["quantities"] = {q: {row: _number(v) for row, v in rows.items()} if isinstance(rows, dict) else rows
                                for q, rows in per_quantity.items()}
    as_record(record, model_keys=MODEL_QUANTITIES)
    record["quantities"] = {q: {row: float(v) for row, v in rows.items()} for q, rows in record["quantities"].items()}
    for key in MODEL_QUANTITIES:
        if record.get(key) is not None:
            record[key] = float(record[key])
    return record


def read_records(path: Union[str, "os.PathLike[str]"]) -> List[Dict[str, Any]]:
    """The records of a ``monitor.jsonl`` as `StabilityMonitor.history` holds them: the strings
    ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` of the model-level values and the quantities back to floats
    (e.g. for `stability_toolbox.warning_rules.replay`); blank lines are skipped.

    A torn last line (no end of line, not a whole JSON object, but the start of one: ASCII text beginning with
    ``{``, what a run that crashed while appending leaves) is skipped with a ``UserWarning`` naming the file and
    line; every record before it is returned. Any other unterminated last line (a binary file) is corrupt.

    Raises:
        TypeError: ``path`` is not a str or os.PathLike (an int file descriptor is refused).
        ValueError: an empty path, a directory or anything else that is not a regular file (a FIFO is refused
            at once, never waited on; a device); a gzip-compressed file; a line that is not JSON (corrupt, also
            in the middle of the file); a JSON line that is not a record (no integer ``step``, quantities not
            ``{str: {str: number}}``, ...). The message names the file and the line number.
        OSError: the file cannot be read (FileNotFoundError when it does not exist).

    Examples:
        >>> import tempfile, warnings
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "monitor.jsonl"
        >>> _ = path.write_text('{"step": 0, "loss": "NaN", "quantities": {}}\\n{"step": 10, "loss": 2.5, "quan')
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     records = read_records(path)
        >>> [r["step"] for r in records], "line 2 is torn" in str(caught[0].message)
        ([0], True)
    """
    path = as_path(path)
    data = _read_regular(path)
    if _not_records(path, data):
        raise ValueError(_not_records(path, data))
    if data.startswith(b"\xef\xbb\xbf"):  # a byte-order mark (a file saved by some editors): not JSON
        data = data[3:]
    *whole, tail = data.split(b"\n")  # tail: what follows the last end of line (b"" in a whole file)
    out = []
    for number, line in enumerate(whole + [tail], start=1):
        if not line.strip():
            continue
        try:
            value = _parse(line)
        except ValueError as e:
            if number == len(whole) + 1 and _torn_record(line):  # the record a crashed run was writing
                warnings.warn(f"{path}: line {number} is torn ({e}; {len(line)} bytes without an end of line, "
                              f"the record a crashed run was writing); skipped it, read {len(out)} records",
                              stacklevel=2)
                continue
            raise ValueError(f"{path}, line {number}: {e}; a monitor.jsonl line is one JSON record") from None
        try:
            out.append(_record(value))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}, line {number}: not a monitor record: {e}") from None
    return out


def as_log_dir(log_dir: Any) -> Optional[Path]:
    """``log_dir`` checked (None, or a path that is a directory or does not exist yet) as a ``Path``.

    Raises:
        TypeError / ValueError: not a path, an empty path, or a path to something that is not a directory.
    """
    if log_dir is None:
        return None
    log_dir = as_path(log_dir, "log_dir", what="directory path")
    if log_dir.exists() and not log_dir.is_dir():
        raise ValueError(f"log_dir {log_dir} exists and is not a directory")
    return log_dir


class _Lock:
    """``flock`` on an open file for the ``with`` block (shared or exclusive); nothing where there is no flock."""

    def __init__(self, f, exclusive: bool):
        self.fd = f.fileno()
        self.mode = None if fcntl is None else (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)

    def __enter__(self):
        if self.mode is not None:
            try:
                fcntl.flock(self.fd, self.mode)
            except OSError:  # a file system without flock (some network / FUSE mounts): append unguarded
                self.mode = None

    def __exit__(self, *exc):
        if self.mode is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


class RecordWriter:
    """Writes the records of one monitor under ``log_dir`` (created): ``monitor.jsonl`` (appended to: a
    second run adds its records; several writers may append at once, each record one whole line) and, with
    ``tensorboard``, TensorBoard scalars under ``tb/`` (opened at the first record; without tensorboardX, one
    warning to ``log`` and no TensorBoard).

    A ``monitor.jsonl`` that ends in a torn line (a crashed run's unfinished record) is repaired when opened:
    the torn bytes are dropped, with one warning to ``log``, so that the next record starts a line of its own.
    A ``monitor.jsonl`` that is not a record file (it ends in bytes that cannot start a record: a gzip or other
    binary file) or not a regular file (a FIFO) is refused with ValueError, left as it is.
    After `close`, `write` raises RuntimeError (like a closed file). A writer holds an open file: it cannot be
    pickled or copied (TypeError); make a new one where it is needed.

    Raises:
        TypeError / ValueError: ``log_dir`` not a directory path, ``tensorboard`` not a bool, ``log`` not a
            ``logging.Logger``.
    """

    def __init__(self, log_dir: Union[str, "os.PathLike[str]"], *, tensorboard: bool, log: logging.Logger):
        log_dir = as_log_dir(log_dir)
        if log_dir is None:
            raise TypeError("log_dir must be a directory path (str or os.PathLike), got None")
        tensorboard = checks.as_bool("tensorboard", tensorboard)
        if not isinstance(log, logging.Logger):
            raise TypeError(f"log must be a logging.Logger, got {type(log).__name__}")
        self.log_dir = log_dir
        self.log = log
        self._tensorboard = tensorboard
        self._tb = None
        log_dir.mkdir(parents=True, exist_ok=True)
        # unbuffered, opened for appending: each record is one write() of a whole line, which the OS appends
        # at the end of the file as one piece (so concurrent writers never interleave within a line)
        self._jsonl = open(log_dir / "monitor.jsonl", "a+b", buffering=0)  # O_RDWR: a FIFO opens without blocking
        try:
            if not stat.S_ISREG(os.fstat(self._jsonl.fileno()).st_mode):
                raise ValueError(f"log_dir {log_dir}: {log_dir / 'monitor.jsonl'} is not a regular file (a FIFO, "
                                 "socket or device); the monitor appends its records to a file there")
            self._repair_torn_tail()
        except BaseException:
            self._jsonl.close()
            raise

    def _repair_torn_tail(self) -> None:
        """Drop an unterminated last line that is not a whole JSON object (a crashed run's unfinished record);
        terminate one that is. Under an exclusive lock: no other writer is in the middle of a record."""
        f = self._jsonl
        with _Lock(f, exclusive=True):
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            start, chunk = size, 1 << 16
            while start > 0:  # the last end of line, read backwards
                lo = max(0, start - chunk)
                f.seek(lo)
                cut = f.read(start - lo).rfind(b"\n")
                if cut >= 0:
                    start = lo + cut + 1
                    break
                start = lo
            f.seek(start)
            tail = f.read()
            try:
                whole = isinstance(_parse(tail), dict)
            except ValueError:
                whole = False
            if whole:
                f.write(b"\n")
                return
            f.seek(0)
            head = f.read(3)
            if start == 0 and head == b"\xef\xbb\xbf":  # a byte-order mark before the only line
                tail = tail[3:]
            if head.startswith(_GZIP_MAGIC) or not _torn_record(tail):
                # not a record a crashed writer left (a compressed or binary file, another text): dropping it
                # would destroy data that is not ours; refuse, the file unchanged
                raise ValueError(f"log_dir {self.log_dir}: {self.log_dir / 'monitor.jsonl'} is not a monitor "
                                 f"record file (it ends in {size - start} bytes that are not the start of a "
                                 f"record{'; it is gzip-compressed' if head.startswith(_GZIP_MAGIC) else ''}); "
                                 "nothing was changed: move it away or give another log_dir")
            f.truncate(start)
            self.log.warning("stability monitor: %s ended in a torn line (%d bytes without an end of line: the "
                             "record a crashed run was writing); dropped it before appending",
                             self.log_dir / "monitor.jsonl", size - start)

    def __reduce_ex__(self, protocol):
        raise TypeError("a RecordWriter holds an open monitor.jsonl and cannot be pickled or copied (like a file); "
                        "make a new RecordWriter(log_dir, ...) where it is needed")

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` (checked first: `stability_toolbox.warning_rules.as_record`; a refused record writes
        nothing) to ``monitor.jsonl`` as one line, and to TensorBoard.

        Raises:
            RuntimeError: the writer is closed.
            TypeError / ValueError: ``record`` is not a record, or holds a value JSON cannot write (named).
        """
        if self._jsonl.closed:
            raise RuntimeError(f"this RecordWriter is closed ({self.log_dir / 'monitor.jsonl'}): write before close()")
        as_record(record, model_keys=MODEL_QUANTITIES)
        try:
            line = (json.dumps(_json_safe(record), allow_nan=False) + "\n").encode("ascii")
        except (TypeError, ValueError) as e:  # a value of another key that is not JSON (a tensor, a set...)
            raise TypeError(f"record: a value JSON cannot write ({e})") from None
        with _Lock(self._jsonl, exclusive=False):
            view = memoryview(line)
            while view:  # one write on a regular file; the loop only guards a short write
                view = view[self._jsonl.write(view):]
        if not self._tensorboard:
            return
        if self._tb is None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                self._tensorboard = False
                self.log.warning("stability monitor: tensorboardX is not installed; no TensorBoard scalars")
                return
            self._tb = SummaryWriter(str(self.log_dir / "tb"))
        step = record["step"]
        for q in MODEL_QUANTITIES:
            if record.get(q) is not None:
                self._tb.add_scalar(f"stability/{q}", float(record[q]), step)
        for q, rows in record.get("quantities", {}).items():
            for row, v in rows.items():
                # TensorBoard tags allow word characters and ./-: "(other)" becomes "_other_"
                self._tb.add_scalar(re.sub(r"[^\w./-]", "_", f"stability/{q}/{row}"), float(v), step)
        for line in record.get("warnings", ()):  # the same one-line text as the log and monitor.jsonl
            self._tb.add_text("stability/warnings", line, step)
        self._tb.flush()

    def add_images(self, paths: Sequence[Path], step: int) -> None:
        """The PNGs at ``paths`` (the heatmaps) as TensorBoard images at ``step``, if TensorBoard is open."""
        if self._jsonl.closed:
            raise RuntimeError(f"this RecordWriter is closed ({self.log_dir}): add images before close()")
        if self._tb is None:
            return
        from matplotlib.image import imread
        for path in paths:
            self._tb.add_image(f"stability/{path.stem}", imread(str(path))[..., :3], step, dataformats="HWC")

    @property
    def closed(self) -> bool:
        """Whether `close` was called."""
        return self._jsonl.closed

    def close(self) -> None:
        """Close ``monitor.jsonl`` and TensorBoard. Idempotent."""
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _issued(issued: Any) -> Sequence[Mapping[str, Any]]:
    """``issued`` checked: a sequence of warnings, each a mapping with a str ``message``."""
    if isinstance(issued, (str, bytes, Mapping)) or not isinstance(issued, Sequence) or \
            not all(isinstance(w, Mapping) and isinstance(w.get("message"), str) for w in issued):
        raise TypeError("issued must be a list of warnings, dicts with a str 'message' (as StabilityMonitor.warnings "
                        f"holds them), got {type(issued).__name__}")
    return issued


def _cell(text: Any) -> str:
    """A markdown table cell: a ``|`` in a layer name would end the cell."""
    return str(text).replace("|", "\\|")


def summary_table(history: Sequence[Mapping[str, Any]], issued: Sequence[Mapping[str, Any]], *, every: int,
                  n_sites: int, mechanism: str) -> str:
    """A markdown table: per quantity and row, the first, last and largest logged value, then the warnings.

    Args:
        history: the records; issued: the warnings issued (dicts with a ``message``).
        every, n_sites, mechanism: the monitor's interval, number of residual sites and how it found them
            (the heading line).

    Raises:
        TypeError / ValueError: an argument of the wrong kind (named; ``history`` as `as_history` checks it).

    Examples:
        >>> print(summary_table([{"step": 0, "quantities": {"beta": {"layers.0": 0.5}}}], [], every=10,
        ...                     n_sites=1, mechanism="residual modules").splitlines()[-1])
        | beta | layers.0 | 0.5 | 0.5 | 0.5 | 0 |
    """
    history = as_history(history)
    issued = _issued(issued)
    every = checks.as_int("every", every, minimum=1)
    n_sites = checks.as_int("n_sites", n_sites, minimum=0)
    if not isinstance(mechanism, str):
        raise TypeError(f"mechanism must be a str, got {type(mechanism).__name__}")
    if not history:
        return "(stability monitor: no logged step)"
    lines = [f"stability monitor: {len(history)} logged steps (every {every}), "
             f"{n_sites} sublayers via {mechanism}; {len(issued)} warnings", "",
             "| quantity | layer | first | last | max | max at step |", "|---|---|---|---|---|---|"]
    for q in QUANTITIES:
        rows: Dict[str, List[Tuple[int, float]]] = {}
        for h in history:
            for row, v in h.get("quantities", {}).get(q, {}).items():
                rows.setdefault(row, []).append((h["step"], float(v)))
        for row, series in rows.items():
            finite = [(s, v) for s, v in series if math.isfinite(v)]
            top = max(finite, key=lambda t: t[1]) if finite else (series[-1][0], float("nan"))
            lines.append(f"| {q} | {_cell(row)} | {series[0][1]:.4g} | {series[-1][1]:.4g} | {top[1]:.4g} | "
                         f"{top[0]} |")
    for w in issued:
        lines.append(f"\n{w['message']}")
    return "\n".join(lines)


def write_summary(directory: Union[str, "os.PathLike[str]"], text: str) -> Path:
    """Write ``text`` (the summary table) to ``directory/summary.md`` (to a temporary name, then renamed: a
    reader never sees half a summary); returns the path.

    Raises:
        TypeError / ValueError: ``directory`` not a directory path, ``text`` not a str.
    """
    directory = as_path(directory, "directory", what="directory path")
    if not isinstance(text, str):
        raise TypeError(f"text must be a str (the summary table), got {type(text).__name__}")
    path = directory / "summary.md"
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return path


def write_heatmaps(history: Sequence[Mapping[str, Any]], directory: Union[str, "os.PathLike[str]"], *,
                   every: int) -> List[Path]:
    """Write ``heatmap_<quantity>.png`` into ``directory`` (created) for each per-row quantity of ``history``
    (rows: layers in model order, columns: logged steps ``every`` apart; log colour scale for
    `LOG_SCALE`'s quantities); returns the paths written. Each PNG is written to a temporary name, then renamed.

    Raises:
        TypeError / ValueError: an argument of the wrong kind (named).
        ImportError: matplotlib is not installed.
    """
    history = as_history(history)
    directory = as_path(directory, "directory", what="directory path")
    every = checks.as_int("every", every, minimum=1)
    if not history:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    directory.mkdir(parents=True, exist_ok=True)
    steps = [h["step"] for h in history]
    written = []
    for q in QUANTITIES:
        rows: List[str] = []
        for h in history:
            rows += [r for r in h.get("quantities", {}).get(q, {}) if r not in rows]
        if not rows:
            continue
        grid = [[float(h.get("quantities", {}).get(q, {}).get(r, float("nan"))) for h in history] for r in rows]
        positive = [v for line in grid for v in line if math.isfinite(v) and v > 0]
        norm = LogNorm(min(positive), max(positive)) if q in LOG_SCALE and positive and \
            min(positive) < max(positive) else None
        fig, ax = plt.subplots(figsize=(min(14, 3 + 0.12 * len(steps)), min(12, 1.5 + 0.22 * len(rows))))
        masked = [[v if math.isfinite(v) and (norm is None or v > 0) else float("nan") for v in line]
                  for line in grid]
        im = ax.imshow(masked, aspect="auto", interpolation="nearest", norm=norm, cmap="viridis",
                       extent=(steps[0] - 0.5 * every, steps[-1] + 0.5 * every, len(rows) - 0.5, -0.5))
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows, fontsize=max(4, min(8, 300 // max(len(rows), 1))))
        ax.set_xlabel("step")
        ax.set_title(f"{q}{' (log scale)' if norm is not None else ''}", fontsize=9)
        fig.colorbar(im, ax=ax)
        with warnings.catch_warnings():  # long layer names: matplotlib cannot always fit the margins
            warnings.simplefilter("ignore")
            fig.tight_layout()
        path = directory / f"heatmap_{q}.png"
        try:
            with atomic_write(path, "wb") as f:
                fig.savefig(f, dpi=100, format="png")
        finally:
            plt.close(fig)
        written.append(path)
    return written
