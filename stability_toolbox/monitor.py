"""A live training-stability monitor: Admin's analysis, per layer, every k steps.

[`StabilityMonitor`][stability_toolbox.StabilityMonitor] attaches to a model and, on every ``every``-th optimizer step (the
*logging steps*), records per layer Admin's residual-branch ratio ``beta``, the ``output_change`` on a fixed
probe batch, the gradient norms and ratios, the update/weight ratio, the activation range against the dtype's
(``act_max``, ``act_frac``), the largest attention logit, and per model the loss, its spikes and the output
logits' ``log_z`` (each defined in `stability_toolbox.quantities`).

This module is the step protocol; the monitor composes one-idea modules:

* `stability_toolbox.sites`: where the residual sublayers, attention modules and parameter groups of the
  model are, and which module gets which hook ([`register_layer_kind`][stability_toolbox.register_layer_kind]
  teaches it a layer type);
* `stability_toolbox.quantities`: the statistics, accumulated on the device and brought to the host at once;
* `stability_toolbox.attention_stats`: the attention-logit statistic; `stability_toolbox.probe`: the probe batch;
* `stability_toolbox.records`: ``monitor.jsonl`` (read back by `read_records`), TensorBoard, the summary and
  the heatmaps; `stability_toolbox.warning_rules`: the warning rules; `stability_toolbox.inert_hooks`: hooks that
  stay behind when the model is copied.

Between logging steps no hook is installed and nothing is read on the host: [`begin_step`][stability_toolbox.StabilityMonitor.begin_step] /
[`end_step`][stability_toolbox.StabilityMonitor.end_step] count, and a loss passed in is accumulated on its device;
the per-update rules (``signal_rules``, default `stability_toolbox.signal_detector.DEFAULT_SIGNAL_RULES`) get their
scalar (one fused norm over the layers' gradients in ``capture_grads``) through an asynchronous copy to the host
(`stability_toolbox.scalar_reader`), checked at every update without waiting for the device. On a logging step the
hooks go in, the statistics are computed on the device, and one transfer brings them to the host.

Outputs under ``log_dir``: ``monitor.jsonl`` (one JSON object per logging step), TensorBoard scalars
(``tb/``, tensorboardX), ``summary.md`` and one ``heatmap_<quantity>.png`` (layer x step) per quantity
at [`close`][stability_toolbox.StabilityMonitor.close] (also as TensorBoard images). A quantity trending toward divergence logs one line (logger
``stability_toolbox.monitor``, level WARNING) that begins with ``stability warning:`` and names the
layer, the quantity and its trend, the likely mechanism and the toolbox's remedy; the same line goes to
``monitor.jsonl`` and to TensorBoard (text ``stability/warnings``). The rules ([`WarningRule`][stability_toolbox.WarningRule],
`DEFAULT_RULES`) are pure functions of the history in `stability_toolbox.warning_rules`
(see ``docs/monitor.md``). [`StabilityMonitor.observe_logits`][stability_toolbox.StabilityMonitor.observe_logits] adds the output logits' ``log_z`` /
``log_z_rms`` (output-logit divergence).

Examples:
    >>> import torch
    >>> from admin_torch import make_stack
    >>> from stability_toolbox import StabilityMonitor
    >>> model = make_stack('post_ln', depth=4, dim=16, seed=0)
    >>> opt = torch.optim.Adam(model.parameters(), 1e-3)
    >>> mon = StabilityMonitor(model, every=2)        # log_dir=None: in memory only
    >>> for _ in range(4):
    ...     with mon.step() as s:
    ...         loss = model(torch.randn(2, 5, 16)).pow(2).mean()
    ...         loss.backward(); opt.step(); opt.zero_grad()
    ...         s.loss = loss
    >>> sorted(mon.history[-1]['quantities'])[:4]
    ['act_frac', 'act_max', 'attn_entropy', 'attn_logit_max']
    >>> summary = mon.close()           # the summary table, also printed to the log
"""

import contextlib
import logging
import math
import numbers
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from toolbox_core import validation

from .leading_signals import MONITOR_SIGNALS, EntropyLogits, LayerGradients, UpdateStream
from .inert_hooks import wrap_hooks
from .probe import Probe, as_call
from .quantities import OTHER_ROW, QUANTITIES, ParameterGroups, Recorder, accumulate, collect, resolve_fallback, running_max
from .records import RecordWriter, as_log_dir, summary_table, write_heatmaps, write_summary
from . import scalar_reader
from .scalar_reader import ScalarReader
from .signal_detector import SignalDetector
from .sites import FALLBACK_MODES, SitePlan, register_layer_kind
from .warning_rules import DEFAULT_RULES, WarningRule, as_rules, check, lookback

