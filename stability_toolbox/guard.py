"""Training that survives its instabilities: [`StabilityGuard`][stability_toolbox.StabilityGuard] skips, rewinds, backs off or stops.

The guard wraps ``optimizer.step``. Each step it scores the step's loss and the global gradient norm against
their robust running statistics (`stability_toolbox.spike_detector`, on the device), decides on the device
whether the update is applied (`stability_toolbox.conditional_step`: a skipped update leaves the parameters
and the optimizer state as if the batch never came), and hands the signals to the host without waiting
(on a GPU one step later, when that step's flags are long computed: no host-device synchronization in a step
without an event). On the CPU, where reading a value is free, the step's two numbers are read at once and
scored in Python floats (`SpikeDetector.score_host`): a step without an event costs the gradient norm and a
few tensor ops. On the host the policy table (`stability_toolbox.guard_policy`) turns signals, and the
warnings of an attached [`StabilityMonitor`][stability_toolbox.StabilityMonitor], into an action:

* ``skip``: the update was not applied (too many skips in a window escalate to ``rewind``);
* ``rewind``: restore the last good snapshot (`stability_toolbox.snapshots`: model, optimizer, scheduler,
  grad scaler, random generators, data position), skip the ``rewind_skip`` batches from the one that raised
  the event on, and multiply the learning rate by ``backoff`` for ``backoff_updates`` updates (too many
  rewinds in a window escalate to ``cut_lr``). With [`batches`][stability_toolbox.StabilityGuard.batches]
  (an indexable data source) the batches after the snapshot are replayed: a rewind with ``rewind_skip=0`` and
  no backoff reproduces the uninterrupted run bit for bit. Without it (a trainer that owns its data loader)
  the data moves on, and the next ``rewind_skip`` updates are skipped instead (PaLM's restart-and-skip);
* ``cut_lr``: spikes that come back after rewinds say the learning rate is too high (OPT-175B's diagnosis,
  whose team rewound and lowered it by hand): the rewind, and the learning rate multiplied by the policy's
  ``lr_cut`` for the rest of the run (on top of the scheduler's rate: the update uses
  ``scheduler lr x lr_cut ** cuts``; the cuts are in `state_dict`). After ``max_lr_cuts`` cuts it stops;
* ``stop``: `stopped` becomes True and `stop_reason` names the mechanism and the remedy (deep Post-LN:
  "convert with admin_torch"); the guard applies no further update.

Every event is one log line (logger ``stability_toolbox.guard``, WARNING, beginning ``stability guard:``) and
a record in ``<log_dir>/monitor.jsonl`` (key ``"guard"``; the line also under ``"warnings"``, so TensorBoard
shows it as the text ``stability/warnings``). A run without events is not changed: the update applied is
the optimizer's own, bit for bit.

Examples:
    >>> import torch
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    >>> data = [torch.randn(8, 4) for _ in range(40)]
    >>> data[30] = data[30] * 1e4                         # a poisoned batch
    >>> guard = StabilityGuard(model, opt, snapshot_every=10)
    >>> for i, x in guard.batches(data):                   # (data index, batch)
    ...     loss = model(x).pow(2).mean()
    ...     loss.backward()
    ...     guard.step(loss)                               # optimizer.step() under the guard
    ...     opt.zero_grad()
    >>> [(e["update"], e["action"], e["signals"]) for e in guard.events]
    [(30, 'skip', ['loss_spike', 'grad_norm_spike'])]
"""

import copy
import logging
import math
import numbers
import os
import types
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from toolbox_core import validation

from .conditional_step import conditional_step, skip_path
from .guard_gradients import OptimizerGradients, check_grad_norm, stamp, unchanged
from .scalar_reader import as_scalar
from .guard_policy import GuardPolicy, severest
from .records import RecordWriter, as_log_dir
from .snapshots import SnapshotRing, capture, restore
from .spike_detector import DEFAULT_MIN_RATIO, DEFAULT_SIGNALS, SpikeDetector, check_min_ratio
from .warning_rules import DIAGNOSES, Diagnosis

__all__ = ["StabilityGuard", "GuardStopped"]

logger = logging.getLogger(__name__)

_SIGNAL_OF = {"loss": "loss_spike", "grad_norm": "grad_norm_spike"}
_WHAT = {"loss_spike": "loss", "grad_norm_spike": "global gradient norm"}


_F32_MAX = 3.4028234663852886e38


def _scalable_lr(lr: Any) -> bool:
    """Whether a parameter group's ``lr`` is a rate the guard can multiply: a real number or a one-element
    floating tensor (torch's capturable and fused Adam take ``lr=torch.tensor(...)``)."""
    if isinstance(lr, Tensor):
        return lr.is_floating_point() and lr.numel() == 1
    return isinstance(lr, numbers.Real) and not isinstance(lr, bool)


def _f32(x: float) -> float:
    """``x`` in float32's range (beyond it: infinite, as a float32 tensor holds it)."""
    return x if abs(x) <= _F32_MAX or x != x else math.copysign(math.inf, x)


def _times(value: float, median: float) -> str:
    """``value`` as a multiple of ``median`` for an event line (``2.3x``; a rise over a median <= 0 as a difference)."""
    return f"{value / median:.3g}x" if median > 0 else f"{value - median:+.4g} over"


class GuardStopped(RuntimeError):
    """Raised by [`StabilityGuard.step`][stability_toolbox.StabilityGuard.step] when called after the guard stopped the run."""


def _stop_diagnosis(signals: Sequence[str]) -> Diagnosis:
    for s in signals:
        if s.startswith("warning:") and s[8:] in DIAGNOSES:
            return DIAGNOSES[s[8:]]
    return Diagnosis("an instability that skipping batches and rewinding did not cure (loss or gradient-norm "
                     "spikes keep coming back from the same model state)",
                     "a lower peak learning rate or a longer warm-up, gradient clipping (clip 1.0), Adam beta2 "
                     "0.95; run the stability monitor (stability_toolbox.StabilityMonitor) to name the mechanism")


