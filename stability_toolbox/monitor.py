"""A live training-stability monitor: Admin's analysis, per layer, every k steps.

[`StabilityMonitor`][stability_toolbox.StabilityMonitor] attaches to a model and, on every ``every``-th optimizer step (the
*logging steps*), records per layer:

* ``beta``: the residual-branch ratio of each residual sublayer (Admin's beta), the share of the
  branch in the variance of the residual sum: ``Var[f(x)] / Var[omega * x + f(x)]`` (population
  variances over every element of the batch, padding included, as [`admin_torch.residual_betas`][admin_torch.residual_betas]
  and Admin's profiler). For Post-LN the residual sum is the LayerNorm's input; for Pre-LN it is the
  stream the next sublayer's LayerNorm reads.
* ``output_change``: the relative change of each sublayer's residual sum on a fixed probe batch (the
  first logged batch, replayed in eval mode under ``no_grad``) since the previous logging step,
  ``||s(W_t) - s(W_t')||^2 / ||s(W_t')||^2`` -- the live, per-layer form of Admin's output change
  ``E||F(x, W) - F(x, W + delta)||^2``; Post-LN's grows with depth, Admin's stays flat.
* ``grad_norm``: the L2 norm of each layer's gradient; ``grad_ratio``: that norm over the largest layer
  gradient norm (vanishing gradients in the lower layers); ``update_ratio``: ``||W_after - W_before|| /
  ||W_before||`` of each layer over the logging step's update.
* ``act_max``: the largest ``|activation|`` of each sublayer (branch output and residual sum), and
  ``act_frac = act_max / finfo(dtype).max``: the fp16/bf16 overflow margin (``range_dtype`` picks the
  dtype to compare with; default: the activation's own).
* ``attn_logit_max``: the largest ``|q . k| / sqrt(d_head)`` of each attention module whose
  projections are known (torch.nn ``MultiheadAttention``, modules with ``q_proj``/``k_proj`` as in
  fairseq, BART, Marian and our reference stacks, BERT/RoBERTa's ``query``/``key``); masks and
  position biases are not applied, so it is an upper bound of the softmax's input.
* ``loss`` (mean over the interval), ``loss_max`` and ``loss_spike`` (the interval's largest loss over
  the median of the previous logged means).

Where the residual sums are found (most exact first):

1. residual modules called as ``module(x, f_x)``: [`admin_torch.OmegaResidual`][admin_torch.OmegaResidual],
   [`admin_torch.DeepNormResidual`][admin_torch.DeepNormResidual], [`admin_torch.AddResidual`][admin_torch.AddResidual] (the
   reference stacks, converted torch.nn and HuggingFace models, fairseq's ``transformer_admin``);
2. the per-layer descriptions that drive [`admin_torch.convert`][admin_torch.convert] / [`admin_torch.fold`][admin_torch.fold]
   (`admin_torch.LAYER_KINDS`: torch.nn, BERT, RoBERTa, BART, Marian; fairseq's layers are
   added by `fairseq_plugins.monitor` through [`register_layer_kind`][stability_toolbox.register_layer_kind]), Post-LN or Pre-LN
   (``norm_first`` / ``normalize_before``): ``f = s - x`` with ``x`` the sublayer's input stream;
3. any other model: every LayerNorm/RMSNorm in call order, the shortcut of norm i being the previous
   norm's output (Post-LN) or input (Pre-LN), decided once from the first logged step (the candidate
   leaving the smaller branch) unless ``fallback=`` says which.

Between logging steps no hook is installed and nothing is read on the host: [`begin_step`][stability_toolbox.StabilityMonitor.begin_step] /
[`end_step`][stability_toolbox.StabilityMonitor.end_step] count, and a loss passed in is accumulated on its device. On a logging step the
hooks go in, the statistics are computed on the device, and one transfer brings them to the host.

Outputs under ``log_dir``: ``monitor.jsonl`` (one JSON object per logging step; a non-finite value as the
string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``, read back by `read_records`), TensorBoard scalars
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
    >>> sorted(mon.history[-1]['quantities'])[:3]
    ['act_frac', 'act_max', 'attn_logit_max']
    >>> summary = mon.close()           # the summary table, also printed to the log
"""

import contextlib
import json
import logging
import math
import os
import re
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from toolbox_core import validation

__all__ = ["StabilityMonitor", "WarningRule", "DEFAULT_RULES", "QUANTITIES", "register_layer_kind"]

logger = logging.getLogger(__name__)

#: per-row quantities, in the order of the summary table
QUANTITIES = ("beta", "output_change", "grad_norm", "grad_ratio", "update_ratio", "act_max", "act_frac",
              "attn_logit_max")
#: model-level quantities
MODEL_QUANTITIES = ("loss", "loss_max", "loss_spike", "log_z", "log_z_rms")
#: quantities whose heatmap and warnings are read on a log scale
_LOG_SCALE = {"output_change", "grad_norm", "grad_ratio", "update_ratio", "act_max", "act_frac", "attn_logit_max"}

_NORM_SUFFIXES = ("LayerNorm", "RMSNorm")
_FALLBACK_MODES = ("auto", "post_ln", "pre_ln")


@dataclass(frozen=True)
class WarningRule:
    """When a per-row quantity "trends toward divergence".

    Over the logged values ``v_1 .. v_n`` of one (row, quantity), a warning is issued at step n when

    * ``direction='rising'``: ``v_n >= threshold`` and each of the last ``window`` values is more than
      ``min_growth`` times the one before;
    * ``direction='falling'``: ``v_n <= threshold`` and each of the last ``window`` values is less than
      ``1 / min_growth`` times the one before;
    * and at least ``min_rows`` rows of that quantity meet it at once (one noisy row does not fire).

    Non-finite values (NaN/inf in a statistic) warn at once. Each (row, quantity) warns once.
    """

    threshold: float
    window: int = 3
    min_growth: float = 1.0
    min_rows: int = 1
    direction: str = "rising"

    def __post_init__(self):
        validation.as_real("threshold", self.threshold)
        validation.as_int("window", self.window, minimum=1)
        validation.as_real("min_growth", self.min_growth, low=0.0)
        validation.as_int("min_rows", self.min_rows, minimum=1)
        validation.as_choice("direction", self.direction, ("rising", "falling"))