# Names that lived here before the monitor was split, still importable from here: read_records (benchmarks,
# tests), MODEL_QUANTITIES and _json_safe (the jsonl format), and the hooks a pickled model names as
# stability_toolbox.monitor._inert_hook / _make_inert (a model saved with torch.save before the split).
from .inert_hooks import _inert_hook, _make_inert  # noqa: E402,F401
from .quantities import MODEL_QUANTITIES  # noqa: E402,F401
from .records import _json_safe, read_records  # noqa: E402,F401

__all__ = ["StabilityMonitor", "WarningRule", "DEFAULT_RULES", "QUANTITIES", "register_layer_kind"]

logger = logging.getLogger(__name__)


class _StepHandle:
    """What ``with monitor.step() as s`` gives: set ``s.loss`` to report the step's loss (a tensor or a real
    number; anything else is a TypeError at the assignment, and the step fails: nothing is logged)."""

    __slots__ = ("_loss", "logits")

    def __init__(self):
        self._loss = None
        self.logits = None  # optional: the output logits, for log_z (StabilityMonitor.observe_logits)

    @property
    def loss(self):
        return self._loss

    @loss.setter
    def loss(self, value) -> None:
        if value is not None and not isinstance(value, Tensor) and \
                (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"loss must be a tensor or a real number, got {type(value).__name__}")
        self._loss = value


