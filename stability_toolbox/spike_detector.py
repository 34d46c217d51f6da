"""Robust running statistics of a few training signals, kept on the device: `SpikeDetector`.

Each signal (by default the step's loss and the global gradient norm) keeps the last ``window`` accepted
values in a ring buffer on the device. A new value ``x`` is scored against their median ``med`` and median
absolute deviation ``mad``:

    z = (x - med) / (max(1.4826 * mad, rel_floor * |med|) + abs_floor)

(``1.4826 * mad`` estimates the standard deviation of normal noise; the floors keep a flat series from
flagging a tiny rise). A window whose median and MAD are both 0 (a loss or a gradient norm sitting at exactly 0)
has no scale to judge a rise by: nothing is a spike then (non-finite values still are). A value is a *spike*
when ``z > threshold`` **and** ``x > med + (min_ratio - 1) * |med|`` (for a positive median: more than
``min_ratio`` times it) once ``warmup`` values were accepted (one-sided: a falling loss is never an event), and
*non-finite* when it is NaN or infinite (always an event). A step with an event adds nothing to the
statistics, so a spike does not widen the band that would let the next one through.

Why a ratio as well as the z-score: the MAD measures the width of the series' core, not its tails. When the
running spread is tight, 6 robust sigmas is a small relative rise, and signals with heavy tails (the gradient
norm of small batches) cross it on clean runs: on the spike benchmark's 9 clean runs the gradient norm rose to
1.69x its running median at 6.1 robust sigmas (a false skip) and to 1.85x at 5.8, the loss to at most 1.11x;
every spike the guard acted on in the failing runs was at least 2.9x (gradient norm) or 1.49x (loss). A spike
must therefore be both improbable (the z-score) and large (the ratio; metaseq's ``ewm_ratio_to_skip_batch``
asks only the latter: loss / its EWM > 1.5). ``min_ratio=1`` leaves the z-score alone; the guard's defaults
are `DEFAULT_MIN_RATIO`.

The median and the MAD are recomputed every ``refresh_every`` updates (and at each of the first
``2 * warmup + 1``, while the window is thin and moves with every value), from the window as it stands then;
the updates in between are scored against those (``refresh_every=1``: the exact running statistics of every
step). Two medians over the window cost ~15 tensor ops; spread over ``refresh_every`` steps they leave a step
~10 small tensor ops. A loss drifting down over 16 updates moves the median by a fraction of one robust
sigma: the 6-sigma threshold barely sees the difference. Everything runs in tensor ops on the signals' device: no
value is read on the host (no host-device synchronization); the host only counts the calls. For signals on
the CPU, where reading is free, `score_host` does the per-step arithmetic in Python floats on the same
statistics (the guard's default there): no tensor op at all between refreshes.

Examples:
    >>> import torch
    >>> det = SpikeDetector(("loss",), window=8, threshold=6.0, warmup=4)
    >>> for v in (3.0, 3.1, 2.9, 3.0, 3.05):
    ...     z, event = det.update(torch.tensor([v]))
    >>> z, event = det.update(torch.tensor([30.0]))
    >>> bool(event[0]), round(float(z[0]), 1)
    (True, 364.2)
    >>> z, event = det.update(torch.tensor([float("nan")]))
    >>> bool(event[0])
    True
    >>> tight = SpikeDetector(("grad_norm",), window=8, warmup=4, min_ratio=2.0)
    >>> for v in (1.0, 1.01, 0.99, 1.0, 1.005):
    ...     z, event = tight.update(torch.tensor([v]))
    >>> z, event = tight.update(torch.tensor([1.5]))    # 25 robust sigmas, but only 1.5x the median
    >>> bool(event[0]), round(float(z[0]), 1)
    (False, 25.0)
    >>> z, event = tight.update(torch.tensor([2.5]))
    >>> bool(event[0])
    True
"""

import ctypes
import math
import numbers
import types
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from toolbox_core import validation

__all__ = ["SpikeDetector", "DEFAULT_SIGNALS", "DEFAULT_MIN_RATIO", "check_min_ratio"]

#: the signals the guard scores: the step's mean loss and the global gradient L2 norm
DEFAULT_SIGNALS: Tuple[str, ...] = ("loss", "grad_norm")

