"""The monitor's quantities: their names, and their statistics accumulated on the device.

Per row (a residual sublayer, an attention module or a layer's parameter group), on each logging step:

* ``beta``: the residual-branch ratio of each residual sublayer (Admin's beta), the share of the
  branch in the variance of the residual sum: ``Var[f(x)] / Var[omega * x + f(x)]`` (population
  variances over every element of the batch, padding included, as [`admin_torch.residual_betas`][admin_torch.residual_betas]
  and Admin's profiler). For Post-LN the residual sum is the LayerNorm's input; for Pre-LN it is the
  stream the next sublayer's LayerNorm reads.
* ``output_change``: the relative change of each sublayer's residual sum on a fixed probe batch
  (`stability_toolbox.probe`) since the previous logging step, ``||s(W_t) - s(W_t')||^2 / ||s(W_t')||^2``
  -- the live, per-layer form of Admin's output change ``E||F(x, W) - F(x, W + delta)||^2``; Post-LN's
  grows with depth, Admin's stays flat.
* ``grad_norm``: the L2 norm of each layer's gradient; ``grad_ratio``: that norm over the largest layer
  gradient norm (vanishing gradients in the lower layers); ``update_ratio``: ``||W_after - W_before|| /
  ||W_before||`` of each layer over the logging step's update.
* ``act_max``: the largest ``|activation|`` of each sublayer (branch output and residual sum), and
  ``act_frac = act_max / finfo(dtype).max``: the fp16/bf16 overflow margin (``range_dtype`` picks the
  dtype to compare with; default: the activation's own).
* ``attn_logit_max``: the largest ``|q . k| / sqrt(d_head)`` of each attention module
  (`stability_toolbox.attention_stats`); ``attn_entropy``: the mean over batch, heads and queries of the
  softmax entropy (nats) of those logits (`stability_toolbox.leading_signals.attention_entropy`; masks not
  applied; Zhai et al. 2023: its collapse goes with an oscillating loss).

Per model: ``loss`` (mean over the interval), ``loss_max`` and ``loss_spike`` (the interval's largest loss
over the median of the previous logged means), ``log_z`` / ``log_z_rms`` of the output logits, ``update_rms``
(``||W' - W|| / ||W||`` over every monitored parameter for the logged step: the update's RMS over the weights').

What lives here: a [`Site`][stability_toolbox.quantities.Site] per residual sublayer, filled by the hooks
through the step's [`Recorder`][stability_toolbox.quantities.Recorder]; the parameter groups' squared norms
([`ParameterGroups`][stability_toolbox.quantities.ParameterGroups]); and
[`collect`][stability_toolbox.quantities.collect], which brings every device scalar of a logging step to the
host at once and derives the host-side quantities. Nothing here knows which module is a site
(`stability_toolbox.sites`) or when a step is logged (`stability_toolbox.monitor`).
"""

import contextlib
import math
import statistics
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .tensor_norms import distance_list, norm_list, square_sums

__all__ = ["QUANTITIES", "MODEL_QUANTITIES", "LOG_SCALE", "OTHER_ROW", "Site", "Recorder", "ParameterGroups", "collect",
           "resolve_fallback", "accumulate", "running_max"]

#: per-row quantities, in the order of the summary table
QUANTITIES = ("beta", "output_change", "grad_norm", "grad_ratio", "update_ratio", "act_max", "act_frac",
              "attn_logit_max", "attn_entropy")
#: model-level quantities
MODEL_QUANTITIES = ("loss", "loss_max", "loss_spike", "log_z", "log_z_rms", "update_rms")
#: quantities whose heatmap and warnings are read on a log scale
LOG_SCALE = frozenset({"output_change", "grad_norm", "grad_ratio", "update_ratio", "act_max", "act_frac",
                       "attn_logit_max"})

#: the rows of `ParameterGroups` that are not a layer (embeddings, output head...): left out of grad_ratio
OTHER_ROW = "(other)"