#: the default rules (calibration and false-alarm rates: docs/monitor.md)
DEFAULT_RULES: Dict[str, WarningRule] = {
    # vanishing gradients, what freezes the lower layers of a deep Post-LN stack: in at least 2 layers the
    # gradient fell below 1/100 of the largest layer gradient, falling >= 3x per log over the last 3
    # logged steps (a rate: it warns while the collapse is under way, before the loss stalls)
    "grad_ratio": WarningRule(threshold=1e-2, window=3, min_growth=3.0, min_rows=2, direction="falling"),
    # exploding gradients: a layer's gradient norm grew three logs in a row to >= 100
    "grad_norm": WarningRule(threshold=100.0, window=3, min_growth=1.5),
    # fp16 overflow: the largest activation within a factor 16 of the dtype's largest finite value
    "act_frac": WarningRule(threshold=1.0 / 16, window=2),
    # attention-logit growth: the largest |q.k|/sqrt(d) past 20 and at least doubling per log over the last
    # 3 logged steps (slow growth to ~50 trains fine; growth that fast ends in a saturated softmax)
    "attn_logit_max": WarningRule(threshold=20.0, window=3, min_growth=2.0),
    # output-logit divergence: the RMS of the output logits' log Z past 10 and growing >= 1.3x per log
    # (needs monitor.observe_logits(logits))
    "log_z_rms": WarningRule(threshold=10.0, window=3, min_growth=1.3),
}


# ----------------------------------------------------------------------------- layer descriptions

_EXTRA_KINDS: Dict[str, Callable[[nn.Module], Any]] = {}


def register_layer_kind(key: str, describe: Callable[[nn.Module], Any]) -> None:
    """Teach the monitor a layer type: ``describe(layer)`` returns its [`admin_torch.LayerKind`][admin_torch.LayerKind].

    ``key`` is ``module.QualifiedName`` of the class (`admin_torch.architectures.kind_key`);
    subclasses match too. `fairseq_plugins.monitor` registers fairseq's layers this way with the
    descriptions `fairseq_plugins.fold_checkpoint` folds with.

    Examples:
        >>> register_layer_kind('mylib.MyLayer', lambda layer: MY_KIND)   # doctest: +SKIP
    """
    if not isinstance(key, str):
        raise TypeError(f"key must be a class key 'module.QualifiedName' (str), got {type(key).__name__}")
    if not callable(describe):
        raise TypeError(f"describe must be a callable layer -> LayerKind, got {type(describe).__name__}")
    _EXTRA_KINDS[key] = describe


def _describe_layer(module: nn.Module):
    """The [`admin_torch.LayerKind`][admin_torch.LayerKind] of ``module`` (registered kinds, then admin_torch's tables and
    structural recognition), or None."""
    from admin_torch import architectures as arch

    for cls in type(module).__mro__:
        describe = _EXTRA_KINDS.get(arch.kind_key(cls))
        if describe is not None:
            return describe(module)
    layer_kind = getattr(arch, "layer_kind", None)  # structural recognition (BERT-like families), if present
    if layer_kind is not None:
        return layer_kind(module)
    return arch.LAYER_KINDS.get(arch.kind_key(type(module)))


def _residual_types() -> Tuple[type, ...]:
    from admin_torch.deepnorm import DeepNormResidual
    from admin_torch.reference_stack import AddResidual
    from admin_torch.residual import OmegaResidual

    return (OmegaResidual, DeepNormResidual, AddResidual)


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(_NORM_SUFFIXES)


def _first_tensor(value) -> Optional[Tensor]:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


# ----------------------------------------------------------------------------- statistics on device

class _Site:
    """One residual sublayer: its statistics of the current logging step (device tensors)."""

    __slots__ = ("name", "beta_sum", "calls", "amax", "dtype", "probe", "prev_probe", "alt_sum", "pre_sum")

    def __init__(self, name: str):
        self.name = name
        self.prev_probe: Optional[Tensor] = None
        self.reset()

    def reset(self) -> None:
        self.beta_sum: Optional[Tensor] = None
        self.alt_sum: Optional[Tensor] = None  # fallback sites: the Pre-LN candidate's beta
        self.pre_sum: Optional[Tensor] = None  # fallback sites: Var[s - y_prev] / Var[s - s_prev] votes
        self.calls = 0
        self.amax: Optional[Tensor] = None
        self.dtype: Optional[torch.dtype] = None
        self.probe: Optional[Tensor] = None


def _var(t: Tensor) -> Tensor:
    return t.detach().float().var(unbiased=False)


def _amax(*ts: Tensor) -> Tensor:
    return torch.stack([t.detach().abs().amax().float() for t in ts]).amax()


def _add(acc: Optional[Tensor], value: Tensor) -> Tensor:
    return value if acc is None else acc + value


def _max(acc: Optional[Tensor], value: Tensor) -> Tensor:
    return value if acc is None else torch.maximum(acc, value)


#: how many monitors are running their probe pass now: every other monitor's hooks ignore those calls (two
#: monitors on one model stay independent)
_PROBING = [0]


def _inert_hook(*_args, **_kwargs) -> None:
    """What a monitor's hook becomes in a pickled or deep-copied model: nothing."""
    return None


class _Hook:
    """A monitor's hook on the model: calls ``fn`` in this model only. A ``copy.deepcopy`` of the model (an EMA
    copy) and a pickled one (``torch.save(model)``) get `_inert_hook` instead, so they are picklable and
    never report into this monitor."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        return _inert_hook

    def __reduce__(self):
        return (_make_inert, ())


def _make_inert():
    return _inert_hook


class _Recorder:
    """Shared state of the hooks of one logging step: training pass or probe pass."""

    def __init__(self, probe_rows: int):
        self.phase = "train"
        self.probe_rows = probe_rows

    @property
    def foreign(self) -> bool:
        """Another monitor's probe pass is running: what the hooks see now is not a training call."""
        return self.phase == "train" and _PROBING[0] > 0

    def record(self, site: _Site, f: Tensor, s: Tensor) -> None:
        """``f``: the branch output, ``s``: the residual sum (same shape)."""
        if self.foreign:
            return
        if self.phase == "probe":
            rows = s.detach().reshape(-1, s.shape[-1]) if s.dim() else s.detach().reshape(1, 1)
            site.probe = rows[: self.probe_rows].float().clone()
            return
        # the ratio of this call; calls within one step (micro-batches) are averaged
        site.beta_sum = _add(site.beta_sum, _var(f) / _var(s).clamp_min(1e-30))
        site.amax = _max(site.amax, _amax(f, s))
        site.dtype = s.dtype
        site.calls += 1