#: the guard's ``min_ratio`` per signal: a loss spike is a rise of more than 20% over the running median, a
#: gradient-norm spike more than a doubling (between the largest rise of the benchmark's clean runs, 1.11x and
#: 1.85x, and the smallest spike of its failing runs, 1.49x and 2.9x; module docstring)
DEFAULT_MIN_RATIO: Mapping[str, float] = types.MappingProxyType({"loss": 1.2, "grad_norm": 2.0})

# 1 / Phi^-1(3/4): MAD * this estimates sigma for normal noise
_MAD_TO_SIGMA = 1.4826

_STATE_KEYS = ("buffer", "count", "offset", "inv", "calls")

# the largest min_ratio: the cut is computed in float32 (`SpikeDetector._set_cut`), where a larger ratio is infinite
# and, times a running median of 0, NaN: no value would ever be a spike, the z-score's included
_MAX_RATIO = float(torch.finfo(torch.float32).max)


def check_min_ratio(min_ratio: Union[float, Mapping[str, float]], names: Sequence[str],
                    default: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """``min_ratio`` (a real number for every signal, or a mapping ``{name: ratio}`` for some of ``names``, the
    others ``default``'s or 1.0) as ``{name: ratio}`` for every name; each a real number in ``[1, 3.4e38]`` (float32's
    range: the cut is computed in float32).

    Raises:
        TypeError / ValueError: naming ``min_ratio`` (or ``min_ratio['name']``) and what it accepts.

    Examples:
        >>> check_min_ratio({"grad_norm": 3}, ("loss", "grad_norm"), default={"loss": 1.2, "grad_norm": 2.0})
        {'loss': 1.2, 'grad_norm': 3.0}
    """
    default = default or {}
    if isinstance(min_ratio, Mapping):
        unknown = [k for k in min_ratio if k not in names]
        if unknown:
            raise ValueError(f"min_ratio: unknown signal(s) {unknown!r}; accepted: {', '.join(names)}")
        out = {n: float(default.get(n, 1.0)) for n in names}
        for n, r in min_ratio.items():
            out[n] = validation.as_real(f"min_ratio[{n!r}]", r, low=1.0, high=_MAX_RATIO)
        return out
    if isinstance(min_ratio, (str, bytes)) or not (isinstance(min_ratio, numbers.Real) or
                                                   isinstance(min_ratio, torch.Tensor)):
        raise TypeError(f"min_ratio must be a finite real number >= 1 or a mapping {{signal: ratio}} over "
                        f"{', '.join(names)}, got {type(min_ratio).__name__}")
    r = validation.as_real("min_ratio", min_ratio, low=1.0, high=_MAX_RATIO)
    return {n: r for n in names}


def _host_value(i: int, x: Any) -> float:
    """``score_host``'s ``values[i]`` as a float: any real number, NaN and infinities included (they are events, not
    errors); TypeError naming it for anything else, ValueError for an integer beyond a float."""
    if type(x) is float:  # the guard's case: nothing to convert
        return x
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"values[{i}] must be a real number (NaN and inf are events), got {type(x).__name__}")
    try:
        return float(x)
    except OverflowError:
        raise ValueError(f"values[{i}] must be a real number, got an integer too large for a float") from None