class Site:
    """One residual sublayer: its statistics of the current logging step (device tensors).

    ``beta_sum`` / ``calls``: the summed per-call beta and the number of calls (micro-batches average);
    ``amax`` / ``dtype``: the largest ``|activation|`` and the activation's dtype; ``probe`` /
    ``prev_probe``: the residual sum's first rows on the probe batch, now and at the previous logging step;
    ``alt_sum`` / ``pre_sum``: fallback sites only, the Pre-LN reading's beta and its votes.
    """

    __slots__ = ("name", "beta_sum", "calls", "amax", "dtype", "probe", "prev_probe", "alt_sum", "pre_sum")

    def __init__(self, name: str):
        self.name = name
        self.prev_probe: Optional[Tensor] = None
        self.reset()

    def reset(self) -> None:
        """Forget the current step's statistics (the previous probe rows stay)."""
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


def accumulate(acc: Optional[Tensor], value: Tensor) -> Tensor:
    """``acc + value``, with None as the empty sum (stays on the device)."""
    return value if acc is None else acc + value


def running_max(acc: Optional[Tensor], value: Tensor) -> Tensor:
    """``max(acc, value)``, with None as the empty maximum (stays on the device)."""
    return value if acc is None else torch.maximum(acc, value)


# how many monitors are running their probe pass now: every other monitor's hooks ignore those calls (two
# monitors on one model stay independent)
_PROBING = [0]


class Recorder:
    """Shared state of the hooks of one monitor's logging step: training pass or probe pass."""

    def __init__(self, probe_rows: int):
        self.phase = "train"
        self.probe_rows = probe_rows
        #: the sites the last probe pass recorded, in call order, with the rows their residual sum had then
        self.probed: List[Tuple[Site, int]] = []

    @property
    def foreign(self) -> bool:
        """Another monitor's probe pass is running: what the hooks see now is not a training call."""
        return self.phase == "train" and _PROBING[0] > 0

    @contextlib.contextmanager
    def probing(self) -> Iterator[None]:
        """The probe pass: the hooks keep the probe rows, and every other monitor's hooks look away."""
        self.phase = "probe"
        self.probed = []
        _PROBING[0] += 1
        try:
            yield
        finally:
            _PROBING[0] -= 1
            self.phase = "train"

    def record(self, site: Site, f: Tensor, s: Tensor) -> None:
        """``f``: the branch output, ``s``: the residual sum (same shape)."""
        if self.foreign:
            return
        if self.phase == "probe":
            rows = s.detach().reshape(-1, s.shape[-1]) if s.dim() else s.detach().reshape(1, 1)
            site.probe = rows[: self.probe_rows].float().clone()
            self.probed.append((site, rows.shape[0]))
            return
        if not s.numel():  # an empty batch or sequence: no statistic (a variance of none is NaN), not a call
            return
        # the ratio of this call; calls within one step (micro-batches) are averaged
        site.beta_sum = accumulate(site.beta_sum, _var(f) / _var(s).clamp_min(1e-30))
        site.amax = running_max(site.amax, _amax(f, s))
        site.dtype = s.dtype
        site.calls += 1

    def record_residual(self, site: Site, x: Tensor, s: Tensor) -> None:
        """``x``: the residual input, ``s``: the residual sum (same shape): `record` of the branch ``f = s - x``,
        formed on the training pass only (the probe pass keeps rows of ``s`` alone, another monitor's probe pass
        nothing: the subtraction would be a pass over the activation for nothing)."""
        if self.foreign:
            return
        self.record(site, s if self.phase == "probe" else s - x, s)

    def record_fallback(self, site: Site, s: Tensor, s_prev: Tensor, y_prev: Tensor) -> None:
        """A norm found by the fallback: ``s`` its input, ``s_prev`` / ``y_prev`` the previous norm's input
        and output. The shortcut is either (Pre-LN: ``s_prev``, Post-LN: ``y_prev``); both readings are kept
        until [`resolve_fallback`][stability_toolbox.quantities.resolve_fallback] decides."""
        if self.phase == "probe":
            self.record(site, s, s)
            return
        if not s.numel():  # as in `record`: an empty call has no statistic
            return
        f_post, f_pre = s - y_prev, s - s_prev
        v_post, v_pre, v_s = _var(f_post), _var(f_pre), _var(s).clamp_min(1e-30)
        site.beta_sum = accumulate(site.beta_sum, v_post / v_s)
        site.alt_sum = accumulate(site.alt_sum, v_pre / v_s)
        site.pre_sum = accumulate(site.pre_sum, (v_pre < v_post).float())
        site.amax = running_max(site.amax, _amax(s))
        site.dtype = s.dtype
        site.calls += 1