class StabilityMonitor:
    """Records Admin's per-layer stability quantities of ``model`` every ``every`` steps (module docstring).

    Args:
        model: the model (an ``nn.Module``; the unwrapped one, not a DDP wrapper).
        log_dir: where ``monitor.jsonl``, ``tb/``, ``summary.md`` and the heatmaps go (created);
            None keeps everything in memory (`history`, `warnings`).
        every: the logging interval k (an integer >= 1); steps 0, k, 2k, ... are logged.
        probe: the probe inputs for ``output_change``: a tensor, a tuple of positional arguments or a
            dict of keyword arguments of ``model``; default: the inputs of the first logged forward.
        probe_rows: the output change uses the first ``probe_rows`` feature vectors of each sublayer (a probe
            holding more samples than those rows need is cut to its leading samples where that keeps every
            sublayer's rows: `stability_toolbox.probe`).
        range_dtype: the floating dtype ``act_frac`` compares with (e.g. ``torch.float16`` to see the
            fp16 margin of an fp32 run); default: each activation's own dtype.
        fallback: models without residual modules or known layers: ``'auto'``, ``'post_ln'``, ``'pre_ln'``.
        rules: ``{quantity: WarningRule}`` replacing `DEFAULT_RULES` (``{}``: no warnings); a rule may also be
            a dict of its fields (checked by `stability_toolbox.warning_rules.as_rules`).
        tensorboard, heatmaps: write TensorBoard scalars / PNG heatmaps (needs ``log_dir``).
        log: the logger warnings and the summary go to (default ``stability_toolbox.monitor``).
        signal_rules: the per-update rules ([`SignalRule`][stability_toolbox.signal_detector.SignalRule]s), run
            at **every** update on the scalars they read (``loss``, ``grad_norm``, ``grad_rms_eps_min``,
            ``log_z_rms``: `stability_toolbox.leading_signals.MONITOR_SIGNALS`), whatever ``per_update`` and
            ``every``: the scalars are computed on the device and copied to the host asynchronously
            (`stability_toolbox.scalar_reader.ScalarReader`, no host-device sync), and a rule is checked as soon
            as the host has them (at once on a CPU; on a GPU at the first `end_step` after the copy finished);
            a warning carries the update it was measured at (``update``) and the one the host knew it at
            (``known_at``). Default `stability_toolbox.signal_detector.DEFAULT_SIGNAL_RULES`
            (``grad_rms_eps_min`` only: one fused norm over the layers' gradients per `capture_grads`);
            ``[]``: none, and nothing is computed between logging steps. A rule on another signal is a
            ValueError (it would never fire), as is a rule on ``grad_rms_eps_min`` for a model with no layer group
            (every parameter in the ``(other)`` row); the default rule is then off (one INFO line). The gradient
            signals need `capture_grads` (or `attach_optimizer`). `state_dict` / `load_state_dict` carry the
            rules' running state across a resume.
        per_update: also keep ``loss``, ``grad_norm``, ``grad_rms_eps_min`` and ``log_z_rms`` of every update in
            the records (``record["updates"]``; one ``logsumexp`` per `observe_logits` and a norm over every
            gradient, the embeddings' too); off by default.

    Raises:
        TypeError / ValueError: a bad argument (named); nothing is attached then.

    Examples:
        >>> model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32), 3,
        ...                                     enable_nested_tensor=False)
        >>> mon = StabilityMonitor(model, every=10)
        >>> mon.sites[:2]
        ['layers.0.norm1', 'layers.0.norm2']
        >>> summary = mon.close()           # the summary table, also printed to the log
    """

    def __init__(
        self,
        model: nn.Module,
        log_dir: Optional[Union[str, Path]] = None,
        *,
        every: int = 100,
        probe: Any = None,
        probe_rows: int = 256,
        range_dtype: Optional[torch.dtype] = None,
        fallback: str = "auto",
        rules: Optional[Dict[str, WarningRule]] = None,
        tensorboard: bool = True,
        heatmaps: bool = True,
        log: Optional[logging.Logger] = None,
        signal_rules: Optional[Sequence[Any]] = None,
        per_update: bool = False,
    ):
        # ---- every check first: a refused call attaches nothing
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.every = validation.as_int("every", every, minimum=1)
        self.probe_rows = validation.as_int("probe_rows", probe_rows, minimum=1)
        if range_dtype is not None and not (isinstance(range_dtype, torch.dtype) and range_dtype.is_floating_point):
            raise TypeError(f"range_dtype must be a floating torch.dtype or None, got {range_dtype!r}")
        self.fallback = validation.as_choice("fallback", fallback, FALLBACK_MODES)
        rules = as_rules(DEFAULT_RULES if rules is None else rules)  # the rules' own check (warning_rules)
        for q in rules:
            if q not in QUANTITIES + ("log_z_rms",):
                raise ValueError(f"rules: unknown quantity {q!r}; accepted: {', '.join(QUANTITIES)}")
        probe_call = None if probe is None else as_call(probe)
        if log is not None and not isinstance(log, logging.Logger):
            raise TypeError(f"log must be a logging.Logger, got {type(log).__name__}")
        tensorboard = validation.as_bool("tensorboard", tensorboard)
        heatmaps = validation.as_bool("heatmaps", heatmaps)
        log_dir = as_log_dir(log_dir)
        # checks the rules (default: DEFAULT_SIGNAL_RULES); a refusal names signal_rules
        signal_detector = SignalDetector(signal_rules, argument="signal_rules")
        per_update = validation.as_bool("per_update", per_update)
        for i, r in enumerate(signal_detector.rules):  # a rule on a signal never recorded would never fire
            if r.signal not in MONITOR_SIGNALS:
                raise ValueError(f"signal_rules[{i}]: the monitor records no per-update signal {r.signal!r}; "
                                 f"accepted: {', '.join(MONITOR_SIGNALS)}")
        # ---- attach
        self.model = model
        self.log_dir = log_dir
        self.rules = dict(rules)
        self.range_dtype = range_dtype
        self.log = log or logger
        self._heatmaps = heatmaps
        self._recorder = Recorder(self.probe_rows)
        self._site_plan = SitePlan(model)  # raises when there is nothing to monitor
        if not any(row != OTHER_ROW for row, _ in self._site_plan.groups):
            # no layer group (a fallback model: every parameter in the "(other)" row): grad_rms_eps_min, the
            # smallest layer's gradient RMS, does not exist, and a rule on it could never fire
            never = [i for i, r in enumerate(signal_detector.rules) if r.signal == "grad_rms_eps_min"]
            if never and signal_rules is not None:
                raise ValueError(f"signal_rules[{never[0]}]: this model has no layer group (mechanism "
                                 f"{self._site_plan.mechanism(self.fallback)!r}), so grad_rms_eps_min, the smallest "
                                 f"layer's gradient RMS, is never measured; use grad_norm or loss")
            if never:  # the defaults: say once that they read nothing here, rather than stay silent
                (log or logger).info("stability monitor: no layer group in this model; the default per-update "
                                     "rule on grad_rms_eps_min is off (pass signal_rules to choose another)")
                signal_detector = SignalDetector([r for r in signal_detector.rules if r.signal != "grad_rms_eps_min"],
                                                 argument="signal_rules")
        self._attention = EntropyLogits(self._site_plan.attention, self._recorder)  # logit maxima and entropy
        # per-update scalars (loss, gradient norm, log Z RMS) kept on the device and read at the logging step
        self._stream = UpdateStream()
        self._signal_detector = signal_detector
        self._per_update = per_update
        # the signals the per-update rules read: computed at every update and read without a sync
        self._online = frozenset(r.signal for r in signal_detector.rules)
        self._reader = ScalarReader()
        self._signal_lines: List[str] = []  # per-update warnings since the last record (its "warnings")
        # the global gradient norm (every parameter, embeddings too) only when something reads it
        self._layer_grads = LayerGradients(self._site_plan.groups,
                                           model_norm=per_update or "grad_norm" in self._online)
        # whether capture_grads computes the gradient signals at every update (decided once, not per call)
        self._grad_signals = per_update or bool(self._online & {"grad_norm", "grad_rms_eps_min"})
        self._eps = 1e-8  # grad_rms_eps_min's unit: the attached optimizer's eps (attach_optimizer), else 1e-8
        self._params = ParameterGroups(self._site_plan.groups)
        self._probe = Probe(model, self._recorder, probe_call)
        self.step_count = 0          # completed steps
        self.history: List[Dict[str, Any]] = []
        self.warnings: List[Dict[str, Any]] = []
        self._warned = set()
        self._handles: List[Any] = []
        self._armed = False
        # the losses since the last logging step: device tensors, or Python floats while every loss was a CPU one
        self._loss_sum: Union[Tensor, float, None] = None
        self._loss_max: Union[Tensor, float, None] = None
        self._loss_n = 0
        self._loss_begin: Optional[tuple] = None  # the loss sums when the step under way began (discard_step)
        self._log_z: Optional[Tuple[Tensor, Tensor, int]] = None  # observe_logits: sum, sum of squares, count
        self._optimizer_handles: List[Any] = []
        self._closed = False
        self.compile_note: Optional[str] = None
        self._writer = RecordWriter(log_dir, tensorboard=tensorboard, log=self.log) if log_dir is not None else None

    @property
    def sites(self) -> List[str]:
        """The names of the monitored residual sublayers (rows of ``beta``, ``output_change``, ``act_*``)."""
        return self._site_plan.names()

    @property
    def mechanism(self) -> str:
        """How the residual sums are found: ``'residual modules'``, ``'layer descriptions'``, ``'fallback'`` or a mix."""
        return self._site_plan.mechanism(self.fallback)

    # ------------------------------------------------------------------ hooks (logging steps only)

    def _arm(self) -> None:
        hs = self._handles
        self._site_plan.arm(self._recorder, hs)
        if self._probe.call is None:  # keep the first logged call's inputs as the probe
            hs.append(self.model.register_forward_pre_hook(
                lambda _m, args, kwargs: self._probe.capture(args, kwargs, self.step_count), with_kwargs=True))
        self._armed = True

    def _disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._armed = False

    def _wrap_hooks(self, handles: Optional[List[Any]] = None) -> None:
        """Every hook this monitor put on the model (or those of ``handles``) made inert in a pickled or
        deep-copied model (`stability_toolbox.inert_hooks`): ``torch.save(model)`` works; an EMA copy does not report
        here."""
        wrap_hooks(self._handles if handles is None else handles)

    # ------------------------------------------------------------------ the step protocol

    def is_logging_step(self, step: Optional[int] = None) -> bool:
        """Whether ``step`` (default: the coming one; else an integer >= 0, checked as `begin_step` checks it)
        is logged."""
        if step is not None:  # a float, a bool, a negative or a string step has no answer (was a bare % on it)
            step = validation.as_int("step", step, minimum=0)
        return (self.step_count if step is None else step) % self.every == 0

    @property
    def recording(self) -> bool:
        """Whether a logged step is under way now (between `begin_step` and `end_step` of a logging step)."""
        return self._armed

    def begin_step(self, step: Optional[int] = None) -> bool:
        """Call before the forward pass of a step; ``step`` realigns the counter (a resumed run).

        Returns whether this step is logged (then the hooks are in until [`end_step`][stability_toolbox.StabilityMonitor.end_step]).
        """
        self._check_open()
        if step is not None:  # a plain int >= 0 (fairseq's every update) skips the full check and its message
            self.step_count = step if type(step) is int and step >= 0 else validation.as_int("step", step, minimum=0)
        self._loss_begin = (self._loss_sum, self._loss_max, self._loss_n)
        if self._armed or not self.is_logging_step():
            return self._armed
        self._params.arm(self._handles)
        self._arm()
        self._attention.arm(self._handles)
        self._wrap_hooks()
        return True

    def capture_grads(self) -> None:
        """Read the gradients now (after unscaling/clipping, before ``zero_grad``); without this call the
        gradient of the step is the one autograd accumulated. At every step it gives the per-update rules their
        gradient signal (``grad_rms_eps_min``: one fused norm over the layers' gradients, on the device); on
        logging steps also the per-layer gradients. No host sync.
        RuntimeError after `close` (like every observation: nothing is dropped silently)."""
        self._check_open()
        if self._grad_signals:
            # every step: grad_rms_eps_min (and grad_norm), one fused norm on the device, no sync
            for name, value in self._layer_grads(self._eps).items():
                if self._per_update:
                    self._stream.put(name, value)
                if name in self._online:
                    self._reader.put(name, value, copy=False)  # fresh values of this update
        if self._armed:
            self._params.capture()

    def observe_logits(self, logits: Tensor) -> None:
        """On a logging step, record the output logits' softmax normaliser: ``log_z`` (the mean over
        positions of ``logsumexp(logits, -1)``) and ``log_z_rms`` (its root mean square, what z-loss
        penalises; output-logit divergence makes it grow). Between logging steps it does nothing.
        Device-side only (no sync); call it with the logits of each forward pass (detached here).

        Logits with no positions (e.g. shape ``(0, vocabulary)``, an empty batch) add nothing, as a step
        without a loss records no loss: no ``log_z`` is made up for them. An empty vocabulary (last dimension
        0) is a ValueError: the normaliser of a softmax over no classes does not exist. RuntimeError after
        `close`."""
        self._check_open()
        if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1:
            raise TypeError(f"logits must be a floating tensor (..., vocabulary), got {type(logits).__name__}")
        if logits.shape[-1] == 0:
            raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape "
                             f"{tuple(logits.shape)}")
        every_step = self._per_update or "log_z_rms" in self._online
        if logits.numel() == 0 or not (self._armed or every_step):  # nothing to observe (no sync)
            return
        with torch.no_grad():
            lz = logits.detach().float().logsumexp(-1).reshape(-1)
            if every_step:  # every step: the per-update stream / the per-update rules
                rms = lz.pow(2).mean().sqrt()
                if self._per_update:
                    self._stream.put("log_z_rms", rms)
                if "log_z_rms" in self._online:
                    self._reader.put("log_z_rms", rms, copy=False)
            if not self._armed:
                return
            part = (lz.sum(), lz.pow(2).sum(), lz.numel())
            old = self._log_z
            self._log_z = part if old is None else (old[0] + part[0], old[1] + part[1], old[2] + part[2])

    def observe_loss(self, loss) -> None:
        """Add a step's loss (a tensor stays on its device: no sync; or a real number, NumPy's too). None or an
        empty tensor adds nothing (the mean of no losses is not a loss). RuntimeError after `close`."""
        self._check_open()
        if loss is None:
            return
        if isinstance(loss, Tensor):
            if loss.is_meta:  # no value: stored, it would poison every later step's sum
                raise ValueError(f"loss must hold a value: a meta tensor (shape {tuple(loss.shape)}) has none")
            n = loss.numel()
            if n == 0:
                return
            if n == 1 and loss.dtype == torch.float32 and type(self._loss_sum) is not Tensor and \
                    scalar_reader.host_memory(loss.device):
                # a CPU loss is host memory: read with no op (each op right after a step costs 10-40 us of cold
                # caches), summed in float64 until the logging step
                self._observe_host_loss(loss.item())
                return
            if n == 1 and loss.dtype == torch.float32:
                # one float32 value: its mean, bit for bit, is 0 + value (a -0.0 loss becomes +0.0 as in the
                # mean's sum), a fresh tensor (the caller may reuse its own in place): one op where the mean of a
                # one-element view took four (tests/stability_toolbox/test_monitor_exact.py)
                value = loss.detach().reshape(()) + 0.0
            else:
                # .float() would make 1.0 of True and drop an imaginary part: refused, as as_scalar refuses them
                if loss.dtype == torch.bool or loss.is_complex():
                    raise TypeError(f"loss must be a real (floating or integer) tensor or a real number, got a "
                                    f"tensor of dtype {loss.dtype}")
                value = loss.detach().float().reshape(-1).mean()
        elif isinstance(loss, numbers.Real) and not isinstance(loss, bool):  # NumPy's scalars too (np.float32)
            try:
                value = torch.tensor(float(loss))
            except OverflowError:  # an integer beyond a float's range: a non-finite loss (its sign kept)
                value = torch.tensor(math.inf if loss > 0 else -math.inf)
        else:
            raise TypeError(f"loss must be a tensor or a real number, got {type(loss).__name__}")
        if type(self._loss_sum) is float:  # host sums so far (CPU losses), a tensor loss now: the sums become tensors
            self._loss_sum, self._loss_max = (torch.tensor(v, device=value.device)
                                              for v in (self._loss_sum, self._loss_max))
        if self._loss_sum is not None and value.device != self._loss_sum.device:
            value = value.to(self._loss_sum.device)
        if self._per_update:
            self._stream.put("loss", value)
        if "loss" in self._online:
            self._reader.put("loss", value, copy=False)  # a fresh tensor (above)
        self._loss_sum = accumulate(self._loss_sum, value)
        self._loss_max = running_max(self._loss_max, value)
        self._loss_n += 1

    def _observe_host_loss(self, value: float) -> None:
        """`observe_loss` of a CPU float32 loss, ``value``: its sum and maximum as Python floats, NaN kept as
        torch.maximum keeps it; ``0.0 + value``: a -0.0 loss becomes +0.0, as in a tensor sum."""
        value = 0.0 + value
        if self._per_update:
            self._stream.put("loss", value)
        if "loss" in self._online:
            self._reader.put("loss", value)
        top = self._loss_max
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        if top is None or value != value or (top == top and value > top):
            self._loss_max = value
        self._loss_n += 1

    def end_step(self, loss=None) -> Optional[Dict[str, Any]]:
        """Call after the optimizer step. On a logging step, returns the record written; else None."""
        self._check_open()
        self.observe_loss(loss)
        self._loss_begin = None  # the step is done: its losses stay
        if self._per_update:  # the stream keeps nothing otherwise
            self._stream.end(self.step_count)
        self._reader.end(self.step_count)
        self._check_signals()  # the updates whose scalars have reached the host (no wait)
        record = None
        if self._armed:
            try:
                record = self._finish()
            finally:
                self._clear_step(failed=record is None)
        self.step_count += 1
        return record

    def _clear_step(self, failed: bool) -> None:
        """Forget every capture of the current step: hooks, weights before the update, gradients, per-site
        statistics, attention logits, logits' normaliser; after a failed step also a probe taken from its
        inputs (the next logged step takes a fresh one)."""
        self._disarm()
        self._params.clear()
        for s in self._site_plan.all_sites():
            s.reset()
        self._attention.clear()
        self._log_z = None
        self._site_plan.reset_fallback()
        self._probe.forget_step(self.step_count, failed)

    @contextlib.contextmanager
    def step(self, step: Optional[int] = None) -> Iterator[_StepHandle]:
        """Context manager around one training step (forward, backward, optimizer step):

            with monitor.step() as s:
                loss = model(x).loss; loss.backward(); opt.step(); opt.zero_grad()
                s.loss = loss      # optional: loss spikes
                s.logits = logits  # optional: log Z of the output logits (output-logit divergence)
        """
        handle = _StepHandle()
        self.begin_step(step)
        try:
            yield handle
            if handle.logits is not None:
                self.observe_logits(handle.logits)
            self.end_step(handle.loss)
        except BaseException:
            self.discard_step()
            raise

    def discard_step(self) -> None:
        """Abandon the step under way (it failed, or made no update: an fp16 overflow or out-of-memory skip):
        its per-update values are dropped, a logged step's hooks and captures are removed and nothing is
        logged; the counter does not advance (the next `begin_step` may name the same step again). Never
        raises (it runs on error paths), also after `close`."""
        self._stream.clear()  # the failed step's per-update values are not an update
        self._reader.clear()
        if self._loss_begin is not None:  # nor are its losses (observe_loss inside the step): the sums as it began
            self._loss_sum, self._loss_max, self._loss_n = self._loss_begin
            self._loss_begin = None
        if self._armed:  # a failed step leaves no hook and no capture behind, and logs nothing
            self._clear_step(failed=True)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> "StabilityMonitor":
        """Drive the monitor from ``optimizer``'s step hooks: no other call needed in the loop (losses:
        [`observe_loss`][stability_toolbox.StabilityMonitor.observe_loss]). Gradients are read just before each logged ``optimizer.step()``."""
        self._check_open()
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._optimizer_handles:
            raise ValueError("optimizer: this monitor is already driven by an optimizer (attach_optimizer was "
                             "called); a second one would count every step twice. One attach_optimizer per monitor")

        def pre(_opt, _args, _kwargs):
            self.capture_grads()

        def post(_opt, _args, _kwargs):
            self.end_step()
            self.begin_step()

        eps = optimizer.param_groups[0].get("eps") if optimizer.param_groups else None
        if isinstance(eps, float) and 0 < eps < float("inf"):  # grad_rms_eps_min in this optimizer's epsilon
            self._eps = eps
        handles = [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
        self._wrap_hooks(handles)  # a pickled / copied optimizer carries inert hooks
        self._optimizer_handles += handles
        self.begin_step()
        return self

    # ------------------------------------------------------------------ a logging step's record

    def _finish(self) -> Dict[str, Any]:
        step = self.step_count
        grads, update, weight = self._params.squares()  # what changed in this step
        self._probe.run()  # the probe pass: residual sums on the fixed batch (hooks still in)
        quantities, model_q = collect(
            self._site_plan.all_sites(), grads=grads, update=update, weight=weight, attn_max=self._attention.maxima,
            loss=tuple(torch.tensor(v) if type(v) is float else v for v in (self._loss_sum, self._loss_max))
            + (self._loss_n,), log_z=self._log_z, range_dtype=self.range_dtype,
            history=self.history, attn_entropy=self._attention.entropy)
        self.fallback = resolve_fallback(quantities, self.fallback)
        self._loss_sum, self._loss_max, self._loss_n = None, None, 0
        record = {"step": step, **model_q, "quantities": quantities, "updates": self._stream.read()}
        self.history.append(record)
        record["warnings"] = self._check_rules(record) + self._signal_lines
        self._signal_lines = []
        if self._writer is not None:
            self._writer.write(record)
        return record

    def _check_rules(self, record: Dict[str, Any]) -> List[str]:
        # the rules are pure functions of the history (stability_toolbox.warning_rules); the monitor keeps the
        # state: which (row, quantity) warned already
        lines = []
        # check reads the last lookback(rules) records only: passing those keeps a logging step O(1) in the run length
        for w in check(self.history[-lookback(self.rules):], self.rules, self._warned):
            if w["quantity"] != "loss_spike":  # a loss spike may warn again; everything else warns once
                self._warned.add((w["layer"], w["quantity"]))
            self.log.warning(w["message"])
            lines.append(w["message"])
            self.warnings.append(w)
        return lines

    def _check_signals(self, block: bool = False) -> None:
        # the per-update rules (stability_toolbox.signal_detector) over every update whose scalars the host has
        # now: a warning is issued here, known at the current update (its lead counts from known_at)
        for step, scalars in self._reader.ready(block):
            for w in self._signal_detector.update(step, scalars):
                w["known_at"] = self.step_count
                self.log.warning(w["message"])
                self._signal_lines.append(w["message"])
                self.warnings.append(w)

    # ------------------------------------------------------------------ resume

    _STATE_KEYS = ("step_count", "signal_detector", "warned", "history", "fallback", "eps")

    def state_dict(self) -> Dict[str, Any]:
        """The monitor's running state, for a checkpoint (plain Python values; ``torch.save`` it): the step
        counter, the per-update rules' state (`SignalDetector.state_dict`), which warnings were issued, the last
        records the logging-step rules read; plain data (``torch.load(..., weights_only=True)`` reads it). A new monitor on the resumed model given it by `load_state_dict`
        warns from then on exactly as an unbroken run would. Waits for the updates still being copied to the
        host (a sync, once per checkpoint). Call it between steps.

        Examples:
            >>> from admin_torch import make_stack
            >>> mon = StabilityMonitor(make_stack('pre_ln', depth=2, dim=8, seed=0), every=5)
            >>> sorted(mon.state_dict())
            ['eps', 'fallback', 'history', 'signal_detector', 'step_count', 'warned']
        """
        self._check_signals(block=True)  # every closed update's scalars through the rules first
        return {"step_count": self.step_count, "signal_detector": self._signal_detector.state_dict(),
                "warned": sorted(self._warned), "history": list(self.history[-lookback(self.rules):]),
                "fallback": self.fallback, "eps": self._eps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from `state_dict` (a new monitor, same rules, on the resumed model; before its first step).
        ValueError naming ``state`` for another monitor's state (other ``signal_rules``) or a malformed one;
        checked first: a refused call changes nothing. RuntimeError after `close` or during a logged step."""
        self._check_open()
        if self._armed:
            raise RuntimeError("load_state_dict: a logged step is under way; load the state before the first "
                               "step (before attach_optimizer / begin_step) or between steps")
        if not isinstance(state, dict) or set(state) != set(self._STATE_KEYS):
            raise ValueError(f"state must be a StabilityMonitor.state_dict() (keys {', '.join(self._STATE_KEYS)})")
        step_count = validation.as_int("state['step_count']", state["step_count"], minimum=0)
        fallback = validation.as_choice("state['fallback']", state["fallback"], FALLBACK_MODES)
        eps = state["eps"]
        if isinstance(eps, bool) or not isinstance(eps, float) or not 0 < eps < float("inf"):
            raise ValueError(f"state['eps'] must be a finite float > 0, got {eps!r}")
        warned, history = state["warned"], state["history"]
        if not isinstance(warned, (list, tuple)) or not all(isinstance(w, (list, tuple)) and len(w) == 2
                                                              for w in warned):
            raise ValueError("state['warned'] must be a list of (layer, quantity) pairs")
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            raise ValueError("state['history'] must be a list of records (dicts)")
        # the detector checks its part (ValueError naming state: other rules) before anything changes here
        detector = SignalDetector(self._signal_detector.rules)
        detector.load_state_dict(state["signal_detector"])
        self._check_signals(block=True)  # nothing of this monitor's own updates is left pending
        self._signal_detector = detector
        self.step_count, self.fallback, self._eps = step_count, fallback, eps
        self._warned = {tuple(w) for w in warned}
        self.history = [dict(r) for r in history]

    # ------------------------------------------------------------------ outputs

    def summary(self) -> str:
        """A markdown table: per quantity and row, the first, last and largest logged value."""
        return summary_table(self.history, self.warnings, every=self.every, n_sites=len(self.sites),
                             mechanism=self.mechanism)

    def heatmaps(self, directory: Optional[Union[str, Path]] = None) -> List[Path]:
        """Write ``heatmap_<quantity>.png`` (rows: layers in model order, columns: logged steps)."""
        directory = directory if directory is not None else self.log_dir  # checked by write_heatmaps
        if directory is None:
            raise ValueError("directory: no log_dir was given; name a directory for the heatmaps")
        return write_heatmaps(self.history, directory, every=self.every)

    # ------------------------------------------------------------------ lifetime

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this StabilityMonitor is closed (close() removed it from the model)")

    def remove(self) -> None:
        """Detach from the model: every hook (logging-step hooks, optimizer hooks) is removed."""
        self._disarm()
        for h in self._optimizer_handles:
            h.remove()
        self._optimizer_handles = []
        self._params.before = None
        self._probe.call = None
        for s in self._site_plan.all_sites():
            s.reset()
            s.prev_probe = None

    def close(self) -> str:
        """Remove the hooks, write ``summary.md`` and the heatmaps (with a ``log_dir``), close ``monitor.jsonl``,
        log and return the summary table. Idempotent. Afterwards, like a closed file, the monitor refuses every
        step and observation (``begin_step``, ``end_step``, ``step``, ``observe_loss``, ``observe_logits``,
        ``capture_grads``, ``attach_optimizer``: RuntimeError "... closed ..."); ``history``, ``warnings`` and
        ``summary()`` stay readable."""
        if self._closed:
            return self.summary()
        self._check_signals(block=True)  # the last updates' copies: waited for once, at the end
        self.remove()
        self._closed = True
        text = self.summary()
        try:
            if self.log_dir is not None:
                write_summary(self.log_dir, text)
                if self._heatmaps:
                    try:
                        written = self.heatmaps()
                        if written:  # the heatmaps as TensorBoard images too
                            self._writer.add_images(written, self.history[-1]["step"])
                    except ImportError:
                        self.log.warning("stability monitor: matplotlib is not installed; no heatmaps")
        finally:  # monitor.jsonl is closed even when an output fails (a full disk)
            if self._writer is not None:
                self._writer.close()
        self.log.info("%s", text)
        return text

    def __enter__(self) -> "StabilityMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
