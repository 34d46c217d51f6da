"""Robust running statistics of a few training signals, kept on the device: `SpikeDetector`.

Each signal (by default the step's loss and the global gradient norm) keeps the last ``window`` accepted
values in a ring buffer on the device. A new value ``x`` is scored against their median ``med`` and median
absolute deviation ``mad``:

    z = (x - med) / max(1.4826 * mad, rel_floor * |med|, abs_floor)

(``1.4826 * mad`` estimates the standard deviation of normal noise; the floors keep a flat series from
flagging a tiny rise). A window whose median and MAD are both 0 (a loss or a gradient norm sitting at exactly 0)
has no scale to judge a rise by: nothing is a spike then (non-finite values still are). A value is a *spike* when ``z > threshold`` once ``warmup`` values were accepted
(one-sided: a falling loss is never an event), and *non-finite* when it is NaN or infinite (always an
event). A step with an event adds nothing to the statistics, so a spike does not widen the band that
would let the next one through. Everything runs in tensor ops on the signals' device: no value is read on
the host (no host-device synchronization), and the ring position is a device tensor.

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
"""

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from toolbox_core import validation

__all__ = ["SpikeDetector", "DEFAULT_SIGNALS"]

#: the signals the guard scores: the step's mean loss and the global gradient L2 norm
DEFAULT_SIGNALS: Tuple[str, ...] = ("loss", "grad_norm")

# 1 / Phi^-1(3/4): MAD * this estimates sigma for normal noise
_MAD_TO_SIGMA = 1.4826


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
        device: where the statistics live (default: the CPU, moved to the first values' device).

    Raises:
        TypeError / ValueError: a bad argument, named.
    """

    def __init__(self, names: Sequence[str] = DEFAULT_SIGNALS, *, window: int = 128, threshold: float = 6.0,
                 warmup: int = 16, rel_floor: float = 0.02, abs_floor: float = 1e-6,
                 device: Optional[torch.device] = None):
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
        device = torch.device("cpu") if device is None else torch.device(device)
        k = len(self.names)
        self._buffer = torch.full((k, self.window), float("nan"), device=device)
        self._position = torch.zeros(1, dtype=torch.long, device=device)
        self._count = torch.zeros((), dtype=torch.long, device=device)

    @property
    def device(self) -> torch.device:
        """Where the statistics live."""
        return self._buffer.device

    def to(self, device: torch.device) -> "SpikeDetector":
        """Move the statistics to ``device`` (once, before the first step; in place)."""
        self._buffer = self._buffer.to(device)
        self._position = self._position.to(device)
        self._count = self._count.to(device)
        return self

    @torch.no_grad()
    def update(self, values: Tensor, present: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Score ``values`` (shape ``(len(names),)``, float) and add them to the statistics unless one is an event.

        ``present`` (bool, same shape; default all True) marks signals observed this step: an absent one is
        neither scored nor stored. Returns ``(z, event)``: the robust z-scores (NaN before anything was
        accepted) and the per-signal event flags (spike or non-finite), both on the device, nothing read.
        """
        if not isinstance(values, Tensor) or values.shape != (len(self.names),):
            raise ValueError(f"values must be a tensor of shape ({len(self.names)},) (one per signal "
                             f"{self.names}), got {getattr(values, 'shape', type(values).__name__)}")
        x = values.detach()
        if x.device != self._buffer.device or x.dtype != torch.float32:
            x = x.to(self._buffer.device, torch.float32)
        buf = self._buffer
        med = buf.nanmedian(dim=1).values
        mad = (buf - med[:, None]).abs().nanmedian(dim=1).values
        spread = torch.maximum(_MAD_TO_SIGMA * mad, self.rel_floor * med.abs())
        z = (x - med) / (spread + self.abs_floor)
        # a window of exact zeros (a loss or gradient norm at 0) has no scale: any rise would score ~1e6 sigmas
        ready = (self._count >= self.warmup) & (spread > 0)
        spike = ready & (z > self.threshold)  # NaN compares False
        nonfinite = ~torch.isfinite(x)
        event = spike | nonfinite
        stored = x
        if present is not None:  # an absent signal is neither scored nor stored (NaN: nanmedian skips it)
            present = present.to(x.device, torch.bool)
            event = event & present
            stored = torch.where(present, x, torch.full_like(x, float("nan")))
        accept = ~event.any()
        column = buf.index_select(1, self._position).squeeze(1)
        buf.index_copy_(1, self._position, torch.where(accept, stored, column)[:, None])
        self._position.copy_(torch.where(accept, (self._position + 1) % self.window, self._position))
        self._count.add_(accept.long())
        return z, event

    def state_dict(self) -> Dict[str, Any]:
        """The statistics (cloned; on their device)."""
        return {"buffer": self._buffer.clone(), "position": self._position.clone(), "count": self._count.clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what `state_dict` gave (checked first: ValueError for another detector's shape)."""
        if not isinstance(state, dict) or set(state) != {"buffer", "position", "count"}:
            raise ValueError("state must be a SpikeDetector.state_dict() (keys buffer, position, count)")
        if tuple(state["buffer"].shape) != tuple(self._buffer.shape):
            raise ValueError(f"state: buffer of shape {tuple(state['buffer'].shape)}, this detector keeps "
                             f"{tuple(self._buffer.shape)} (signals x window)")
        self._buffer.copy_(state["buffer"])
        self._position.copy_(state["position"])
        self._count.copy_(state["count"])