class ParameterGroups:
    """The squared gradient, update and weight norms of each parameter group (a layer) on a logging step.

    ``groups``: ``[(row, [(parameter name, parameter), ...]), ...]`` (`stability_toolbox.sites.SitePlan.groups`).
    """

    def __init__(self, groups: List[Tuple[str, List[Tuple[str, torch.nn.Parameter]]]]):
        self.groups = groups
        self.before: Optional[List[List[Tensor]]] = None  # the weights before the logging step's update
        self.grads: Optional[Dict[str, Tensor]] = None  # capture(): the gradients read explicitly
        self.hooked: Dict[int, Tensor] = {}  # id(parameter) -> its accumulated gradient's squared norm

    def arm(self, handles: List[Any]) -> None:
        """Hook the gradient accumulation of every parameter (handles appended to ``handles``) and keep the
        weights."""
        for _, params in self.groups:
            for _, p in params:
                if p.requires_grad:  # a layer frozen after the monitor was built gets no gradient (and no hook)
                    handles.append(p.register_post_accumulate_grad_hook(self._accumulated))
        with torch.no_grad():
            self.before = [[p.detach().clone() for _, p in params] for _, params in self.groups]

    def _accumulated(self, p: Tensor) -> None:
        # the accumulated gradient so far (its norm: one fused op); the last call of the step holds the full one
        if p.grad is not None:
            self.hooked[id(p)] = norm_list([p.grad.detach()])[0]

    def capture(self) -> None:
        """Read the gradients now (after unscaling/clipping); they replace the accumulated ones."""
        with torch.no_grad():
            present = [(gname, p.grad.detach()) for gname, params in self.groups for _, p in params
                       if p.grad is not None]
            self.grads = square_sums([g for g, _ in present], norm_list([t for _, t in present]) if present else [])

    def squares(self) -> Tuple[Dict[str, Tensor], Dict[str, Tensor], Dict[str, Tensor]]:
        """``(grad, update, weight)``: ``{row: squared norm}`` of the step's gradients, of its update and of
        the weights before it (float32 device tensors, float64 for a model with float64 parameters; a few fused
        ops for the whole model, not a few per parameter: `stability_toolbox.tensor_norms`)."""
        with torch.no_grad():
            update: Dict[str, Tensor] = {}
            weight: Dict[str, Tensor] = {}
            if self.before is not None:
                rows = [gname for gname, params in self.groups for _ in params]
                before = [b for bs in self.before for b in bs]
                now = [p.detach() for _, params in self.groups for _, p in params]
                if before:
                    update = square_sums(rows, distance_list(now, before))
                    weight = square_sums(rows, norm_list(before))
            grads = self.grads
            if grads is None:
                hooked = [(gname, self.hooked[id(p)]) for gname, params in self.groups for _, p in params
                          if id(p) in self.hooked]
                grads = square_sums([g for g, _ in hooked], [n for _, n in hooked])
        return grads, update, weight

    def clear(self) -> None:
        """Forget the step's weights and gradients."""
        self.before, self.grads, self.hooked = None, None, {}