class SpikeDetector:
    """Robust z-scores of ``len(names)`` scalar signals over a ring of their last ``window`` accepted values.

    Args:
        names: the signals' names (non-empty, distinct strings), in the order of ``update``'s values.
        window: how many accepted values the statistics span (an integer >= 2).
        threshold: a value more than ``threshold`` robust standard deviations above the median is a spike
            (a real number > 0).
        warmup: spikes are scored once this many values were accepted (an integer in ``[1, window]``);
            non-finite values are events from the first step.
        rel_floor, abs_floor: the floors of the scale (real numbers >= 0; their sum must be > 0).
        min_ratio: a spike must also exceed the running median by this factor (``x > med + (min_ratio - 1) *
            |med|``): a real number in ``[1, 3.4e38]`` for every signal, or a mapping ``{name: ratio}`` for some of them
            (the others 1.0: the z-score alone).
        refresh_every: recompute the median and the MAD every this many updates (an integer >= 1; 1: every
            update, the exact running statistics).
        device: where the statistics live (default: the CPU, moved to the first values' device).

    Raises:
        TypeError / ValueError: a bad argument, named.
    """

    def __init__(self, names: Sequence[str] = DEFAULT_SIGNALS, *, window: int = 128, threshold: float = 6.0,
                 warmup: int = 16, rel_floor: float = 0.02, abs_floor: float = 1e-6, refresh_every: int = 16,
                 min_ratio: Union[float, Mapping[str, float]] = 1.0, device: Optional[torch.device] = None):
        if isinstance(names, str) or not isinstance(names, Sequence) or not names or \
                not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise TypeError(f"names must be a non-empty sequence of distinct signal names (strings), got {names!r}")
        self.names = tuple(names)
        self.window = validation.as_int("window", window, minimum=2)
        self.threshold = validation.as_real("threshold", threshold, low=0.0, low_open=True)
        self.warmup = validation.as_int("warmup", warmup, minimum=1, maximum=self.window)
        self.rel_floor = validation.as_real("rel_floor", rel_floor, low=0.0)
        self.abs_floor = validation.as_real("abs_floor", abs_floor, low=0.0)
        if self.rel_floor + self.abs_floor <= 0:
            raise ValueError("rel_floor and abs_floor must not both be 0: a flat series would score every rise as "
                             "infinitely many standard deviations")
        self.refresh_every = validation.as_int("refresh_every", refresh_every, minimum=1)
        self.min_ratio = check_min_ratio(min_ratio, self.names)
        device = torch.device("cpu") if device is None else validation.as_device("device", device)
        k = len(self.names)
        # window + 1 columns: the accepted values go round the ring; the column at count % (window + 1) is the
        # scratch one (this step's value is written there unconditionally, and counts only when accepted: one
        # index_copy_ and one add, no select of the old value), left out of the statistics
        self._buffer = torch.full((k, self.window + 1), float("nan"), device=device)
        self._count = torch.zeros((), dtype=torch.long, device=device)
        # from the last refresh: z = x * inv + offset, offset = -median * inv (NaN while not ready: z is NaN,
        # no spike), inv = 1 / (scale + abs_floor)
        self._offset = torch.full((k,), float("nan"), device=device)
        self._inv = torch.ones((k,), device=device)
        self._cut = torch.full((k,), float("nan"), device=device)
        self._median = torch.full((k,), float("nan"), device=device)
        self._ratio = torch.tensor([self.min_ratio[n] - 1.0 for n in self.names], device=device)
        self._calls = 0  # on the host: when to refresh
        self._host_stats: Any = None  # score_host's: the refresh's offset and inv as floats, NumPy views

    @property
    def device(self) -> torch.device:
        """Where the statistics live."""
        return self._buffer.device

    def to(self, device: torch.device) -> "SpikeDetector":
        """Move the statistics to ``device`` (once, before the first step; in place)."""
        device = validation.as_device("device", device)
        for name in ("_buffer", "_count", "_offset", "_inv", "_cut", "_median", "_ratio"):
            setattr(self, name, getattr(self, name).to(device))
        self._host_stats = None
        return self

    def _tick(self) -> None:
        """Count a call; refresh the statistics at each of the first ``2 * warmup + 1`` calls (a thin window moves
        with every value) and every ``refresh_every``-th after."""
        if self._calls <= 2 * self.warmup or self._calls % self.refresh_every == 0:
            self._refresh()
        self._calls += 1

    def _refresh(self) -> None:
        """The median and the scale of the window now (the scratch column left out), ~15 tensor ops."""
        buf = self._buffer.index_fill(1, torch.remainder(self._count, self.window + 1).reshape(1), float("nan"))
        med = buf.nanmedian(dim=1).values
        mad = (buf - med[:, None]).abs().nanmedian(dim=1).values
        spread = torch.maximum(_MAD_TO_SIGMA * mad, self.rel_floor * med.abs())
        # a window of exact zeros (a loss or gradient norm at 0) has no scale: any rise would score ~1e6 sigmas
        ready = (self._count >= self.warmup) & (spread > 0)
        # z = (x - med) / scale as one fused multiply-add per step: x * inv + offset (NaN offset: not ready)
        self._inv = (spread + self.abs_floor).reciprocal()
        self._offset = torch.where(ready, med.neg().mul_(self._inv), float("nan"))
        self._set_cut()

    def _set_cut(self) -> None:
        """The decision's cut-off from the refresh's ``offset`` and ``inv``: a value ``x`` (rounded to float32) is a
        spike when ``x > cut``, ``cut = max((threshold - offset) / inv, med + (min_ratio - 1) * |med|)`` with
        ``med = -offset / inv``: the z-score's cut (``median + threshold * scale``) and the ratio's, both in float32
        tensor ops (NaN: not ready). A comparison of two float32 numbers is exact, on the device and in Python
        floats alike, so `score` and `score_host` take the same decision on the same values; ``z > threshold``
        computed in float32 on one side and in float64 on the other would not, at the threshold. Derived from the
        saved ``offset`` and ``inv`` (not saved itself), so a loaded state decides as the one that was saved."""
        self._median = self._offset.neg() / self._inv
        # torch.maximum keeps a NaN (not ready) of either side
        self._cut = torch.maximum((self.threshold - self._offset) / self._inv,
                                  self._median + self._ratio * self._median.abs())
        self._host_stats = None

    @torch.no_grad()
    def update(self, values: Tensor, present: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Score ``values`` (shape ``(len(names),)``, float) and add them to the statistics unless one is an event.

        ``present`` (bool, same shape; default all True) marks signals observed this step: an absent one is
        neither scored nor stored. Returns ``(z, event)``: the robust z-scores (NaN while the statistics are not
        ready) and the per-signal event flags (spike or non-finite), both on the device, nothing read.
        """
        z, event, _, _ = self.score(values, present)
        return z, event

    def _check_values(self, values: Any, present: Any) -> None:
        """TypeError/ValueError naming ``values`` or ``present`` unless they are real (bool) tensors of shape
        ``(len(names),)`` that hold data: metadata only, no read (the guard's step pays a few attribute reads)."""
        k = len(self.names)
        for name, t, kind in (("values", values, "real"), ("present", present, "bool")):
            if name == "present" and t is None:
                continue
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a {kind} tensor of shape ({k},) (one per signal {self.names}), got "
                                f"{type(t).__name__}")
            if tuple(t.shape) != (k,):
                raise ValueError(f"{name} must be a {kind} tensor of shape ({k},) (one per signal {self.names}), got "
                                 f"shape {tuple(t.shape)}")
            bad_dtype = (t.dtype != torch.bool) if kind == "bool" else (t.dtype == torch.bool or t.is_complex())
            if bad_dtype or t.is_meta:
                raise TypeError(f"{name} must be a {kind} tensor with data, got dtype {t.dtype} on {t.device}")

    def score(self, values: Tensor, present: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """`update` for the guard's step: ``(z, event, nonfinite, any event)`` (the last 0-d). ``values`` and
        ``present`` are checked (metadata only) before anything changes."""
        self._check_values(values, present)
        x = values.detach()
        if x.device != self._buffer.device or x.dtype != torch.float32:
            x = x.to(self._buffer.device, torch.float32)
        if self._calls <= 2 * self.warmup or self._calls % self.refresh_every == 0:
            self._refresh()
        self._calls += 1
        # ~10 tensor ops: this runs every step
        z = torch.addcmul(self._offset, x, self._inv)
        nonfinite = (x * 0.0) != 0.0  # inf * 0 and NaN * 0 are NaN: one op fewer than ~isfinite
        event = (x > self._cut) | nonfinite  # = z > threshold, decided exactly (`_set_cut`); NaN compares False
        if present is not None:  # an absent signal is neither scored nor stored (NaN: nanmedian skips it)
            present = present.to(x.device, torch.bool)
            event = event & present
            nonfinite = nonfinite & present
            x = torch.where(present, x, torch.full_like(x, float("nan")))
        any_event = event.any()
        self._buffer.index_copy_(1, torch.remainder(self._count, self.window + 1).reshape(1), x[:, None])
        self._count.add_(~any_event)
        return z, event, nonfinite, any_event

    def score_host(self, values: List[float],
                   present: Optional[List[bool]] = None) -> Tuple[List[float], List[bool], List[bool], bool]:
        """`score` on the host, for signals on the CPU (where reading them is free): the same statistics (the
        buffer is written through a NumPy view of its memory, so `state_dict` and the device path see it), the
        per-step arithmetic in Python floats instead of ~10 tensor ops (the refresh stays in tensor ops). The
        z-scores agree with `score`'s to float32 rounding, the decisions exactly (`_set_cut`). Returns lists and a
        bool."""
        for name, seq in (("values", values), ("present", present)):
            if seq is not None and not isinstance(seq, (list, tuple)):
                raise TypeError(f"{name} must be a list with one entry per signal {self.names}, got "
                                f"{type(seq).__name__}")
        if len(values) != len(self.names) or (present is not None and len(present) != len(self.names)):
            raise ValueError(f"values (and present) must have one entry per signal {self.names}, got {len(values)}")
        # a non-finite value is an event (scored below), not an error; anything but a real number is refused first
        values = [_host_value(i, x) for i, x in enumerate(values)]
        if present is not None:
            present = [validation.as_bool(f"present[{i}]", x) for i, x in enumerate(present)]
        if self.device.type != "cpu":
            raise ValueError(f"score_host: the statistics are on {self.device}, not the CPU (use score)")
        if self._calls <= 2 * self.warmup or self._calls % self.refresh_every == 0:
            self._refresh()
        self._calls += 1
        if self._host_stats is None:  # refreshed (or loaded) since the last host step
            self._host_stats = (self._offset.tolist(), self._inv.tolist(), self._cut.tolist(), self._buffer.numpy(),
                                self._count.numpy())
        offset, inv, cut, buf, count = self._host_stats
        c = int(count)
        slot = c % (self.window + 1)
        z, event, nonfinite = [], [], []
        for i, x in enumerate(values):  # a loop over the signals (two), not over anything large
            # the value as the device path holds it: rounded to float32 (beyond its range: infinite)
            x = ctypes.c_float(x).value
            bad = not math.isfinite(x)
            zi = x * inv[i] + offset[i]
            hit = x > cut[i] or bad  # exactly the device path's decision (`_set_cut`); NaN compares False
            if present is not None and not present[i]:  # an absent signal is neither scored nor stored
                hit = bad = False
                x = math.nan
            buf[i, slot] = x
            z.append(zi)
            event.append(hit)
            nonfinite.append(bad)
        any_event = True in event
        if not any_event:
            count[...] = c + 1
        return z, event, nonfinite, any_event

    def state_dict(self) -> Dict[str, Any]:
        """The statistics (tensors cloned, on their device; ``calls`` a host integer)."""
        return {"buffer": self._buffer.clone(), "count": self._count.clone(), "offset": self._offset.clone(),
                "inv": self._inv.clone(), "calls": self._calls}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what `state_dict` gave, onto this detector's device (checked first: ValueError for another
        detector's shape)."""
        if not isinstance(state, dict) or set(state) != set(_STATE_KEYS):
            raise ValueError(f"state must be a SpikeDetector.state_dict() (keys {', '.join(_STATE_KEYS)})")
        k = len(self.names)
        for key, shape, floating in (("buffer", tuple(self._buffer.shape), True), ("count", (), False),
                                     ("offset", (k,), True), ("inv", (k,), True)):
            t = state[key]
            if not isinstance(t, Tensor) or t.is_meta or t.layout != torch.strided:
                raise TypeError(f"state['{key}'] must be a dense tensor with data, got "
                                f"{type(t).__name__ if not isinstance(t, Tensor) else f'{t.layout} on {t.device}'}")
            if (not t.is_floating_point()) if floating else (t.is_floating_point() or t.is_complex()
                                                              or t.dtype == torch.bool):
                raise TypeError(f"state['{key}'] must be a {'floating' if floating else 'integer'} tensor, got "
                                f"dtype {t.dtype}")
            if tuple(t.shape) != shape:
                raise ValueError(f"state['{key}'] has shape {tuple(t.shape)}, this detector keeps {shape}"
                                 + (" (signals x (window + 1))" if key == "buffer" else ""))
        calls = validation.as_int("state['calls']", state["calls"], minimum=0)
        self._buffer.copy_(state["buffer"])
        self._count.copy_(state["count"])
        self._offset = state["offset"].to(self.device, copy=True)
        self._inv = state["inv"].to(self.device, copy=True)
        self._set_cut()
        self._calls = calls