# ----------------------------------------------------------------------------- the monitor

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
        probe_rows: the output change uses the first ``probe_rows`` feature vectors of each sublayer.
        range_dtype: the floating dtype ``act_frac`` compares with (e.g. ``torch.float16`` to see the
            fp16 margin of an fp32 run); default: each activation's own dtype.
        fallback: models without residual modules or known layers: ``'auto'``, ``'post_ln'``, ``'pre_ln'``.
        rules: ``{quantity: WarningRule}`` replacing `DEFAULT_RULES` (``{}``: no warnings).
        tensorboard, heatmaps: write TensorBoard scalars / PNG heatmaps (needs ``log_dir``).
        log: the logger warnings and the summary go to (default ``stability_toolbox.monitor``).

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
    ):
        # ---- every check first: a refused call attaches nothing
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.every = validation.as_int("every", every, minimum=1)
        self.probe_rows = validation.as_int("probe_rows", probe_rows, minimum=1)
        if range_dtype is not None and not (isinstance(range_dtype, torch.dtype) and range_dtype.is_floating_point):
            raise TypeError(f"range_dtype must be a floating torch.dtype or None, got {range_dtype!r}")
        self.fallback = validation.as_choice("fallback", fallback, _FALLBACK_MODES)
        if rules is None:
            rules = DEFAULT_RULES
        if not isinstance(rules, dict):
            raise TypeError(f"rules must be a dict {{quantity: WarningRule}}, got {type(rules).__name__}")
        for q, r in rules.items():
            if q not in QUANTITIES + ("log_z_rms",):
                raise ValueError(f"rules: unknown quantity {q!r}; accepted: {', '.join(QUANTITIES)}")
            if not isinstance(r, WarningRule):
                raise TypeError(f"rules[{q!r}] must be a WarningRule, got {type(r).__name__}")
        if probe is not None and not isinstance(probe, (Tensor, tuple, list, dict)):
            raise TypeError(f"probe must be a tensor, a tuple of positional arguments or a dict of keyword "
                            f"arguments, got {type(probe).__name__}")
        if log is not None and not isinstance(log, logging.Logger):
            raise TypeError(f"log must be a logging.Logger, got {type(log).__name__}")
        tensorboard = validation.as_bool("tensorboard", tensorboard)
        heatmaps = validation.as_bool("heatmaps", heatmaps)
        if log_dir is not None:
            if not isinstance(log_dir, (str, os.PathLike)):
                raise TypeError(f"log_dir must be a directory path (str or os.PathLike) or None, got "
                                f"{type(log_dir).__name__}")
            if not os.fspath(log_dir):
                raise ValueError("log_dir must be a non-empty directory path or None (in memory only), got ''")
            log_dir = Path(log_dir)
            if log_dir.exists() and not log_dir.is_dir():
                raise ValueError(f"log_dir {log_dir} exists and is not a directory")
        # ---- attach
        self.model = model
        self.log_dir = log_dir
        self.rules = dict(rules)
        self.range_dtype = range_dtype
        self.log = log or logger
        self._tensorboard, self._heatmaps = tensorboard, heatmaps
        self._recorder = _Recorder(self.probe_rows)
        self._plan()
        self._probe = None if probe is None else self._as_call(probe)
        self._probe_step: Optional[int] = None  # the step whose inputs the probe was taken from (None: given)
        self._probe_model = self._model_dtype_device() if probe is not None else None  # its dtype, device then
        self._probe_given = probe is not None
        self.step_count = 0          # completed steps
        self.history: List[Dict[str, Any]] = []
        self.warnings: List[Dict[str, Any]] = []
        self._warned = set()
        self._handles: List[Any] = []
        self._armed = False
        self._grads: Optional[Dict[str, Tensor]] = None
        self._hooked_grads: Dict[int, Tensor] = {}
        self._before: Optional[List[List[Tensor]]] = None
        self._loss_sum: Optional[Tensor] = None
        self._loss_max: Optional[Tensor] = None
        self._loss_n = 0
        self._log_z: Optional[Tuple[Tensor, Tensor, int]] = None  # observe_logits: sum, sum of squares, count
        self._writer = None
        self._jsonl = None
        self._optimizer_handles: List[Any] = []
        self._closed = False
        self.compile_note: Optional[str] = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(log_dir / "monitor.jsonl", "a", encoding="utf-8")

    # ------------------------------------------------------------------ discovery

    def _plan(self) -> None:
        """Find the residual sublayers, the attention modules and the parameter groups of the model."""
        model = self.model
        residual_types = _residual_types()
        self._residual_sites: List[Tuple[nn.Module, _Site]] = []
        self._layer_plans: List[Tuple[str, nn.Module, Any, bool, List[_Site]]] = []
        covered: set = set()  # ids of modules whose norms are accounted for
        layers: List[Tuple[str, nn.Module]] = []
        for name, module in model.named_modules():
            if id(module) in covered:
                continue
            kind = _describe_layer(module)
            residuals = [(n, m) for n, m in module.named_modules() if isinstance(m, residual_types)] \
                if kind is not None else []
            if kind is not None:
                layers.append((name, module))
                covered.update(id(m) for m in module.modules())
                prefix = f"{name}." if name else ""
                if residuals:  # converted / Admin layer: its residual modules give x and f exactly
                    for n, m in residuals:
                        self._residual_sites.append((m, _Site(prefix + n)))
                else:
                    pre = bool(getattr(module, "norm_first", False) or getattr(module, "normalize_before", False))
                    sites = [_Site(prefix + sub.norm) for sub in kind.sublayers]
                    self._layer_plans.append((name, module, kind, pre, sites))
        for name, module in model.named_modules():
            if isinstance(module, residual_types) and id(module) not in covered:
                self._residual_sites.append((module, _Site(name)))
                covered.add(id(module))
        # the fallback: norms not inside a known layer, when nothing else was found
        self._fallback_norms: List[Tuple[nn.Module, _Site]] = []
        if not self._residual_sites and not self._layer_plans:
            self._fallback_norms = [(m, _Site(n)) for n, m in model.named_modules() if _is_norm(m)]
            if not self._fallback_norms:
                raise ValueError("model has no residual module, no known transformer layer and no LayerNorm/RMSNorm: "
                                 "nothing to monitor")
        self._fallback_prev: Optional[Tuple[Tensor, Tensor]] = None
        self._fallback_votes = [0, 0]  # post, pre
        # attention modules
        self._attention: List[Tuple[str, nn.Module, str]] = []
        for name, module in model.named_modules():
            style = _attention_style(module)
            if style is not None:
                self._attention.append((name, module, style))
        self._attn_max: Dict[str, Optional[Tensor]] = {}
        # parameter groups: the known layers, else the elements of the longest ModuleList
        if not layers:
            lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)
                     and any(True for _ in m.parameters())]
            if lists:
                n, best = max(lists, key=lambda t: len(t[1]))
                layers = [(f"{n}.{i}" if n else str(i), m) for i, m in enumerate(best)]
        grouped = set()
        self._groups: List[Tuple[str, List[Tuple[str, nn.Parameter]]]] = []
        names = {id(p): n for n, p in model.named_parameters()}
        for lname, layer in layers:
            params = [(names[id(p)], p) for p in layer.parameters() if id(p) not in grouped and p.requires_grad]
            grouped.update(id(p) for _, p in params)
            if params:
                self._groups.append((lname or "(model)", params))
        rest = [(n, p) for n, p in model.named_parameters() if id(p) not in grouped and p.requires_grad]
        if rest:
            self._groups.append(("(other)", rest))

    @property
    def sites(self) -> List[str]:
        """The names of the monitored residual sublayers (rows of ``beta``, ``output_change``, ``act_*``)."""
        out = [s.name for _, s in self._residual_sites]
        for _, _, _, _, sites in self._layer_plans:
            out += [s.name for s in sites]
        out += [s.name for _, s in self._fallback_norms]
        return out

    @property
    def mechanism(self) -> str:
        """How the residual sums are found: ``'residual modules'``, ``'layer descriptions'``, ``'fallback'`` or a mix."""
        parts = [("residual modules", self._residual_sites), ("layer descriptions", self._layer_plans),
                 (f"fallback ({self.fallback})", self._fallback_norms)]
        return " + ".join(p for p, items in parts if items)

    @staticmethod
    def _as_call(probe) -> Tuple[tuple, dict]:
        if isinstance(probe, Tensor):
            return (probe,), {}
        if isinstance(probe, dict):
            return (), dict(probe)
        return tuple(probe), {}

    # ------------------------------------------------------------------ hooks (logging steps only)

    def _arm(self) -> None:
        rec = self._recorder
        hs = self._handles
        for module, site in self._residual_sites:
            def res_hook(_m, args, out, site=site):
                if len(args) >= 2 and isinstance(out, Tensor):
                    rec.record(site, args[1], out)
            hs.append(module.register_forward_hook(res_hook))
        for _, layer, kind, pre, sites in self._layer_plans:
            self._arm_layer(layer, kind, pre, sites)
        if self._fallback_norms:
            self._fallback_prev = None
            hs.append(self.model.register_forward_pre_hook(self._reset_fallback))
            for norm, site in self._fallback_norms:
                hs.append(norm.register_forward_hook(lambda m, a, o, site=site: self._fallback_hook(site, a, o)))
        if self._probe is None:  # keep the first logged call's inputs as the probe
            hs.append(self.model.register_forward_pre_hook(self._capture_probe, with_kwargs=True))
        self._armed = True

    def _arm_attention(self) -> None:
        for name, module, style in self._attention:
            self._attn_max.setdefault(name, None)
            if style == "torch_mha":
                self._handles.append(module.register_forward_pre_hook(
                    lambda m, a, k, name=name: self._mha_logits(name, m, a, k), with_kwargs=True))
            elif style == "fairseq":
                # fairseq's attention hands q_proj.weight to F.multi_head_attention_forward without
                # calling q_proj: project the query and key from the module's inputs instead
                self._handles.append(module.register_forward_pre_hook(
                    lambda m, a, k, name=name: self._fairseq_logits(name, m, a, k), with_kwargs=True))
            else:
                q_name, k_name = ("query", "key") if style == "hf_bert" else ("q_proj", "k_proj")
                if _qk_normed(module):  # qk-layernorm: the logits are those of the normalised q and k
                    q_name, k_name = "q_norm", "k_norm"
                slot: Dict[str, Tensor] = {}

                def proj_hook(_m, _a, out, which, name=name, module=module, style=style, slot=slot):
                    slot[which] = out
                    if "q" in slot and "k" in slot:
                        self._proj_logits(name, module, style, slot.pop("q"), slot.pop("k"))

                self._handles.append(getattr(module, q_name).register_forward_hook(
                    lambda m, a, o, h=proj_hook: h(m, a, o, "q")))
                self._handles.append(getattr(module, k_name).register_forward_hook(
                    lambda m, a, o, h=proj_hook: h(m, a, o, "k")))

    def _arm_layer(self, layer: nn.Module, kind, pre: bool, sites: List[_Site]) -> None:
        rec, hs = self._recorder, self._handles
        slots: List[Optional[Tensor]] = [None] * len(sites)
        if not pre:
            # Post-LN: s = norm input; x = the residual argument of the sublayer's output module, the
            # source norm's output, the input of the capture module, or the layer's input; f = s - x
            def capture_input(_m, args, kwargs):
                x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
                for i, sub in enumerate(kind.sublayers):
                    if sub.source is None and getattr(sub, "capture", None) is None and \
                            getattr(sub, "residual_arg", None) is None:
                        slots[i] = x
            hs.append(layer.register_forward_pre_hook(capture_input, with_kwargs=True))
            for i, sub in enumerate(kind.sublayers):
                residual_arg, capture = getattr(sub, "residual_arg", None), getattr(sub, "capture", None)
                if residual_arg is not None:
                    def capture_arg(_m, args, kwargs, i=i):
                        slots[i] = args[1] if len(args) >= 2 else kwargs.get("input_tensor")
                    hs.append(_get(layer, residual_arg).register_forward_pre_hook(capture_arg, with_kwargs=True))
                elif sub.source is not None:
                    def capture_source(_m, _a, out, i=i):
                        slots[i] = out
                    hs.append(_get(layer, sub.source).register_forward_hook(capture_source))
                elif capture is not None:
                    def capture_first(_m, args, kwargs, i=i):
                        slots[i] = args[0] if args else kwargs.get("hidden_states", kwargs.get("query"))
                    hs.append(_get(layer, capture).register_forward_pre_hook(capture_first, with_kwargs=True))

                def at_norm(_m, args, i=i):
                    x, s = slots[i], args[0]
                    slots[i] = None
                    if isinstance(x, Tensor) and x.shape == s.shape:
                        rec.record(sites[i], s - x, s)
                hs.append(_get(layer, sub.norm).register_forward_pre_hook(at_norm))
        else:
            # Pre-LN: x_i = norm i's input, s_i = norm i+1's input (or the layer's output), f = s - x
            def close(i: int, s: Optional[Tensor]) -> None:
                x = slots[i]
                slots[i] = None
                if isinstance(x, Tensor) and isinstance(s, Tensor) and x.shape == s.shape:
                    rec.record(sites[i], s - x, s)

            for i, sub in enumerate(kind.sublayers):
                def at_norm(_m, args, i=i):
                    if i > 0:
                        close(i - 1, args[0])
                    slots[i] = args[0]
                hs.append(_get(layer, sub.norm).register_forward_pre_hook(at_norm))
            hs.append(layer.register_forward_hook(lambda m, a, out: close(len(sites) - 1, _first_tensor(out))))

    def _reset_fallback(self, *_):
        self._fallback_prev = None

    def _fallback_hook(self, site: _Site, args, out) -> None:
        s = args[0] if args else None
        if not isinstance(s, Tensor) or not isinstance(out, Tensor) or self._recorder.foreign:
            return
        prev = self._fallback_prev
        self._fallback_prev = (s, out)
        if prev is None or prev[0].shape != s.shape:
            return
        rec = self._recorder
        if rec.phase == "probe":
            rec.record(site, s, s)
            return
        s_prev, y_prev = prev
        # both readings of the shortcut: Post-LN (previous norm's output) and Pre-LN (its input)
        f_post, f_pre = s - y_prev, s - s_prev
        v_post, v_pre, v_s = _var(f_post), _var(f_pre), _var(s).clamp_min(1e-30)
        site.beta_sum = _add(site.beta_sum, v_post / v_s)
        site.alt_sum = _add(site.alt_sum, v_pre / v_s)
        site.pre_sum = _add(site.pre_sum, (v_pre < v_post).float())
        site.amax = _max(site.amax, _amax(s))
        site.dtype = s.dtype
        site.calls += 1

    def _capture_probe(self, _m, args, kwargs):
        if self._recorder.foreign:
            return
        def keep(v):
            return v.detach().clone() if isinstance(v, Tensor) else v
        self._probe = (tuple(keep(a) for a in args), {k: keep(v) for k, v in kwargs.items()})
        self._probe_step = self.step_count
        self._probe_model = self._model_dtype_device()

    def _mha_logits(self, name: str, m: nn.MultiheadAttention, args, kwargs) -> None:
        query = args[0] if args else kwargs.get("query")
        key = args[1] if len(args) > 1 else kwargs.get("key")
        if not isinstance(query, Tensor) or not isinstance(key, Tensor) or query.dim() != 3:
            return
        e = m.embed_dim
        with torch.no_grad():
            if m.in_proj_weight is not None:
                wq, wk = m.in_proj_weight[:e], m.in_proj_weight[e:2 * e]
            else:
                wq, wk = m.q_proj_weight, m.k_proj_weight
            bq = bk = None
            if m.in_proj_bias is not None:
                bq, bk = m.in_proj_bias[:e], m.in_proj_bias[e:2 * e]
            q = nn.functional.linear(query.detach(), wq, bq)
            k = nn.functional.linear(key.detach(), wk, bk)
            if _qk_normed(m):
                q, k = m.q_norm(q), m.k_norm(k)
            self._store_logits(name, q, k, m.num_heads, batch_first=m.batch_first)

    def _fairseq_logits(self, name: str, m: nn.Module, args, kwargs) -> None:
        query = args[0] if args else kwargs.get("query")
        key = args[1] if len(args) > 1 else kwargs.get("key")
        key = query if key is None else key
        if not isinstance(query, Tensor) or not isinstance(key, Tensor) or query.dim() != 3:
            return
        with torch.no_grad():
            q, k = m.q_proj(query.detach()), m.k_proj(key.detach())
            if _qk_normed(m):
                q, k = m.q_norm(q), m.k_norm(k)
            self._store_logits(name, q, k, m.num_heads, batch_first=False)

    def _proj_logits(self, name: str, module: nn.Module, style: str, q: Tensor, k: Tensor) -> None:
        heads = _heads(module)
        if heads is None or q.dim() != 3 or k.dim() != 3:
            return
        with torch.no_grad():
            self._store_logits(name, q.detach(), k.detach(), heads, batch_first=(style != "fairseq"))

    def _store_logits(self, name: str, q: Tensor, k: Tensor, heads: int, batch_first: bool) -> None:
        if self._recorder.phase != "train" or self._recorder.foreign:
            return
        if not batch_first:
            q, k = q.transpose(0, 1), k.transpose(0, 1)
        b, tq, d = q.shape
        if k.shape[0] != b or k.shape[2] != d or d % heads:
            return
        dh = d // heads
        qh = q.reshape(b, tq, heads, dh).transpose(1, 2).float()
        kh = k.reshape(b, k.shape[1], heads, dh).transpose(1, 2).float()
        value = (qh @ kh.transpose(-1, -2)).abs().amax() / math.sqrt(dh)
        self._attn_max[name] = _max(self._attn_max.get(name), value)

    def _post_accumulate(self, p: Tensor) -> None:
        # the accumulated gradient so far; the last call of the step holds the full gradient
        if p.grad is not None:
            self._hooked_grads[id(p)] = p.grad.detach().float().pow(2).sum()

    def _disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._armed = False

    # ------------------------------------------------------------------ the step protocol

    def is_logging_step(self, step: Optional[int] = None) -> bool:
        """Whether ``step`` (default: the coming one) is logged."""
        return (self.step_count if step is None else step) % self.every == 0

    def begin_step(self, step: Optional[int] = None) -> bool:
        """Call before the forward pass of a step; ``step`` realigns the counter (a resumed run).

        Returns whether this step is logged (then the hooks are in until [`end_step`][stability_toolbox.StabilityMonitor.end_step]).
        """
        self._check_open()
        if step is not None:
            self.step_count = validation.as_int("step", step, minimum=0)
        if self._armed or not self.is_logging_step():
            return self._armed
        for (_, params) in self._groups:
            for _, p in params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._post_accumulate))
        with torch.no_grad():
            self._before = [[p.detach().clone() for _, p in params] for _, params in self._groups]
        self._arm()
        self._arm_attention()
        self._wrap_hooks()
        return True

    def _wrap_hooks(self, handles: Optional[List[Any]] = None) -> None:
        """Every hook this monitor put on the model as a `_Hook`: a pickled or deep-copied model carries
        an inert hook instead (``torch.save(model)`` works; an EMA copy does not report here)."""
        for handle in self._handles if handles is None else handles:
            hooks = handle.hooks_dict_ref()
            if hooks is not None and handle.id in hooks and not isinstance(hooks[handle.id], _Hook):
                hooks[handle.id] = _Hook(hooks[handle.id])

    def capture_grads(self) -> None:
        """Read the gradients now (after unscaling/clipping, before ``zero_grad``); without this call the
        gradient of the step is the one autograd accumulated. Only on logging steps; no host sync."""
        if not self._armed:
            return
        with torch.no_grad():
            self._grads = {}
            for gname, params in self._groups:
                sq = [p.grad.detach().float().pow(2).sum() for _, p in params if p.grad is not None]
                if sq:
                    self._grads[gname] = torch.stack(sq).sum()

    def observe_logits(self, logits: Tensor) -> None:
        """On a logging step, record the output logits' softmax normaliser: ``log_z`` (the mean over
        positions of ``logsumexp(logits, -1)``) and ``log_z_rms`` (its root mean square, what z-loss
        penalises; output-logit divergence makes it grow). Between logging steps it does nothing.
        Device-side only (no sync); call it with the logits of each forward pass (detached here)."""
        if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1:
            raise TypeError(f"logits must be a floating tensor (..., vocabulary), got {type(logits).__name__}")
        if not self._armed:
            return
        with torch.no_grad():
            lz = logits.detach().float().logsumexp(-1).reshape(-1)
            part = (lz.sum(), lz.pow(2).sum(), lz.numel())
            old = self._log_z
            self._log_z = part if old is None else (old[0] + part[0], old[1] + part[1], old[2] + part[2])

    def observe_loss(self, loss) -> None:
        """Add a step's loss (a tensor stays on its device: no sync; or a number)."""
        if loss is None:
            return
        if isinstance(loss, Tensor):
            value = loss.detach().float().reshape(-1).mean()
        elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
            value = torch.tensor(float(loss))
        else:
            raise TypeError(f"loss must be a tensor or a real number, got {type(loss).__name__}")
        if self._loss_sum is not None:
            value = value.to(self._loss_sum.device)
        self._loss_sum = _add(self._loss_sum, value)
        self._loss_max = _max(self._loss_max, value)
        self._loss_n += 1

    def end_step(self, loss=None) -> Optional[Dict[str, Any]]:
        """Call after the optimizer step. On a logging step, returns the record written; else None."""
        self._check_open()
        self.observe_loss(loss)
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
        self._before, self._grads, self._hooked_grads = None, None, {}
        for _, s in self._all_sites():
            s.reset()
        self._attn_max = {}
        self._log_z = None
        self._fallback_prev = None
        if failed and self._probe_step is not None and self._probe_step == self.step_count:
            self._probe = None
        if self._probe_step == self.step_count:
            self._probe_step = None

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
            if self._armed:  # a failed step leaves no hook and no capture behind, and logs nothing
                self._clear_step(failed=True)
            raise

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

        handles = [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
        self._wrap_hooks(handles)  # a pickled / copied optimizer carries inert hooks
        self._optimizer_handles += handles
        self.begin_step()
        return self

    # ------------------------------------------------------------------ a logging step's record

    def _all_sites(self) -> List[Tuple[Any, _Site]]:
        out = list(self._residual_sites)
        for _, _, _, _, sites in self._layer_plans:
            out += [(None, s) for s in sites]
        return out + list(self._fallback_norms)

    def _run_probe(self) -> bool:
        if self._probe is None:
            return False
        args, kwargs = self._probe
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        # torch.nn's encoder layers take a fused fast path in eval mode without autograd, which skips the
        # hooks of their LayerNorms; grad mode keeps them on the Python path (outputs are discarded)
        fast_path = any(isinstance(m, (nn.TransformerEncoderLayer, nn.MultiheadAttention)) for m in model.modules())
        devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
        args, kwargs = self._probe = self._follow_model(args, kwargs)
        self._recorder.phase = "probe"
        _PROBING[0] += 1
        try:
            model.eval()
            with torch.random.fork_rng(devices=devices), torch.set_grad_enabled(fast_path):
                model(*args, **kwargs)
        except Exception as err:
            given = "the probe= inputs" if self._probe_given else "the probe (the first logged step's inputs)"
            raise ValueError(f"probe: the model refused {given} ({type(err).__name__}: {err}); give probe= "
                             "inputs the model accepts: a tensor, a tuple of positional arguments or a dict of "
                             "keyword arguments of model") from err
        finally:
            _PROBING[0] -= 1
            self._recorder.phase = "train"
            for m, mode in modes:
                m.training = mode
        return True

    def _model_dtype_device(self) -> Tuple[Optional[torch.dtype], Optional[torch.device]]:
        p = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        return (p.dtype, p.device) if p is not None else (None, None)

    def _follow_model(self, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
        """The probe moved to the model's floating dtype and device when the model moved since the probe was
        stored (``model.to(torch.bfloat16)``, ``model.cuda()``): floating inputs of the model's old dtype take
        the new one, every tensor the new device."""
        now = self._model_dtype_device()
        was = self._probe_model or now
        self._probe_model = now
        if was == now or now[0] is None:
            return args, kwargs

        def move(v):
            if not isinstance(v, Tensor):
                return v
            dtype = now[0] if v.is_floating_point() and v.dtype == was[0] else v.dtype
            return v.to(device=now[1], dtype=dtype)
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    def _finish(self) -> Dict[str, Any]:
        step = self.step_count
        # what changed in this step
        with torch.no_grad():
            update: Dict[str, Tensor] = {}
            weight: Dict[str, Tensor] = {}
            if self._before is not None:
                for (gname, params), before in zip(self._groups, self._before):
                    d = [(p.detach() - b).float().pow(2).sum() for (_, p), b in zip(params, before)]
                    w = [b.float().pow(2).sum() for b in before]
                    update[gname], weight[gname] = torch.stack(d).sum(), torch.stack(w).sum()
            grads = self._grads
            if grads is None:
                grads = {}
                for gname, params in self._groups:
                    sq = [self._hooked_grads[id(p)] for _, p in params if id(p) in self._hooked_grads]
                    if sq:
                        grads[gname] = torch.stack(sq).sum()
        # the probe pass: residual sums on the fixed batch (hooks still in)
        had_probe = self._probe is not None
        self._run_probe() if had_probe else None
        sites = self._all_sites()
        # ---- gather every device scalar, then ONE transfer to the host
        keys: List[Tuple[str, str]] = []
        values: List[Tensor] = []
        device = None

        def put(q: str, row: str, t: Optional[Tensor]) -> None:
            nonlocal device
            if t is None:
                return
            device = device or t.device
            keys.append((q, row))
            values.append(t.detach().float().reshape(()).to(device))

        pre_votes: Dict[str, Tensor] = {}
        for _, site in sites:
            if site.calls:
                put("beta", site.name, site.beta_sum / site.calls)
                if site.alt_sum is not None:
                    put("_beta_pre", site.name, site.alt_sum / site.calls)
                    put("_pre_vote", site.name, site.pre_sum / site.calls)
                put("act_max", site.name, site.amax)
            if site.probe is not None and site.prev_probe is not None and site.probe.shape == site.prev_probe.shape:
                put("output_change", site.name,
                    (site.probe - site.prev_probe).pow(2).sum() / site.prev_probe.pow(2).sum().clamp_min(1e-30))
        for gname, sq in grads.items():
            put("grad_norm", gname, sq.sqrt())
        for gname in update:
            put("update_ratio", gname, (update[gname] / weight[gname].clamp_min(1e-30)).sqrt())
        for name, v in self._attn_max.items():
            put("attn_logit_max", name, v)
        if self._loss_n:
            put("loss", "(model)", self._loss_sum / self._loss_n)
            put("loss_max", "(model)", self._loss_max)
        if self._log_z is not None:
            put("log_z", "(model)", self._log_z[0] / self._log_z[2])
            put("log_z_rms", "(model)", (self._log_z[1] / self._log_z[2]).sqrt())
        host = torch.stack([v.cpu() for v in values]).tolist() if values else []
        # ---- host side
        quantities: Dict[str, Dict[str, float]] = {q: {} for q in QUANTITIES}
        model_q: Dict[str, float] = {}
        for (q, row), v in zip(keys, host):
            if q in ("loss", "loss_max", "log_z", "log_z_rms"):
                model_q[q] = v
            else:
                quantities.setdefault(q, {})[row] = v
        self._resolve_fallback(quantities)
        # each layer's gradient against the largest layer gradient (the embeddings etc. excluded)
        layer_grads = {r: v for r, v in quantities["grad_norm"].items() if r != "(other)"}
        top = max((v for v in layer_grads.values() if math.isfinite(v)), default=0.0)
        if top > 0:
            quantities["grad_ratio"] = {r: v / top for r, v in layer_grads.items()}
        dtypes = {s.name: s.dtype for _, s in sites}
        for row, amax in quantities["act_max"].items():
            dt = self.range_dtype or dtypes.get(row) or torch.float32
            quantities["act_frac"][row] = amax / torch.finfo(dt).max
        for _, site in sites:
            if site.probe is not None:
                site.prev_probe = site.probe
        if "loss_max" in model_q:
            earlier = [h["loss"] for h in self.history[-10:] if h.get("loss") is not None and math.isfinite(h["loss"])]
            if earlier:
                model_q["loss_spike"] = model_q["loss_max"] / max(statistics.median(earlier), 1e-30)
        self._loss_sum, self._loss_max, self._loss_n = None, None, 0
        record = {"step": step, **model_q, "quantities": quantities}
        self.history.append(record)
        record["warnings"] = self._check_rules(record)
        self._write(record)
        return record

    def _resolve_fallback(self, quantities: Dict[str, Dict[str, float]]) -> None:
        votes = quantities.pop("_pre_vote", {})
        alt = quantities.pop("_beta_pre", {})
        if not votes:
            return
        if self.fallback == "auto":
            # decided once, on the first logged step: the reading that leaves the smaller branch
            pre = sum(v > 0.5 for v in votes.values())
            self.fallback = "pre_ln" if pre > len(votes) / 2 else "post_ln"
        if self.fallback == "pre_ln":
            quantities["beta"].update(alt)

    # ------------------------------------------------------------------ warnings

    def _check_rules(self, record: Dict[str, Any]) -> List[str]:
        # the rules are pure functions of the history: stability_toolbox.warning_rules
        from .warning_rules import check

        lines = []
        for w in check(self.history, self.rules, self._warned):
            if w["quantity"] != "loss_spike":  # a loss spike may warn again; everything else warns once
                self._warned.add((w["layer"], w["quantity"]))
            self.log.warning(w["message"])
            lines.append(w["message"])
            self.warnings.append(w)
        return lines

    # ------------------------------------------------------------------ outputs

    def _write(self, record: Dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
            self._jsonl.flush()
        if self.log_dir is None or not self._tensorboard:
            return
        if self._writer is None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                self._tensorboard = False
                self.log.warning("stability monitor: tensorboardX is not installed; no TensorBoard scalars")
                return
            self._writer = SummaryWriter(str(self.log_dir / "tb"))
        step = record["step"]
        for q in MODEL_QUANTITIES:
            if record.get(q) is not None:
                self._writer.add_scalar(f"stability/{q}", record[q], step)
        for q, rows in record["quantities"].items():
            for row, v in rows.items():
                # TensorBoard tags allow [A-Za-z0-9_./-]: "(other)" becomes "_other_"
                self._writer.add_scalar(re.sub(r"[^\w./-]", "_", f"stability/{q}/{row}"), v, step)
        for line in record.get("warnings", ()):  # the same one-line text as the log and monitor.jsonl
            self._writer.add_text("stability/warnings", line, step)
        self._writer.flush()

    def summary(self) -> str:
        """A markdown table: per quantity and row, the first, last and largest logged value."""
        if not self.history:
            return "(stability monitor: no logged step)"
        lines = [f"stability monitor: {len(self.history)} logged steps (every {self.every}), "
                 f"{len(self.sites)} sublayers via {self.mechanism}; {len(self.warnings)} warnings", "",
                 "| quantity | layer | first | last | max | max at step |", "|---|---|---|---|---|---|"]
        for q in QUANTITIES:
            rows: Dict[str, List[Tuple[int, float]]] = {}
            for h in self.history:
                for row, v in h["quantities"].get(q, {}).items():
                    rows.setdefault(row, []).append((h["step"], v))
            for row, series in rows.items():
                finite = [(s, v) for s, v in series if math.isfinite(v)]
                top = max(finite, key=lambda t: t[1]) if finite else (series[-1][0], float("nan"))
                lines.append(f"| {q} | {row} | {series[0][1]:.4g} | {series[-1][1]:.4g} | {top[1]:.4g} | {top[0]} |")
        for w in self.warnings:
            lines.append(f"\n{w['message']}")
        return "\n".join(lines)

    def heatmaps(self, directory: Optional[Union[str, Path]] = None) -> List[Path]:
        """Write ``heatmap_<quantity>.png`` (rows: layers in model order, columns: logged steps)."""
        directory = Path(directory) if directory is not None else self.log_dir
        if directory is None:
            raise ValueError("directory: no log_dir was given; name a directory for the heatmaps")
        if not self.history:
            return []
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm

        directory.mkdir(parents=True, exist_ok=True)
        steps = [h["step"] for h in self.history]
        written = []
        for q in QUANTITIES:
            rows: List[str] = []
            for h in self.history:
                rows += [r for r in h["quantities"].get(q, {}) if r not in rows]
            if not rows:
                continue
            grid = [[h["quantities"].get(q, {}).get(r, float("nan")) for h in self.history] for r in rows]
            positive = [v for line in grid for v in line if math.isfinite(v) and v > 0]
            norm = LogNorm(min(positive), max(positive)) if q in _LOG_SCALE and positive and \
                min(positive) < max(positive) else None
            fig, ax = plt.subplots(figsize=(min(14, 3 + 0.12 * len(steps)), min(12, 1.5 + 0.22 * len(rows))))
            masked = [[v if math.isfinite(v) and (norm is None or v > 0) else float("nan") for v in line]
                      for line in grid]
            im = ax.imshow(masked, aspect="auto", interpolation="nearest", norm=norm, cmap="viridis",
                           extent=(steps[0] - 0.5 * self.every, steps[-1] + 0.5 * self.every, len(rows) - 0.5, -0.5))
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
        self._before = None
        self._probe = None
        for _, s in self._all_sites():
            s.reset()
            s.prev_probe = None

    def close(self) -> str:
        """Remove the hooks, write ``summary.md`` and the heatmaps (with a ``log_dir``), log and return the
        summary table. Idempotent."""
        if self._closed:
            return self.summary()
        self.remove()
        self._closed = True
        text = self.summary()
        if self.log_dir is not None:
            (self.log_dir / "summary.md").write_text(text + "\n", encoding="utf-8")
            if self._heatmaps:
                try:
                    written = self.heatmaps()
                    if self._writer is not None:  # the heatmaps as TensorBoard images too
                        from matplotlib.image import imread
                        for path in written:
                            self._writer.add_image(f"stability/{path.stem}", imread(str(path))[..., :3],
                                                   self.history[-1]["step"], dataformats="HWC")
                except ImportError:
                    self.log.warning("stability monitor: matplotlib is not installed; no heatmaps")
        if self._jsonl is not None:
            self._jsonl.close()
        if self._writer is not None:
            self._writer.close()
        self.log.info("%s", text)
        return text

    def __enter__(self) -> "StabilityMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


# ----------------------------------------------------------------------------- attention modules

def _heads(module: nn.Module) -> Optional[int]:
    for attr in ("num_heads", "heads", "num_attention_heads", "n_heads"):
        v = getattr(module, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    cfg = getattr(module, "config", None)
    v = getattr(cfg, "num_attention_heads", None)
    return v if isinstance(v, int) and v > 0 else None


def _qk_normed(module: nn.Module) -> bool:
    """Whether an attention module applies qk-layernorm (``q_norm`` / ``k_norm``, `admin_torch.qk_norm`)."""
    return isinstance(getattr(module, "q_norm", None), nn.Module) and isinstance(getattr(module, "k_norm", None),
                                                                                 nn.Module)


def _attention_style(module: nn.Module) -> Optional[str]:
    """How the query/key projections of an attention module are found, or None if it is not one we know."""
    if isinstance(module, nn.MultiheadAttention):
        return "torch_mha"
    if isinstance(getattr(module, "q_proj", None), nn.Linear) and isinstance(getattr(module, "k_proj", None), nn.Linear) \
            and _heads(module) is not None:
        # fairseq's MultiheadAttention is time-first; HF BART/Marian and our stacks are batch-first
        return "fairseq" if type(module).__module__.startswith("fairseq.") else "batch_first"
    if isinstance(getattr(module, "query", None), nn.Linear) and isinstance(getattr(module, "key", None), nn.Linear) \
            and _heads(module) is not None:
        return "hf_bert"
    return None