def collect(
    sites: Sequence[Site],
    *,
    grads: Mapping[str, Tensor],
    update: Mapping[str, Tensor],
    weight: Mapping[str, Tensor],
    attn_max: Mapping[str, Optional[Tensor]],
    loss: Tuple[Optional[Tensor], Optional[Tensor], int],
    log_z: Optional[Tuple[Tensor, Tensor, int]],
    range_dtype: Optional[torch.dtype],
    history: Sequence[Mapping[str, Any]],
    attn_entropy: Optional[Mapping[str, Tensor]] = None,
) -> Tuple[Dict[str, Dict[str, float]], Dict[str, float]]:
    """Every statistic of a logging step, brought to the host in one transfer, and the quantities derived there.

    Args:
        sites: the residual sites (their probe rows become the previous ones afterwards).
        grads, update, weight: [`ParameterGroups.squares`][stability_toolbox.quantities.ParameterGroups.squares].
        attn_max: ``{attention module: largest scaled logit}`` (`stability_toolbox.attention_stats`).
        loss: the interval's loss sum, maximum and count; log_z: the logits' log Z sum, sum of squares, count.
        range_dtype: the dtype ``act_frac`` compares with (None: each activation's own).
        history: the earlier records (``loss_spike`` compares with their losses).
        attn_entropy: ``{attention module: mean softmax entropy}``
            (`stability_toolbox.leading_signals.attention_entropy`), or None.

    Returns:
        ``({quantity: {row: value}}, {model quantity: value})``; a fallback site's second reading is in the
        rows of ``_beta_pre`` / ``_pre_vote`` until [`resolve_fallback`][stability_toolbox.quantities.resolve_fallback].
    """
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

    for site in sites:
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
    for name, v in attn_max.items():
        put("attn_logit_max", name, v)
    for name, v in (attn_entropy or {}).items():
        put("attn_entropy", name, v)
    if update:  # the whole model's update over its weights: ||W' - W|| / ||W||
        put("update_rms", "(model)", (torch.stack(list(update.values())).sum()
                                      / torch.stack(list(weight.values())).sum().clamp_min(1e-30)).sqrt())
    loss_sum, loss_max, loss_n = loss
    if loss_n:
        put("loss", "(model)", loss_sum / loss_n)
        put("loss_max", "(model)", loss_max)
    if log_z is not None:
        put("log_z", "(model)", log_z[0] / log_z[2])
        put("log_z_rms", "(model)", (log_z[1] / log_z[2]).sqrt())
    host = torch.stack([v.cpu() for v in values]).tolist() if values else []
    # ---- host side
    quantities: Dict[str, Dict[str, float]] = {q: {} for q in QUANTITIES}
    model_q: Dict[str, float] = {}
    for (q, row), v in zip(keys, host):
        if q in ("loss", "loss_max", "log_z", "log_z_rms", "update_rms"):
            model_q[q] = v
        else:
            quantities.setdefault(q, {})[row] = v
    # each layer's gradient against the largest layer gradient (the embeddings etc. excluded)
    layer_grads = {r: v for r, v in quantities["grad_norm"].items() if r != OTHER_ROW}
    top = max((v for v in layer_grads.values() if math.isfinite(v)), default=0.0)
    if top > 0:
        quantities["grad_ratio"] = {r: v / top for r, v in layer_grads.items()}
    dtypes = {s.name: s.dtype for s in sites}
    for row, amax in quantities["act_max"].items():
        dt = range_dtype or dtypes.get(row) or torch.float32
        quantities["act_frac"][row] = amax / torch.finfo(dt).max
    for site in sites:
        if site.probe is not None:
            site.prev_probe = site.probe
    if "loss_max" in model_q:
        earlier = [h["loss"] for h in history[-10:] if h.get("loss") is not None and math.isfinite(h["loss"])]
        if earlier:
            model_q["loss_spike"] = model_q["loss_max"] / max(statistics.median(earlier), 1e-30)
    return quantities, model_q


def resolve_fallback(quantities: Dict[str, Dict[str, float]], mode: str) -> str:
    """Settle the fallback sites' reading: pops the ``_beta_pre`` / ``_pre_vote`` rows of ``quantities`` and,
    under ``'pre_ln'``, puts the Pre-LN reading into ``beta``. ``mode`` ``'auto'`` is decided here once, on the
    first logged step (the reading that leaves the smaller branch); returns the mode now in force."""
    votes = quantities.pop("_pre_vote", {})
    alt = quantities.pop("_beta_pre", {})
    if not votes:
        return mode
    if mode == "auto":
        pre = sum(v > 0.5 for v in votes.values())
        mode = "pre_ln" if pre > len(votes) / 2 else "post_ln"
    if mode == "pre_ln":
        quantities["beta"].update(alt)
    return mode
