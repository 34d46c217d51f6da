"""The monitor's records and what is made of them: ``monitor.jsonl``, TensorBoard, the summary, the heatmaps.

A *record* is one logging step: ``{"step": int, "loss": ..., "log_z_rms": ..., "quantities": {quantity:
{row: value}}, "warnings": [line, ...]}`` ([`StabilityMonitor.history`][stability_toolbox.StabilityMonitor]
holds them). Under the monitor's ``log_dir``, a [`RecordWriter`][stability_toolbox.records.RecordWriter]
appends each to ``monitor.jsonl`` (one JSON object per line; a non-finite value as the string ``"NaN"``,
``"Infinity"`` or ``"-Infinity"``: JSON has no literal for them) and to TensorBoard (``tb/``, tensorboardX;
the warnings as text ``stability/warnings``). [`read_records`][stability_toolbox.records.read_records] reads
a ``monitor.jsonl`` back with its numbers; [`summary_table`][stability_toolbox.records.summary_table] and
[`write_heatmaps`][stability_toolbox.records.write_heatmaps] turn a history into ``summary.md`` and one
``heatmap_<quantity>.png`` (layer x step) per quantity.

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
import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .quantities import LOG_SCALE, MODEL_QUANTITIES, QUANTITIES

__all__ = ["read_records", "RecordWriter", "as_log_dir", "summary_table", "write_heatmaps"]


def _json_safe(value):
    """``value`` with every non-finite float as a JSON string: ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
    (``float()`` reads them back); JSON has no literal for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


_NON_FINITE = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def read_records(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """The records of a ``monitor.jsonl`` as `StabilityMonitor.history` holds them: the strings
    ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` of the values of ``loss*``, ``log_z*`` and the quantities back
    to floats (e.g. for `stability_toolbox.warning_rules.replay`)."""
    def number(v):
        return _NON_FINITE.get(v, v) if isinstance(v, str) else v

    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            for key, v in record.items():
                if key not in ("quantities", "warnings", "step"):
                    record[key] = number(v)
            record["quantities"] = {q: {row: number(v) for row, v in rows.items()}
                                    for q, rows in record.get("quantities", {}).items()}
            out.append(record)
    return out


def as_log_dir(log_dir: Any) -> Optional[Path]:
    """``log_dir`` checked (None, or a path that is a directory or does not exist yet) as a ``Path``.

    Raises:
        TypeError / ValueError: not a path, an empty path, or a path to something that is not a directory.
    """
    if log_dir is None:
        return None
    if not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"log_dir must be a directory path (str or os.PathLike) or None, got "
                        f"{type(log_dir).__name__}")
    if not os.fspath(log_dir):
        raise ValueError("log_dir must be a non-empty directory path or None (in memory only), got ''")
    log_dir = Path(log_dir)
    if log_dir.exists() and not log_dir.is_dir():
        raise ValueError(f"log_dir {log_dir} exists and is not a directory")
    return log_dir


class RecordWriter:
    """Writes the records of one monitor under ``log_dir`` (created): ``monitor.jsonl`` (appended to: a
    second run adds its records) and, with ``tensorboard``, TensorBoard scalars under ``tb/`` (opened at the
    first record; without tensorboardX, one warning to ``log`` and no TensorBoard)."""

    def __init__(self, log_dir: Path, *, tensorboard: bool, log: logging.Logger):
        self.log_dir = log_dir
        self.log = log
        self._tensorboard = tensorboard
        self._tb = None
        log_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(log_dir / "monitor.jsonl", "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` to ``monitor.jsonl`` (flushed) and to TensorBoard."""
        self._jsonl.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        self._jsonl.flush()
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
                self._tb.add_scalar(f"stability/{q}", record[q], step)
        for q, rows in record["quantities"].items():
            for row, v in rows.items():
                # TensorBoard tags allow [A-Za-z0-9_./-]: "(other)" becomes "_other_"
                self._tb.add_scalar(re.sub(r"[^\w./-]", "_", f"stability/{q}/{row}"), v, step)
        for line in record.get("warnings", ()):  # the same one-line text as the log and monitor.jsonl
            self._tb.add_text("stability/warnings", line, step)
        self._tb.flush()

    def add_images(self, paths: Sequence[Path], step: int) -> None:
        """The PNGs at ``paths`` (the heatmaps) as TensorBoard images at ``step``, if TensorBoard is open."""
        if self._tb is None:
            return
        from matplotlib.image import imread
        for path in paths:
            self._tb.add_image(f"stability/{path.stem}", imread(str(path))[..., :3], step, dataformats="HWC")

    def close(self) -> None:
        """Close ``monitor.jsonl`` and TensorBoard."""
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def summary_table(history: Sequence[Mapping[str, Any]], issued: Sequence[Mapping[str, Any]], *, every: int,
                  n_sites: int, mechanism: str) -> str:
    """A markdown table: per quantity and row, the first, last and largest logged value, then the warnings.

    Args:
        history: the records; issued: the warnings issued (dicts with a ``message``).
        every, n_sites, mechanism: the monitor's interval, number of residual sites and how it found them
            (the heading line).
    """
    if not history:
        return "(stability monitor: no logged step)"
    lines = [f"stability monitor: {len(history)} logged steps (every {every}), "
             f"{n_sites} sublayers via {mechanism}; {len(issued)} warnings", "",
             "| quantity | layer | first | last | max | max at step |", "|---|---|---|---|---|---|"]
    for q in QUANTITIES:
        rows: Dict[str, List[Tuple[int, float]]] = {}
        for h in history:
            for row, v in h["quantities"].get(q, {}).items():
                rows.setdefault(row, []).append((h["step"], v))
        for row, series in rows.items():
            finite = [(s, v) for s, v in series if math.isfinite(v)]
            top = max(finite, key=lambda t: t[1]) if finite else (series[-1][0], float("nan"))
            lines.append(f"| {q} | {row} | {series[0][1]:.4g} | {series[-1][1]:.4g} | {top[1]:.4g} | {top[0]} |")
    for w in issued:
        lines.append(f"\n{w['message']}")
    return "\n".join(lines)


def write_heatmaps(history: Sequence[Mapping[str, Any]], directory: Path, *, every: int) -> List[Path]:
    """Write ``heatmap_<quantity>.png`` into ``directory`` (created) for each per-row quantity of ``history``
    (rows: layers in model order, columns: logged steps ``every`` apart; log colour scale for
    `LOG_SCALE`'s quantities); returns the paths written.

    Raises:
        ImportError: matplotlib is not installed.
    """
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
            rows += [r for r in h["quantities"].get(q, {}) if r not in rows]
        if not rows:
            continue
        grid = [[h["quantities"].get(q, {}).get(r, float("nan")) for h in history] for r in rows]
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
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