class StabilityGuard:
    """Guard the training of ``model`` by ``optimizer`` (module docstring).

    Args:
        model: the model (``nn.Module``; under DDP the wrapper or the module, its state dict is what is saved).
        optimizer: the ``torch.optim.Optimizer``; its ``step`` is wrapped until [`detach`][stability_toolbox.StabilityGuard.detach].
        scheduler, scaler: a learning-rate scheduler and a ``torch.amp.GradScaler`` whose states the snapshots hold.
        policy: the decision table (default `GuardPolicy()`).
        monitor: a `StabilityMonitor` whose warnings become ``warning:<quantity>`` signals.
        window, threshold, warmup: the spike detector's (`SpikeDetector`): a value more than ``threshold``
            robust standard deviations above the median of its last ``window`` values, after ``warmup``.
        min_ratio: ... and more than this multiple of that median (`SpikeDetector`): a real number in [1, 3.4e38]
            for both signals, or a mapping ``{"loss": r, "grad_norm": r}`` for one or both (default `DEFAULT_MIN_RATIO`:
            1.2 for the loss, 2.0 for the gradient norm; 1.0: the z-score alone).
        refresh_every: the detector recomputes the median and the MAD every this many updates (`SpikeDetector`).
        signals: the signals scored, a subset of ``("loss", "grad_norm")``.
        snapshot_every: take a snapshot every this many updates (an integer >= 1), from update 0 (before any).
        snapshots: how many snapshots are kept (an integer >= 1).
        snapshot_dir: a directory for the snapshots (atomic files); None keeps them in host memory.
        rewind_skip: after a rewind, skip this many batches from the one that raised the event (>= 0).
        backoff: after a rewind, the learning rate is multiplied by this factor (in (0, 1]) ...
        backoff_updates: ... for this many updates (>= 0).
        log_dir: where event records go (``monitor.jsonl``; default: the monitor's ``log_dir``, else none).
        tensorboard: also write the events to TensorBoard (with a ``log_dir``).
        process_group: under ``torch.distributed``, the group whose ranks take one decision (default: the
            world when initialized; one all-reduce of a few numbers per step).
        log: the logger the event lines go to (default ``stability_toolbox.guard``).
        decide_on_host: read the skip flag on the host and not call the step (None: for CPU runs, where that is
            no synchronization and saves the device path's copies; False: always the device path).

    Raises:
        TypeError / ValueError: a bad argument, named; nothing is wrapped then.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, scheduler: Any = None,
                 scaler: Any = None, policy: Optional[GuardPolicy] = None, monitor: Any = None,
                 window: int = 128, threshold: float = 6.0, warmup: int = 16, refresh_every: int = 16,
                 min_ratio: Optional[Union[float, Mapping[str, float]]] = None,
                 signals: Sequence[str] = DEFAULT_SIGNALS, snapshot_every: int = 100, snapshots: int = 2,
                 snapshot_dir: Optional[Union[str, "os.PathLike[str]"]] = None, rewind_skip: int = 10,
                 backoff: float = 0.5, backoff_updates: int = 50, log_dir: Optional[Union[str, Path]] = None,
                 tensorboard: bool = True, process_group: Any = None, log: Optional[logging.Logger] = None,
                 decide_on_host: Optional[bool] = None):
        # ---- every check first: a refused call wraps nothing
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if getattr(optimizer.step, "_stability_guard", None) is not None:
            raise ValueError("optimizer: already guarded by another StabilityGuard (detach() it first)")
        for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
            if obj is not None and not (callable(getattr(obj, "state_dict", None)) and
                                        callable(getattr(obj, "load_state_dict", None))):
                raise TypeError(f"{name} must have state_dict() and load_state_dict(), got {type(obj).__name__}")
        policy = GuardPolicy() if policy is None else policy
        if not isinstance(policy, GuardPolicy):
            raise TypeError(f"policy must be a GuardPolicy, got {type(policy).__name__}")
        if monitor is not None and not hasattr(monitor, "warnings"):
            raise TypeError(f"monitor must be a StabilityMonitor, got {type(monitor).__name__}")
        if isinstance(signals, str) or not isinstance(signals, Sequence) or not signals or \
                not set(signals) <= set(DEFAULT_SIGNALS) or len(set(signals)) != len(signals):
            raise ValueError(f"signals must be a non-empty subset of {DEFAULT_SIGNALS}, got {signals!r}")
        ratios = check_min_ratio(DEFAULT_MIN_RATIO if min_ratio is None else min_ratio, DEFAULT_SIGNALS,
                                 default=DEFAULT_MIN_RATIO)
        ratios = {s: ratios[s] for s in signals}
        detector = SpikeDetector(tuple(signals), window=window, threshold=threshold, warmup=warmup,
                                 refresh_every=refresh_every, min_ratio=ratios)
        self.snapshot_every = validation.as_int("snapshot_every", snapshot_every, minimum=1)
        self.rewind_skip = validation.as_int("rewind_skip", rewind_skip, minimum=0)
        self.backoff = validation.as_real("backoff", backoff, low=0.0, high=1.0, low_open=True)
        self.backoff_updates = validation.as_int("backoff_updates", backoff_updates, minimum=0)
        tensorboard = validation.as_bool("tensorboard", tensorboard)
        if decide_on_host is not None:
            decide_on_host = validation.as_bool("decide_on_host", decide_on_host)
        if log is not None and not isinstance(log, logging.Logger):
            raise TypeError(f"log must be a logging.Logger, got {type(log).__name__}")
        log_dir = as_log_dir(log_dir)
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank(process_group)
            world = torch.distributed.get_world_size(process_group)
        ring = SnapshotRing(snapshots, snapshot_dir, prefix=f"rank{rank}-" if world > 1 else "")
        skip_path(optimizer)  # raises for an optimizer it cannot step
        # ---- attach
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.policy = policy
        self.monitor = monitor
        self.detector = detector
        self.signals = tuple(signals)
        self.ring = ring
        self.log = log or logger
        self.process_group = process_group
        self.decide_on_host = decide_on_host
        self._masks: Dict[torch.device, Tuple[Tensor, Tensor]] = {}
        self._every_event_skips = all(policy.skips_on_device(_SIGNAL_OF[s]) for s in signals) and \
            policy.skips_on_device("nonfinite")
        self.world = world
        self.updates = 0                    # optimizer steps taken under the guard (rewinds set it back)
        self.events: List[Dict[str, Any]] = []
        self.stopped = False
        self.stop_reason: Optional[str] = None
        self.skipped_updates = 0            # updates not applied (skips, forced skips after a rewind)
        self.undone_updates = 0             # applied updates a rewind threw away
        self.rewinds = 0
        self._loss_sum: Optional[Tensor] = None
        self._loss_n = 0
        self._index: Optional[int] = None   # the data index of the batch being trained on (batches())
        self._position: Optional[int] = None
        self._replay = False                # batches() drives the data: rewinds replay it
        self._skip_indices: set = set()
        self._forced_skips = 0              # trainer mode: updates to skip after a rewind
        self._backoff_left = 0
        self.lr_cuts = 0                    # cut_lr actions taken: the learning rate is x policy.lr_cut ** lr_cuts
        self._skip_log: List[Tuple[int, Optional[int]]] = []  # (update, data index) of recent skips
        self._skipped: List[int] = []       # the updates skipped since the oldest kept snapshot
        self._rewind_times: List[int] = []
        self._pending: List[Tuple[int, Optional[int], Tensor, Any]] = []
        self._monitor_seen = len(monitor.warnings) if monitor is not None else 0
        self._writer = None
        if log_dir is None and monitor is not None and getattr(monitor, "_writer", None) is not None:
            self._writer = monitor._writer      # one monitor.jsonl, one TensorBoard writer
        elif log_dir is not None:
            self._writer = RecordWriter(log_dir, tensorboard=tensorboard, log=self.log)
            self._own_writer = True
        self._had_instance_step = "step" in optimizer.__dict__  # e.g. an LR scheduler's wrapper
        self._original_step = optimizer.step
        self._took_initial = False
        self._snapshot_owed = False             # a due snapshot put off by recent skips (_process)
        self._owed_since = 0                    # ... since this update
        self._requested: Optional[str] = None   # rewind(): done at the next step
        self._step_loss: Any = None
        self._step_norm: Optional[Tensor] = None  # a global gradient norm handed to step() (grad_norm=)
        # observe_grad_norm's: (the norm, the stamp of the gradients it is the norm of)
        self._observed_norm: Optional[Tuple[Tensor, Any]] = None
        self._last_stamp: Any = None  # the stamp of the last step's gradients (_check_fresh)
        self._gradients = OptimizerGradients(optimizer)
        optimizer.step = types.MethodType(_guarded_function(self), optimizer)

    # ------------------------------------------------------------------ data
    def batches(self, source: Union[Sequence, Callable[[int], Any], Iterable], start: int = 0) -> Iterator[Tuple[int, Any]]:
        """Yield ``(data index, batch)`` from ``source``, leaving out the batches the guard skips.

        ``source``: a sequence or a map-style dataset (``__getitem__`` and ``__len__``; indexed until its end), a
        callable ``index -> batch`` (None ends the data), or any other iterable (read forward only: a rewind
        then does not replay, the next ``rewind_skip`` batches of this pass are skipped, once). After a rewind the
        indexable sources continue from the snapshot's data position. The snapshot before the first update is
        taken before the first batch is read (a rewind to it replays that batch too).
        """
        start = validation.as_int("start", start, minimum=0)
        if isinstance(source, (str, bytes, Mapping)):
            raise TypeError(f"source must be a sequence, a callable index -> batch or an iterable, got "
                            f"{type(source).__name__}")
        if isinstance(source, Sequence) or (hasattr(source, "__getitem__") and hasattr(source, "__len__")):
            # a sequence or a map-style dataset (torch.utils.data.Dataset with __len__): indexed, replayable
            def get(i):
                return source[i] if i < len(source) else None
        elif callable(source):
            get = source
        elif isinstance(source, Iterable):
            yield from self._forward_batches(source, start)
            return
        else:
            raise TypeError(f"source must be a sequence, a callable index -> batch or an iterable, got "
                            f"{type(source).__name__}")
        self._replay = True
        i = start
        while not self.stopped:
            if i in self._skip_indices:
                i += 1
                continue
            self._initial_snapshot(i)
            batch = get(i)
            if batch is None:
                return
            self._index, self._position = i, i + 1
            yield i, batch
            i = self._position  # a rewind moved it back to the snapshot's position

    def _forward_batches(self, source: Iterable, start: int) -> Iterator[Tuple[int, Any]]:
        self._replay = False
        for i, batch in enumerate(source, start):
            if self.stopped:
                return
            if i in self._skip_indices:
                self._skip_indices.discard(i)  # read forward: an index is never seen again (another epoch's i
                continue                       # is another batch), so a skip is used once
            self._initial_snapshot(i)
            self._index, self._position = i, i + 1
            yield i, batch

    def _initial_snapshot(self, position: int) -> None:
        """The state before the first update, taken before the first batch is read (its random state too): a
        rewind to it replays the data from ``position``."""
        if not self._took_initial:
            self._took_initial = True
            self._position = position
            self._take_snapshot()

    # ------------------------------------------------------------------ the step
    def observe_loss(self, loss: Union[Tensor, float]) -> None:
        """Add a (micro-)batch loss of the coming update (a tensor stays on its device; or a real number)."""
        value = self._check_loss(loss)
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value.to(self._loss_sum.device)
        self._loss_n += 1

    @staticmethod
    def _check_loss(loss: Union[Tensor, float]) -> Tensor:
        """The loss as a 0-d float32 tensor (its mean when it has several elements), or a named TypeError."""
        if isinstance(loss, Tensor):
            if not loss.is_floating_point():
                raise TypeError(f"loss must be a floating tensor or a real number, got dtype {loss.dtype}")
            if loss.is_meta or loss.numel() == 0:  # no value: stored, it would poison every later step's sum
                raise ValueError(f"loss must hold a value (a non-empty tensor with data), got shape "
                                 f"{tuple(loss.shape)} on {loss.device}")
            value = loss.detach()
            value = value.reshape(()) if value.numel() == 1 else value.mean()
            if value.dtype != torch.float32:
                value = value.float()
        elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
            value = as_scalar(loss)  # (an int beyond a float: inf, a non-finite loss, as check_grad_norm's)
        else:
            raise TypeError(f"loss must be a tensor or a real number, got {type(loss).__name__}")
        return value

    def step(self, loss: Optional[Union[Tensor, float]] = None, closure: Optional[Callable] = None, *,
             grad_norm: Optional[Union[Tensor, float]] = None) -> Any:
        """``observe_loss(loss)`` (when given), then the guarded ``optimizer.step(closure)``.

        ``grad_norm``: the global gradient norm of this update when the loop already has it, e.g. the value
        ``torch.nn.utils.clip_grad_norm_`` returns (a 0-d or one-element floating tensor, on any device, or a real
        number >= 0; NaN/+-inf are non-finite signals, never refused; a negative CPU tensor is refused as a
        negative number is, a GPU one is not read). The guard then scores it instead of computing the norm itself
        (one pass over the gradients less). It is taken as the norm of the whole model's unscaled gradients:
        under several processes every rank's value is the same global norm (as ``clip_grad_norm_`` returns under
        DDP and FSDP2); with a GradScaler, the norm after ``scaler.unscale_``.

        Raises:
            GuardStopped: the guard stopped the run (`stop_reason` says why); nothing is done.
            ValueError: called again on the gradients of the previous update (no backward since); nothing is done.
            TypeError / ValueError: a bad ``loss`` or ``grad_norm``, named; nothing is done.
        """
        if self.stopped:
            raise GuardStopped(f"guard.step: the guard stopped the run; {self.stop_reason}")
        if loss is not None:
            self._check_loss(loss)
        norm = None if grad_norm is None else check_grad_norm(grad_norm)
        self._step_loss = loss  # observed by the guarded step once it checked the gradients are new
        self._step_norm = norm
        try:
            return self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        finally:
            self._step_loss = self._step_norm = None

    def observe_grad_norm(self, grad_norm: Union[Tensor, float]) -> None:
        """Hand over the global gradient norm of the coming update that the trainer computed anyway, before its
        ``optimizer.step()`` (e.g. the value ``clip_grad_norm_`` returned: the norm before clipping): the guarded
        step scores it instead of computing the norm itself, one pass over the gradients less. The trainer
        callbacks (HuggingFace, Lightning with gradient clipping, fairseq) hand their trainer's norm this way.

        ``grad_norm`` is checked as `step`'s ``grad_norm`` (the same types, values and meaning: the norm of the
        whole model's unscaled gradients, the same on every rank). It is the norm of the gradients as they are
        now: if they change before the step (another backward, a zero_grad: the trainer skipped its step, e.g. a
        GradScaler's overflow), the step ignores it and computes the norm itself. A ``grad_norm`` given to `step`
        takes precedence; the step uses the value once, as it was when handed (a copy: changing the tensor
        afterwards changes nothing).

        Raises:
            TypeError / ValueError: a bad ``grad_norm``, named; nothing is kept.
        """
        norm = check_grad_norm(grad_norm)
        self._observed_norm = (norm, stamp(self._gradients.read()[0]))

    def _check_fresh(self, raw: List[Tensor]) -> None:
        """Refuse a second step on the same gradients ``raw``: the same tensors as at the last step, unmodified
        since (`stability_toolbox.guard_gradients.unchanged`)."""
        if self._last_stamp is not None and unchanged(raw, self._last_stamp):
            raise ValueError("step: called again on the gradients of the previous update (no backward since); "
                             "call it once per update, after backward(), and optimizer.zero_grad() between updates")

    def _remember_grads(self, raw: List[Tensor]) -> None:
        self._last_stamp = stamp(raw)

    def _signal_values(self, grads: List[Tensor], sharded: bool, several_devices: bool, device: torch.device,
                       host: bool = False, given: Optional[Tensor] = None) -> Tuple[Any, Any]:
        """The step's signal values and which are present (None: all), reduced over the ranks (one all-reduce):
        tensors, or with ``host`` (one process on the CPU) lists of floats and bools. A handful of tensor ops:
        this runs every step. ``given``: the global gradient norm from the caller (float64), used as it is."""
        norm = sq = None
        if given is not None:
            norm = given.to(device)
            if self.world > 1:
                sq = norm.square()
                norm = None
        elif grads:
            norms = torch._foreach_norm(grads)
            if several_devices:
                norms = [n.to(device) for n in norms]
            scale = getattr(self.optimizer, "grad_scale", None)  # a GradScaler's fused protocol: still scaled
            if self.world > 1 or scale is not None:
                # float64: a finite norm above ~1.8e19 squares to inf in float32 (a huge spike read as non-finite)
                sq = torch.stack(norms).double().square().sum()
                if scale is not None:
                    sq = sq / scale.to(device, torch.float64).reshape(()).square()
            else:  # one op for the norm of the norms, in float64 for the same reason
                norm = torch.linalg.vector_norm(torch.stack(norms), dtype=torch.float64)
        n = self._loss_n
        loss = self._loss_sum.to(device) if n else None
        if self.world > 1:
            zero = torch.zeros((), device=device, dtype=torch.float64)
            vec = torch.stack([zero if loss is None else loss.double(),
                               torch.full((), float(n), device=device, dtype=torch.float64),
                               zero if sq is None else sq,
                               torch.full((), float(bool(grads) or given is not None), device=device,
                                          dtype=torch.float64)])
            torch.distributed.all_reduce(vec, group=self.process_group)  # the one reduction: every rank decides alike
            if not sharded or given is not None:
                vec[2] = vec[2] / self.world  # DDP (or a given global norm): every rank holds the same full value
            value = {"loss": (vec[0] / vec[1].clamp(min=1.0)).float(), "grad_norm": vec[2].sqrt().float()}
            have = {"loss": vec[1] > 0, "grad_norm": vec[3] > 0}
            return (torch.stack([value[s] for s in self.signals]), torch.stack([have[s] for s in self.signals]))
        # one process: which signals are present is known on the host
        if sq is not None:
            norm = sq.sqrt()
        if host:  # floats (float32's range: a norm beyond it is non-finite, as on the device)
            value = {"loss": None if loss is None else _f32(loss.item() / max(n, 1)),
                     "grad_norm": None if norm is None else _f32(norm.item())}
            present = [value[s] is not None for s in self.signals]
            return [value[s] if value[s] is not None else 0.0 for s in self.signals], \
                (None if all(present) else present)
        value = {"loss": loss if n <= 1 or loss is None else loss / n,
                 "grad_norm": None if norm is None else norm.float()}
        if value["loss"] is not None and value["grad_norm"] is not None:
            return torch.stack([value[s] for s in self.signals]), None
        present = [value[s] is not None for s in self.signals]
        zero = torch.zeros((), device=device)
        values = torch.stack([value[s] if value[s] is not None else zero for s in self.signals])
        return values, (None if all(present) else torch.tensor(present, device=device))

    def _guarded_step(self, closure: Optional[Callable] = None, **kwargs: Any) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.stopped:
            self._loss_sum, self._loss_n = None, 0
            return loss
        raw, grads, sharded, several_devices = self._gradients.read()
        self._check_fresh(raw)  # before anything changes
        if self._step_loss is not None:
            self.observe_loss(self._step_loss)
            self._step_loss = None
        given, self._step_norm = self._step_norm, None
        observed, self._observed_norm = self._observed_norm, None
        if given is None and observed is not None and unchanged(raw, observed[1]):
            given = observed[0]  # the trainer's norm of exactly these gradients
        if isinstance(loss, Tensor) and loss.is_floating_point():
            self.observe_loss(loss)
        if not self._took_initial:  # the state before the first update: a rewind target from the start
            self._took_initial = True
            self._take_snapshot()
        device = grads[0].device if grads else self.detector.device
        if self.detector.device != device:
            self.detector.to(device)
        host = device.type == "cpu" and self.decide_on_host is not False and self.world == 1
        values, present = self._signal_values(grads, sharded, several_devices, device, host, given)
        forced = self._forced_skips > 0
        requested = self._requested
        self._requested = None
        if forced:
            self._forced_skips -= 1
        if host:
            # on the CPU reading is free: the detector's per-step arithmetic in Python floats, the decision on the
            # host (~6 tensor ops a step in all, the grad norm's included)
            flags, skip = self._score_on_host(values, present, forced or requested is not None)
        else:
            flags, skip = self._score_on_device(values, present, device, forced or requested is not None)
        scaled_lr = self._back_off()
        try:
            if isinstance(skip, bool):
                if not skip:
                    self._original_step(**kwargs)
            else:
                conditional_step(self.optimizer, skip, step=lambda: self._original_step(**kwargs),
                                 on_host=self.decide_on_host)
        finally:
            for group, original, scaled in scaled_lr:
                if group.get("lr") is scaled:  # else something inside the step set its own rate: keep that
                    group["lr"] = original
        self._remember_grads(raw)
        self._loss_sum, self._loss_n = None, 0
        update = self.updates
        self.updates += 1
        if forced:
            self.skipped_updates += 1
        if flags is not None:
            self._enqueue(update, flags, forced or requested is not None)
        rewinds = self.rewinds
        self._process(final=False if requested is None else True)
        if requested is not None and self.rewinds == rewinds and not self.stopped:
            self._skipped.append(update)  # not applied: the rewind undoes nothing of it
            self._act("rewind", ["requested"], requested, update, self._index)
        return loss

    def _score_on_host(self, xs: List[float], present: Optional[List[bool]],
                       forced: bool) -> Tuple[Optional[List[float]], bool]:
        """The detector on the host: the flags for `_handle` (None without an event) and whether to skip."""
        z, event, nonfinite, any_event = self.detector.score_host(xs, present)
        scaler_inf = self.optimizer.__dict__.get("found_inf")
        if isinstance(scaler_inf, Tensor) and float(scaler_inf) != 0:  # a GradScaler's overflow: no event
            event, nonfinite, any_event = [False] * len(event), [False] * len(event), False
        if self._every_event_skips:
            skip = any_event
        else:
            skip = any((n and self.policy.skips_on_device("nonfinite")) or
                       (e and not n and self.policy.skips_on_device(_SIGNAL_OF[s]))
                       for s, e, n in zip(self.signals, event, nonfinite))
        skip = skip or forced
        if not any_event:
            return None, skip
        median = self.detector._median.tolist()
        return [float(e) for e in event] + [float(n) for n in nonfinite] + [float(skip)] + z + xs + median, skip

    def _score_on_device(self, values: Tensor, present: Optional[Tensor], device: torch.device,
                         forced: bool) -> Tuple[Optional[Tensor], Tensor]:
        """The detector on the device (~15 tensor ops, nothing read): the flags to copy to the host and the skip
        flag as a 0-d bool tensor."""
        z, event, nonfinite, any_event = self.detector.score(values, present)
        scaler_inf = self.optimizer.__dict__.get("found_inf")
        if isinstance(scaler_inf, Tensor):
            # a GradScaler found inf/NaN gradients (its fused protocol): the optimizer skips the step itself and the
            # scaler lowers its scale. That is the scaler's routine, not a spike: no event, no count, no escalation
            clean = scaler_inf.detach().reshape(()).to(device) == 0
            event, nonfinite = event & clean, nonfinite & clean
            any_event = event.any()
        if self._every_event_skips:  # the default table: every event skips the update
            skip = any_event
        else:
            skip_mask, nonfinite_skips = self._mask(device)
            skip = ((event & ~nonfinite & skip_mask) | (nonfinite & nonfinite_skips)).any()
        if forced:
            skip = torch.ones((), dtype=torch.bool, device=device)
        # on the CPU (decide_on_host=False) reading the flag is no synchronization: a step without an event hands
        # nothing to the host side; on a GPU every step's flags go (copied without waiting, read one step later)
        if device.type == "cpu" and not bool(any_event):
            return None, skip
        return torch.cat([torch.cat([event, nonfinite, skip.reshape(1)]).float(), z, values.float(),
                          self.detector._median]), skip

    def _mask(self, device: torch.device) -> Tuple[Tensor, Tensor]:
        """Which signals' events skip the update (the policy's table, as tensors; made once per device)."""
        if device not in self._masks:
            self._masks[device] = (
                torch.tensor([self.policy.skips_on_device(_SIGNAL_OF[s]) for s in self.signals], device=device),
                torch.tensor(self.policy.skips_on_device("nonfinite"), device=device))
        return self._masks[device]

    def lr_scale(self) -> float:
        """The persistent learning-rate factor of the ``cut_lr`` actions so far (``policy.lr_cut ** lr_cuts``; 1.0
        without a cut): each update uses the rate in the optimizer's groups (the scheduler's) times this."""
        return self.policy.lr_cut ** self.lr_cuts

    def _back_off(self) -> List[Tuple[Dict[str, Any], Any, Any]]:
        """Multiply the groups' learning rates by the temporary backoff and the persistent cut for this update;
        returns ``(group, original, scaled)`` for the caller to put the originals back after it (the scheduler
        never sees a scaled rate). A group without a numeric ``lr`` (none, or None: e.g. Adafactor's relative
        step) is left as it is (``cut_lr`` then stops instead, `_act`)."""
        factor = 1.0
        if self._backoff_left > 0 and self.backoff != 1.0:
            self._backoff_left -= 1
            factor = self.backoff
        if self.lr_cuts:
            factor = factor * self.lr_scale()
        if factor == 1.0:
            return []
        scaled = []
        for group in self.optimizer.param_groups:
            lr = group.get("lr")
            if _scalable_lr(lr):
                group["lr"] = lr * factor
                scaled.append((group, lr, group["lr"]))
        return scaled

    # ------------------------------------------------------------------ the host side
    def _enqueue(self, update: int, packed: Union[Tensor, List[float]], forced: bool) -> None:
        if isinstance(packed, list) or packed.device.type == "cpu":
            self._pending.append((update, self._index, packed, forced, None))
            return
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=torch.cuda.is_available())
        host.copy_(packed, non_blocking=True)
        ready = torch.cuda.Event() if packed.device.type == "cuda" else None
        if ready is not None:
            ready.record()
        self._pending.append((update, self._index, host, forced, ready))

    def _process(self, final: bool) -> None:
        """Handle the signals that reached the host: on the CPU this step's; on a GPU the previous step's (its
        copy finished long ago), all of them when ``final`` or at a snapshot."""
        # a snapshot put off by skips is tried once the window looks quiet (the check below decides, after the
        # flags in flight are handled): no read of in-flight flags every step of the wait
        due_snapshot = self.updates % self.snapshot_every == 0 or (self._snapshot_owed and not self._snapshot_waits())
        keep = 0 if (final or due_snapshot) else (0 if not self._pending or self._pending[-1][4] is None else 1)
        while len(self._pending) > keep:
            update, index, host, forced, ready = self._pending.pop(0)
            if ready is not None:
                ready.synchronize()
            if self._handle(update, index, host if isinstance(host, list) else host.tolist(), forced):
                self._pending.clear()  # a rewind or stop: the steps still in flight are moot
                return
        self._check_monitor()
        if self.stopped:
            return
        if due_snapshot and not final:
            if self._snapshot_waits():
                # skips within the window: the spikes may come from the model's state itself (a loss is measured
                # before its update), so this state is no good rewind target; the snapshot waits for a quiet window
                if not self._snapshot_owed:
                    self._owed_since = self.updates
                self._snapshot_owed = True
            else:
                self._snapshot_owed = False
                self._take_snapshot()

    def _snapshot_waits(self) -> bool:
        """Whether a due snapshot waits: a skip within the last ``policy.window`` updates, for at most ``window``
        updates. Skips that did not escalate to ``repeated`` over a whole window of waiting are isolated bad
        batches, not the model's state; waiting on (a bad batch every < ``window`` updates) would starve the ring,
        and a later rewind would lose everything since its last snapshot."""
        return self._recent_skip() and not (self._snapshot_owed and
                                            self.updates - self._owed_since >= self.policy.window)

    def _recent_skip(self) -> bool:
        """Whether an update was skipped within the last ``policy.window`` updates."""
        return any(u > self.updates - self.policy.window for u, _ in self._skip_log)

    def _handle(self, update: int, index: Optional[int], flags: List[float], forced: bool) -> bool:
        """Turn one step's flags into the policy's action; True when it rewound or stopped."""
        k = len(self.signals)
        event, nonfinite, skipped = flags[:k], flags[k:2 * k], flags[2 * k]
        z, values, median = flags[2 * k + 1:3 * k + 1], flags[3 * k + 1:4 * k + 1], flags[4 * k + 1:]
        signals = []
        for i, s in enumerate(self.signals):
            if nonfinite[i]:
                if "nonfinite" not in signals:
                    signals.append("nonfinite")
            elif event[i]:
                signals.append(_SIGNAL_OF[s])
        if not signals:
            return False
        detail = "; ".join(
            f"{s} {values[i]:.4g} is non-finite" if nonfinite[i] else
            f"{_WHAT[_SIGNAL_OF[s]]} {values[i]:.4g} is {z[i]:.1f} robust sigmas above its running median "
            f"{median[i]:.4g} (> {self.detector.threshold:g}), {_times(values[i], median[i])} it "
            f"(> {self.detector.min_ratio[s]:g}x)"
            for i, s in enumerate(self.signals) if event[i])
        action = severest(self.policy.action(s) for s in signals)
        if skipped and not forced:
            self.skipped_updates += 1
            self._skipped.append(update)
        if action == "skip":
            self._skip_log.append((update, index))
            recent = [(u, i) for u, i in self._skip_log if u > update - self.policy.window]
            self._skip_log = recent
            if len(recent) > self.policy.max_skips:
                signals.append("repeated")
                detail += f"; {len(recent)} skips within {self.policy.window} updates"
                action = severest([action, self.policy.action("repeated")])
        return self._act(action, signals, detail, update, index)

    def _check_monitor(self) -> None:
        if self.monitor is None or self.stopped:
            return
        new = self.monitor.warnings[self._monitor_seen:]
        self._monitor_seen = len(self.monitor.warnings)
        for w in new:
            signal = f"warning:{w['quantity']}"
            action = self.policy.action(signal)
            if self._act(action, [signal], w["message"], self.updates - 1, self._index):
                return

    def _act(self, action: str, signals: List[str], detail: str, update: int, index: Optional[int]) -> bool:
        if action == "rewind":
            self._rewind_times = [u for u in self._rewind_times if u > update - self.policy.rewind_window]
            if len(self._rewind_times) + 1 > self.policy.max_rewinds:
                signals = signals + ["persistent"]
                detail += f"; {len(self._rewind_times) + 1} rewinds within {self.policy.rewind_window} updates"
                action = severest([action, self.policy.action("persistent")])
        if action == "cut_lr" and not all(_scalable_lr(g.get("lr")) for g in self.optimizer.param_groups):
            detail += "; the optimizer has a parameter group without a numeric learning rate ('lr') to cut"
            action = "stop"
        if action == "cut_lr" and self.lr_cuts >= self.policy.max_lr_cuts:
            detail += f"; the learning rate was cut {self.lr_cuts} times already (x{self.lr_scale():g}, max_lr_cuts)"
            action = "stop"
        snap = self.ring.latest() if action in ("rewind", "cut_lr", "stop") else None
        if snap is not None and not self._fits(snap):
            self.ring.drop_after(-1)  # none of them fits any more; a new one is taken at the next due update
            snap = None
            detail += "; the optimizer's parameter groups changed since the snapshots were taken (dropped)"
        if action == "rewind" and snap is None:
            action = "skip"
            detail += "; no snapshot to rewind to"
        outcome = {"log": "logged (the update was applied)", "skip": "update not applied"}.get(action, "")
        if action == "rewind":
            outcome = self._rewind_now(update, index, snap)
        elif action == "cut_lr":
            outcome = self._rewind_now(update, index, snap) if snap is not None else \
                "update not applied (no snapshot to rewind to)"
            self.lr_cuts += 1  # the rewinds stay counted: spikes that come back at the new rate cut it again
            outcome += (f"; learning rate cut to x{self.lr_scale():g} of the schedule's for the rest of the run "
                        f"(cut {self.lr_cuts} of {self.policy.max_lr_cuts})")
        elif action == "stop":
            d = _stop_diagnosis(signals)
            self.stopped = True
            self.stop_reason = f"likely mechanism: {d.mechanism}; remedy: {d.remedy}"
            outcome = f"training stopped; {self.stop_reason}"
            if snap is not None and any(not s.startswith("warning:") for s in signals):
                # spikes that keep coming: leave the model at its last good state, not the damaged one
                restore(snap, self.model, self.optimizer, scheduler=self.scheduler, scaler=self.scaler)
                outcome += f"; the model is back at the snapshot of update {snap['update']}"
        where = f"update {update}" + (f" (batch {index})" if index is not None else "")
        line = f"stability guard: {where}: {', '.join(signals)}: {detail}; action: {action}: {outcome}"
        self.log.warning(line)
        record = {"update": update, "data_index": index, "signals": signals, "action": action, "line": line}
        self.events.append(record)
        if self._writer is not None:
            self._writer.write({"step": update, "guard": {k: v for k, v in record.items() if k != "line"},
                                "quantities": {}, "warnings": [line]})
        return action in ("rewind", "cut_lr", "stop")

    def _fits(self, snap: Dict[str, Any]) -> bool:
        """Whether ``snap``'s optimizer state has this optimizer's parameter groups (a group added since: no)."""
        saved = snap.get("optimizer")
        return saved is None or [len(g["params"]) for g in saved["param_groups"]] == \
            [len(g["params"]) for g in self.optimizer.param_groups]

    def _rewind_now(self, update: int, index: Optional[int], snap: Dict[str, Any]) -> str:
        restore(snap, self.model, self.optimizer, scheduler=self.scheduler, scaler=self.scaler)
        self.detector.load_state_dict(snap["extra"]["detector"])
        lost = self.updates - snap["update"]
        self.undone_updates += lost - sum(1 for u in self._skipped if u >= snap["update"])  # skips: counted once
        self._skipped = [u for u in self._skipped if u < snap["update"]]
        burst = [i for _, i in self._skip_log if i is not None] + ([index] if index is not None else [])
        self._skip_log = []  # the statistics of skips start again from the restored state
        self._snapshot_owed = False  # the restored state is the last good one; the next is due on schedule
        self._rewind_times.append(update)
        self.rewinds += 1
        self.updates = snap["update"]
        self.ring.drop_after(snap["update"])
        self._backoff_left = self.backoff_updates
        self._loss_sum, self._loss_n = None, 0
        if self._replay and snap["position"] is not None and index is not None:
            # skip from the batch before the burst's first event (it may have done the damage the spike shows:
            # a loss is measured before its update) through rewind_skip batches past the last
            first = max(min(burst) - 1, snap["position"])
            skipped = range(first, index + self.rewind_skip) if self.rewind_skip else range(0)
            self._skip_indices.update(skipped)
            self._position = snap["position"]
            how = f"replaying from batch {snap['position']}, skipping batches {first}..{index + self.rewind_skip - 1}" \
                if self.rewind_skip else f"replaying from batch {snap['position']}"
        else:
            if index is not None:
                self._skip_indices.update(range(index + 1, index + 1 + self.rewind_skip))
            else:
                self._forced_skips = self.rewind_skip
            how = f"the data moves on, skipping the next {self.rewind_skip} batches"
        backoff = f", learning rate x{self.backoff:g} for {self.backoff_updates} updates" \
            if self.backoff != 1.0 and self.backoff_updates else ""
        return f"rewound to the snapshot of update {snap['update']} ({lost} updates undone), {how}{backoff}"

    def _take_snapshot(self) -> None:
        snap = capture(self.model, self.optimizer, update=self.updates, position=self._position,
                       scheduler=self.scheduler, scaler=self.scaler, extra={"detector": self.detector.state_dict()})
        try:
            self.ring.save(snap)
        except OSError as err:  # e.g. the directory made read-only, a full disk: the run goes on, said once a time
            self._act("log", ["snapshot_failed"], f"the snapshot of update {self.updates} could not be written "
                      f"({type(err).__name__}: {err}); the ring keeps the older ones", self.updates, self._index)

    # ------------------------------------------------------------------ user calls
    def rewind(self, reason: str = "requested") -> None:
        """Rewind to the last snapshot (as the ``rewind`` action does), e.g. from a user's own check: at the next
        guarded step, in place of its update. Snapshots are taken inside a step (before the loop's
        ``scheduler.step()``), so a rewind is done inside one too: the loop's own ``scheduler.step()`` that
        follows it then keeps the schedule exact (a rewind with no skip and no backoff = the uninterrupted run).

        Raises:
            ValueError: no snapshot was taken yet.
        """
        if not isinstance(reason, str):
            raise TypeError(f"reason must be a string, got {type(reason).__name__}")
        if len(self.ring) == 0:
            raise ValueError("rewind: no snapshot yet (the first is taken at the first guarded step)")
        self._requested = reason

    def report(self, signal: str, detail: str) -> str:
        """Act on a signal found outside the guard (e.g. a trainer's own non-finite check, which skipped the
        update itself): the policy's action for ``signal``, one line, one record; returns the action."""
        if not isinstance(signal, str) or not signal:
            raise TypeError(f"signal must be a non-empty string, got {signal!r}")
        if not isinstance(detail, str):
            raise TypeError(f"detail must be a string, got {type(detail).__name__}")
        self._process(final=True)
        action = self.policy.action(signal)
        if action == "skip":
            self.skipped_updates += 1
        self._act(action, [signal], detail, self.updates, self._index)
        return action

    def flush(self) -> None:
        """Handle every signal still in flight (a GPU run's last step), e.g. before reading `events`."""
        self._process(final=True)

    def summary(self) -> Dict[str, Any]:
        """Counts: updates, events, skipped and undone updates, rewinds, learning-rate cuts, whether and why it
        stopped."""
        self.flush()
        return {"updates": self.updates, "events": len(self.events), "skipped_updates": self.skipped_updates,
                "undone_updates": self.undone_updates, "rewinds": self.rewinds, "lr_cuts": self.lr_cuts,
                "stopped": self.stopped,
                "stop_reason": self.stop_reason}

    _STATE_KEYS = ("updates", "skipped_updates", "undone_updates", "rewinds", "stopped", "stop_reason", "detector",
                   "skip_indices", "forced_skips", "backoff_left", "skip_log", "skipped", "rewind_times", "lr_cuts")
    _OPTIONAL_KEYS = ("lr_cuts",)  # absent in the states of guards without learning-rate cuts: 0

    def state_dict(self) -> Dict[str, Any]:
        """The guard's own state, for a checkpoint: counters, the detector's statistics (on the CPU), the batches
        it skips, the backoff and escalation windows. Not the snapshots: they are copies of what the checkpoint
        itself holds; after `load_state_dict` the first guarded step (or ``batches``) takes a new one."""
        self.flush()
        return {"updates": self.updates, "skipped_updates": self.skipped_updates,
                "undone_updates": self.undone_updates, "rewinds": self.rewinds, "stopped": self.stopped,
                "stop_reason": self.stop_reason,
                "detector": {k: v.cpu() if isinstance(v, Tensor) else v for k, v in self.detector.state_dict().items()},
                "skip_indices": sorted(self._skip_indices), "forced_skips": self._forced_skips,
                "backoff_left": self._backoff_left, "skip_log": list(self._skip_log), "skipped": list(self._skipped),
                "rewind_times": list(self._rewind_times), "lr_cuts": self.lr_cuts}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from `state_dict` (a killed run restarted from its checkpoint); checked first, nothing changes
        on a ValueError or TypeError. The snapshot ring is emptied: the next one is taken before the next update."""
        if not isinstance(state, dict) or not set(self._STATE_KEYS) - set(self._OPTIONAL_KEYS) <= set(state) or \
                not set(state) <= set(self._STATE_KEYS):
            raise ValueError(f"state must be a StabilityGuard.state_dict() (keys {', '.join(self._STATE_KEYS)})")
        # every entry checked (TypeError/ValueError naming it) before anything is set
        # (at most 2**31 - 1: lr_cut ** lr_cuts of a larger int is an OverflowError; the factor is 0.0 long before)
        lr_cuts = validation.as_int("state['lr_cuts']", state.get("lr_cuts", 0), minimum=0, maximum=2**31 - 1)
        counts = {key: validation.as_int(f"state['{key}']", state[key], minimum=0, integral_float=True)
                  for key in ("updates", "skipped_updates", "undone_updates", "rewinds", "forced_skips",
                              "backoff_left")}
        stopped = validation.as_bool("state['stopped']", state["stopped"])
        if state["stop_reason"] is not None and not isinstance(state["stop_reason"], str):
            raise TypeError(f"state['stop_reason'] must be None or a string, got {type(state['stop_reason']).__name__}")
        for key in ("skip_indices", "skip_log", "skipped", "rewind_times"):
            if not isinstance(state[key], (list, tuple, set)):
                raise TypeError(f"state['{key}'] must be a list, got {type(state[key]).__name__}")
        skip_indices = {validation.as_int("state['skip_indices'][i]", i, minimum=0) for i in state["skip_indices"]}
        if not all(isinstance(x, (list, tuple)) for x in state["skip_log"]):
            raise TypeError("state['skip_log'] must be a list of (update, index) pairs")
        det = state["detector"]
        if not isinstance(det, dict) or set(det) != set(self.detector.state_dict()) or \
                tuple(getattr(det["buffer"], "shape", ())) != tuple(self.detector._buffer.shape):
            raise ValueError("state: its detector has another shape (signals x window) than this guard's")
        copy.deepcopy(self.detector).load_state_dict(det)  # its own checks, on a scratch copy (a few small tensors)
        self.detector.load_state_dict(det)
        self.updates, self.skipped_updates = counts["updates"], counts["skipped_updates"]
        self.undone_updates, self.rewinds = counts["undone_updates"], counts["rewinds"]
        self.stopped, self.stop_reason = stopped, state["stop_reason"]
        self._skip_indices = skip_indices
        self._forced_skips, self._backoff_left = counts["forced_skips"], counts["backoff_left"]
        self._skip_log = [tuple(x) for x in state["skip_log"]]
        self._skipped, self._rewind_times = list(state["skipped"]), list(state["rewind_times"])
        self.lr_cuts = lr_cuts
        self._pending.clear()
        self._requested, self._last_stamp, self._observed_norm = None, None, None
        self._loss_sum, self._loss_n = None, 0
        self.ring.drop_after(-1)
        self._took_initial = False
        self._snapshot_owed = False

    def detach(self) -> None:
        """Give ``optimizer.step`` back (idempotent); handles what is still in flight first."""
        current = self.optimizer.__dict__.get("step")
        if getattr(current, "_stability_guard", None) is self:
            self.flush()
            if self._had_instance_step:
                self.optimizer.step = self._original_step
            else:
                del self.optimizer.step
        if getattr(self, "_own_writer", False):
            self._writer.close()
            self._own_writer = False

    close = detach


def _guarded_function(guard: StabilityGuard) -> Callable:
    """The function bound as the optimizer's ``step`` while guarded (a method, as an LR scheduler that wraps
    ``optimizer.step`` afterwards expects)."""

    def step(optimizer, closure: Optional[Callable] = None, **kwargs: Any) -> Any:
        return guard._guarded_step(closure, **kwargs)

    # torch.compile(optimizer.step): the guard's host side (snapshots, the policy, the log) cannot be traced;
    # it runs eagerly (a graph break; fullgraph=True names this function as disabled) instead of failing inside
    # dynamo on the random generators' states
    step = torch.compiler.disable(step)
    step._stability_guard = guard
    if hasattr(guard._original_step, "_wrapped_by_lr_sched"):  # the scheduler's wrapper is still called
        step._wrapped_by_lr_sched = True
    return step


def check_trainer_arguments(monitor: Any, guard_kwargs: Dict[str, Any]) -> None:
    """What a trainer's guard callback (HuggingFace, Lightning) checks at construction, before its trainer exists:
    ``model``/``optimizer``/``scheduler`` come from the trainer (TypeError), and every other argument is checked
    by building a throw-away guard, so a bad one fails now, naming itself, rather than at ``on_train_begin``."""
    for key in ("model", "optimizer", "scheduler"):
        if key in guard_kwargs:
            raise TypeError(f"{key} is set by the callback from the Trainer; do not pass it")
    probe = torch.nn.Linear(1, 1)
    StabilityGuard(probe, torch.optim.SGD(probe.parameters(), lr=0.1), monitor=monitor,
                   **{k: v for k, v in guard_kwargs.items() if k != "log_dir"}).detach()
