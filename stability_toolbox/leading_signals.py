"""Per-update scalars that may lead an instability, recorded on the device at every update.

The monitor's per-layer quantities (`stability_toolbox.quantities`) are read every ``k`` updates; the
signals here are cheap enough to keep at **every** update, so a warning's lead time is known to one
update. [`UpdateSignals`][stability_toolbox.leading_signals.UpdateSignals] computes them on the device,
stacks one row per update and brings every row to the host in one transfer when
[`read`][stability_toolbox.leading_signals.UpdateSignals.read] is called (no host-device sync per update).

The signals (``SIGNALS``), each a formula of the update's tensors (``N``: the number of trainable
parameter entries; ``g``: the gradient before the optimizer step; ``W`` / ``W'``: the weights before /
after it; ``L`` the layer parameter groups of `stability_toolbox.sites.SitePlan`):

* ``loss``: the loss passed in (nats);
* ``grad_norm``: ``||g||_2`` over every parameter (OLMo 2's gradient-norm spikes are read from it);
* ``grad_rms_eps``: ``sqrt(sum g^2 / N) / eps``, the gradient's RMS in units of Adam's epsilon
  (Wortsman et al. 2023: when it nears 1, Adam's updates shrink); ``grad_rms_eps_min``: the same per
  layer group, the smallest;
* ``grad_ratio_min``: ``min_l ||g_l|| / max_l ||g_l||`` over the layer groups (vanishing gradients);
* ``update_ratio``: ``||W' - W||_2 / ||W||_2`` over every parameter (update RMS over parameter RMS);
* ``log_z_mean``, ``log_z_rms``: the mean and root mean square over positions of ``logsumexp(logits)``
  of the output logits (output-logit divergence; only with ``observe_logits``);
* ``attn_logit_max``: the largest ``|q.k|/sqrt(d_head)`` over the attention modules;
  ``attn_entropy_min``: the smallest, over the attention modules, of the mean over batch, heads and
  queries of the softmax entropy ``-sum_j p_j log p_j`` (nats) of ``q.k/sqrt(d_head)`` (masks not applied,
  as ``attn_logit_max``; Zhai et al. 2023: entropy collapse goes with an oscillating loss);
* ``linear_rms_max``: the largest, over the ``nn.Linear`` modules, of the RMS of its output; the RMS of
  every linear output is kept too (``linear_rms``, one column per linear; Rybakov et al. 2024: each
  linear's output norm grows step by step before divergence); ``linear_rms_gmean``: their geometric mean
  ``exp(mean_l log RMS_l)`` (all of them growing moves it);
* ``act_kurtosis_max``: the largest, over the layer groups, of the excess kurtosis
  ``E[(x - mu)^4] / sigma^4 - 3`` of the layer's output (the signal ``trainscope`` reads);
* ``adam_v_rms``, ``adam_v_max``: ``sqrt(mean v)`` and ``sqrt(max v)`` of Adam's second moment ``v``
  (``exp_avg_sq``) over every parameter, after the step (BLOOM's engineers read its growth).

The formulas are also functions (`grad_rms_over_eps`, `update_ratio`, `attention_entropy`,
`excess_kurtosis`, `second_moment_stats`), each tested against the computation written out.

Examples:
    >>> import torch
    >>> from admin_torch import make_stack
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> model = make_stack("pre_ln", depth=2, dim=16, heads=2, seed=0)
    >>> opt = torch.optim.AdamW(model.parameters(), 1e-3)
    >>> sig = UpdateSignals(model, opt)
    >>> for _ in range(3):
    ...     y = model(torch.randn(2, 5, 16))
    ...     loss = y.pow(2).mean()
    ...     loss.backward()
    ...     sig.after_backward()
    ...     opt.step()
    ...     sig.after_step(loss)
    ...     opt.zero_grad()
    >>> out = sig.read()
    >>> len(out["loss"]), out["grad_ratio_min"][0] <= 1.0
    (3, True)
    >>> sig.remove()
"""

import math
import numbers
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from toolbox_core import checks

from .attention_stats import AttentionLogits
from .inert_hooks import wrap_hooks
from .quantities import OTHER_ROW, Recorder
from . import scalar_reader
from .scalar_reader import as_scalar
from .sites import SitePlan
from .tensor_norms import norm_list, squared_norms

__all__ = ["SIGNALS", "MONITOR_SIGNALS", "UpdateSignals", "UpdateStream", "LayerGradients", "EntropyLogits",
           "grad_rms_over_eps", "update_ratio",
           "attention_entropy", "excess_kurtosis", "second_moment_stats"]

#: the per-update scalars, in the order of a row
SIGNALS = ("loss", "grad_norm", "grad_rms_eps", "grad_rms_eps_min", "grad_ratio_min", "update_ratio", "log_z_mean",
           "log_z_rms", "attn_logit_max", "attn_entropy_min", "linear_rms_max", "linear_rms_gmean", "act_kurtosis_max",
           "adam_v_rms", "adam_v_max")

#: the per-update scalars `stability_toolbox.StabilityMonitor` can compute at every update: the signals its
#: ``signal_rules`` may read (run at every update) and, with ``per_update=True``, its records keep (``record["updates"]``)
MONITOR_SIGNALS = ("loss", "grad_norm", "grad_rms_eps_min", "log_z_rms")


def grad_rms_over_eps(grads: Sequence[Tensor], eps: float) -> Tensor:
    """``sqrt(sum_i g_i^2 / N) / eps`` over every entry of ``grads`` (a device scalar).

    Examples:
        >>> float(grad_rms_over_eps([torch.full((4,), 1e-8)], 1e-8))
        1.0
    """
    if not grads:
        raise ValueError("grads must hold at least one tensor")
    eps = checks.as_real("eps", eps, low=0.0, low_open=True)
    sq = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
    n = sum(g.numel() for g in grads)
    return (sq / max(n, 1)).sqrt() / eps


def update_ratio(before: Sequence[Tensor], after: Sequence[Tensor]) -> Tensor:
    """``||W' - W||_2 / ||W||_2`` over all tensors (``before``: W, ``after``: W'), a device scalar.

    Examples:
        >>> float(update_ratio([torch.ones(4)], [torch.full((4,), 1.5)]))
        0.5
    """
    if len(before) != len(after) or not before:  # zip would silently drop the tensors past the shorter list
        raise ValueError(f"before and after must hold the same number (>= 1) of tensors, got {len(before)} and "
                         f"{len(after)}")
    for i, (b, a) in enumerate(zip(before, after)):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            raise TypeError(f"before[{i}] and after[{i}] must be tensors, got {type(b).__name__} and "
                            f"{type(a).__name__}")
        if a.shape != b.shape:
            raise ValueError(f"after[{i}] must have the shape of before[{i}] {tuple(b.shape)}, got {tuple(a.shape)}")
    num = torch.stack([(a.detach().float() - b.detach().float()).pow(2).sum() for a, b in zip(after, before)]).sum()
    den = torch.stack([b.detach().float().pow(2).sum() for b in before]).sum()
    return (num / den.clamp_min(1e-30)).sqrt()


def attention_entropy(q: Tensor, k: Tensor, n_heads: int) -> Tensor:
    """Mean softmax entropy (nats) of ``q.k/sqrt(d_head)`` over batch, heads and queries.

    Args:
        q, k: ``(batch, time, dim)`` queries and keys (batch first), ``dim`` divisible by ``n_heads``.

    Examples:
        >>> q = torch.zeros(1, 3, 4); k = torch.randn(1, 5, 4)
        >>> round(float(attention_entropy(q, k, 2)), 4) == round(math.log(5), 4)   # uniform over 5 keys
        True
    """
    n_heads = checks.as_int("n_heads", n_heads, minimum=1)
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and q.dim() == 3 and k.dim() == 3):
        raise TypeError("q and k must be 3-D tensors (batch, time, dim)")
    b, tq, d = q.shape
    if k.shape[0] != b or k.shape[2] != d or d % n_heads:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and dim, with dim divisible by "
                         f"n_heads={n_heads}")
    dh = d // n_heads
    qh = q.reshape(b, tq, n_heads, dh).transpose(1, 2).float()
    kh = k.reshape(b, k.shape[1], n_heads, dh).transpose(1, 2).float()
    logp = torch.log_softmax(qh @ kh.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def excess_kurtosis(x: Tensor) -> Tensor:
    """``E[(x - mu)^4] / sigma^4 - 3`` over every entry of ``x`` (population moments; 0 for a constant).

    Examples:
        >>> float(excess_kurtosis(torch.tensor([-1.0, 1.0])))    # two points: 1 - 3
        -2.0
    """
    x = x.detach().float().reshape(-1)
    c = x - x.mean()
    var = c.pow(2).mean()
    return torch.where(var > 0, c.pow(4).mean() / var.clamp_min(1e-30).pow(2) - 3.0, torch.zeros_like(var))


def second_moment_stats(optimizer: torch.optim.Optimizer) -> Optional[Tensor]:
    """``stack([sqrt(mean v), sqrt(max v)])`` of Adam's ``exp_avg_sq`` over every parameter, or None
    (no such state yet).

    Examples:
        >>> p = nn.Parameter(torch.zeros(2)); opt = torch.optim.Adam([p], 0.1, betas=(0.9, 0.5))
        >>> p.grad = torch.tensor([2.0, 4.0]); opt.step()
        >>> second_moment_stats(opt).tolist()     # v = 0.5 * g^2 = [2, 8]: sqrt(5), sqrt(8)
        [2.2360680103302, 2.8284270763397217]
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    # an empty parameter's moment has no entries (amax of it would raise): it adds nothing to either statistic
    vs = [s["exp_avg_sq"] for s in optimizer.state.values()
          if isinstance(s.get("exp_avg_sq"), Tensor) and s["exp_avg_sq"].numel()]
    if not vs:
        return None
    total = torch.stack([v.float().sum() for v in vs]).sum() / sum(v.numel() for v in vs)
    top = torch.stack([v.float().amax() for v in vs]).amax()
    return torch.stack([total.sqrt(), top.sqrt()])


class EntropyLogits(AttentionLogits):
    """`AttentionLogits` that also keeps each module's mean attention entropy (`attention_entropy`; the
    smallest over the calls it sees) in ``entropy``: ``{module name: device scalar}``."""

    def __init__(self, modules, recorder):
        super().__init__(modules, recorder)
        self.entropy: Dict[str, Tensor] = {}

    def clear(self) -> None:
        super().clear()
        self.entropy = {}

    def _record(self, name, logits):
        # AttentionLogits' logit maximum and the entropy from one q.k product (a logged step pays once)
        super()._record(name, logits)
        logp = torch.log_softmax(logits, dim=-1)
        e = -(logp.exp() * logp).sum(-1).mean()
        old = self.entropy.get(name)
        self.entropy[name] = e if old is None else torch.minimum(old, e)


class UpdateSignals:
    """Records `SIGNALS` at every update (device tensors; one transfer at `read`).

    Call `after_backward` once the gradients are final (after unscaling/clipping, before the
    optimizer step), `observe_logits` with the output logits of the update's forward pass (optional),
    then `after_step` with the loss after the optimizer step. The hooks (attention, linear outputs,
    layer outputs) stay on the model until `remove`; a deep copy (an EMA copy) or a pickled copy of the model
    carries them inert (`stability_toolbox.hooks`).

    Args:
        model: the model (its layer groups and attention modules come from `SitePlan`).
        optimizer: the optimizer (its ``eps`` and, for Adam-like ones, ``exp_avg_sq``).
        eps: the epsilon ``grad_rms_eps`` is measured in (default: the optimizer's first group's
            ``eps``, else 1e-8).
        activations: record the attention, linear-output and kurtosis signals (forward hooks); False
            records the gradient, update, logit and optimizer signals only.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``optimizer`` not an optimizer.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, eps: Optional[float] = None,
                 activations: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if eps is None:  # an optimizer without a positive float eps (SGD, the sign optimizers, Adafactor): 1e-8
            eps = optimizer.param_groups[0].get("eps", 1e-8) if optimizer.param_groups else 1e-8
            eps = eps if isinstance(eps, float) and 0 < eps < math.inf else 1e-8
        eps = checks.as_real("eps", eps, low=0.0, low_open=True)
        activations = checks.as_bool("activations", activations)
        self.model, self.optimizer, self.eps = model, optimizer, eps
        plan = SitePlan(model)
        self.params: List[nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
        index = {id(p): i for i, p in enumerate(self.params)}
        layer_rows = [(row, ps) for row, ps in plan.groups if row != OTHER_ROW]
        self.layers = [row for row, _ in layer_rows]
        gid = torch.full((len(self.params),), len(layer_rows), dtype=torch.long)
        numel = torch.zeros(len(layer_rows) + 1)
        for g, (_, ps) in enumerate(layer_rows):
            for _, p in ps:
                if id(p) in index:
                    gid[index[id(p)]] = g
                    numel[g] += p.numel()
        device = self.params[0].device if self.params else torch.device("cpu")
        self._gid, self._numel = gid.to(device), numel.to(device)
        self._before = [p.detach().clone() for p in self.params]
        self._rows: List[Tensor] = []
        self._present: List[tuple] = []  # per update: which signals were measured (the others read as None)
        self._linear_rows: List[Tensor] = []
        self._linear_present: List[tuple] = []
        self._handles: List[Any] = []
        self._pending: Dict[str, Tensor] = {}
        self.linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] if activations else []
        self._lin: Dict[int, Tensor] = {}
        self._kurt: Dict[int, Tensor] = {}
        self._attn = EntropyLogits(plan.attention, Recorder(1)) if activations else None
        if activations:
            self._attn.arm(self._handles)
            for i, name in enumerate(self.linears):
                self._handles.append(model.get_submodule(name).register_forward_hook(
                    lambda _m, _a, out, i=i: self._lin.__setitem__(i, out.detach().float().pow(2).mean().sqrt())))
            for i, row in enumerate(self.layers):
                try:
                    layer = model.get_submodule(row)
                except AttributeError:
                    continue
                self._handles.append(layer.register_forward_hook(lambda _m, _a, out, i=i: self._kurtosis(i, out)))
            # a deep copy of the model (an EMA copy) or a pickled one (torch.save(model)) carries inert hooks: the
            # copy pickles and its forward passes never report into this update
            wrap_hooks(self._handles)

    def _kurtosis(self, i: int, out) -> None:
        t = out if isinstance(out, Tensor) else (out[0] if isinstance(out, (tuple, list)) and out and
                                                  isinstance(out[0], Tensor) else None)
        if t is not None and t.is_floating_point() and t.numel() > 1:
            self._kurt[i] = excess_kurtosis(t)

    def begin_update(self) -> None:
        """Forget what the hooks saw since the last update (e.g. another forward pass, a probe batch):
        call it before the update's forward pass when other passes run between updates."""
        self._lin, self._kurt = {}, {}
        if self._attn is not None:
            self._attn.clear()

    def observe_logits(self, logits: Tensor) -> None:
        """The output logits ``(..., vocabulary)`` of this update's forward pass (for ``log_z_*``)."""
        if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1 or not logits.numel():
            raise TypeError("logits must be a non-empty floating tensor (..., vocabulary)")
        with torch.no_grad():
            lz = logits.detach().float().logsumexp(-1).reshape(-1)
            self._pending["log_z_mean"] = lz.mean()
            self._pending["log_z_rms"] = lz.pow(2).mean().sqrt()

    @torch.no_grad()
    def after_backward(self) -> None:
        """Read the gradients (before the optimizer step) and keep the weights the step will change."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if not grads:
            return
        # the norms in float32: a float16 gradient's norm past 65504 would be inf (a false non-finite signal)
        sq = squared_norms(grads)
        per = torch.zeros_like(self._numel).index_add_(0, self._gid, sq)
        total = sq.sum()
        n_all = sum(p.numel() for p in self.params)
        self._pending["grad_norm"] = total.sqrt()
        self._pending["grad_rms_eps"] = (total / n_all).sqrt() / self.eps
        if self.layers:
            lay, lay_n = per[:-1], self._numel[:-1].clamp_min(1)
            self._pending["grad_rms_eps_min"] = (lay / lay_n).sqrt().amin() / self.eps
            self._pending["grad_ratio_min"] = (lay.amin() / lay.amax().clamp_min(1e-30)).sqrt()
        torch._foreach_copy_(self._before, [p.detach() for p in self.params])

    @torch.no_grad()
    def after_step(self, loss: Any = None) -> None:
        """Close the update: the update ratio, Adam's second moment, the forward-pass signals, the ``loss``
        (a tensor, its mean; a number; None or an empty tensor: no loss). TypeError for another ``loss``,
        with nothing changed."""
        if loss is not None and not isinstance(loss, Tensor) and (isinstance(loss, bool) or
                                                                   not isinstance(loss, numbers.Real)):
            raise TypeError(f"loss must be a tensor, a real number or None, got {type(loss).__name__}")
        if isinstance(loss, Tensor) and (loss.is_meta or loss.is_complex() or loss.dtype == torch.bool):
            # checked before the update is closed: a meta loss failed at the end, with the row half written
            raise TypeError(f"loss must be a real tensor with data, got dtype {loss.dtype} on {loss.device}")
        p = self._pending
        nan = torch.tensor(float("nan"), device=self._numel.device)
        if "grad_norm" in p:
            p["update_ratio"] = update_ratio(self._before, [q.detach() for q in self.params])
        v = second_moment_stats(self.optimizer)
        if v is not None:
            p["adam_v_rms"], p["adam_v_max"] = v[0], v[1]
        if self._attn is not None:
            maxima = [t for t in self._attn.maxima.values() if t is not None]
            if maxima:
                p["attn_logit_max"] = torch.stack(maxima).amax()
            if self._attn.entropy:
                p["attn_entropy_min"] = torch.stack(list(self._attn.entropy.values())).amin()
            self._attn.clear()
        if self.linears:  # one row per update (NaN: that linear did not run), so rows stay aligned with updates
            lin = torch.stack([self._lin.get(i, nan) for i in range(len(self.linears))])
            if self._lin:
                p["linear_rms_max"] = lin.nan_to_num(nan=0.0).amax()
                p["linear_rms_gmean"] = lin.clamp_min(1e-30).log().nanmean().exp()
            self._linear_rows.append(lin)
            self._linear_present.append(tuple(i in self._lin for i in range(len(self.linears))))
            self._lin = {}
        if self._kurt:
            p["act_kurtosis_max"] = torch.stack(list(self._kurt.values())).amax()
            self._kurt = {}
        if isinstance(loss, Tensor):
            if loss.numel():  # an empty loss is no loss (its mean would be a made-up NaN)
                p["loss"] = loss.detach().float().reshape(-1).mean()
        elif isinstance(loss, numbers.Real) and not isinstance(loss, bool):
            p["loss"] = as_scalar(loss)  # (an int beyond a float: inf, not an OverflowError half-way)
        self._rows.append(torch.stack([p[s].to(nan.device).float().reshape(()) if s in p else nan
                                       for s in SIGNALS]))
        self._present.append(tuple(s in p for s in SIGNALS))
        self._pending = {}

    def read(self) -> Dict[str, List]:
        """``{signal: [value per update]}`` (None where a signal was not measured at that update; NaN is a
        measured non-finite value), plus ``linear_rms``: ``[[RMS per linear] per update]`` (None: that linear
        did not run) and ``linears``: their names. One device-to-host transfer."""
        rows = torch.stack(self._rows).cpu().tolist() if self._rows else []
        out: Dict[str, List] = {s: [r[i] if ok[i] else None for r, ok in zip(rows, self._present)]
                                for i, s in enumerate(SIGNALS)}
        lin = torch.stack(self._linear_rows).cpu().tolist() if self._linear_rows else []
        out["linear_rms"] = [[x if ok else None for x, ok in zip(row, present)]
                             for row, present in zip(lin, self._linear_present)]
        out["linears"] = list(self.linears)
        return out

    def remove(self) -> None:
        """Remove every hook from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []


class UpdateStream:
    """Per-update device scalars kept until the next read: what the monitor records between its logging steps.

    ``put(name, value)`` sets a scalar of the current update (a tensor stays on its device); ``end(step)``
    closes the update; ``read()`` returns ``{"update": [step, ...], name: [value, ...]}`` for the updates
    closed since the last read (None where a name had no value at that update: a NaN is a measured value,
    which a `stability_toolbox.signal_detector.SignalRule` fires on) in one device-to-host transfer, and
    forgets them.

    Examples:
        >>> s = UpdateStream()
        >>> s.put("loss", torch.tensor(2.0)); s.end(0)
        >>> s.put("loss", torch.tensor(1.5)); s.put("grad_norm", torch.tensor(3.0)); s.end(1)
        >>> out = s.read()
        >>> out["update"], out["loss"], out["grad_norm"]
        ([0, 1], [2.0, 1.5], [None, 3.0])
    """

    def __init__(self):
        self._current: Dict[str, Tensor] = {}
        self._rows: List[Dict[str, Tensor]] = []
        self._steps: List[int] = []

    def put(self, name: str, value: Tensor) -> None:
        """Set ``name`` of the current update to ``value`` (a one-element real tensor, no transfer; or a real
        number). TypeError for another name or value, with nothing changed."""
        if not isinstance(name, str) or not name or name == "update":
            raise TypeError(f"name must be a non-empty str other than 'update', got {name!r}")
        self._current[name] = as_scalar(value)

    def end(self, step: int) -> None:
        """Close the current update as update ``step`` (an integer >= 0; nothing is kept for an update
        without a value)."""
        step = checks.as_int("step", step, minimum=0)
        if self._current:
            self._rows.append(self._current)
            self._steps.append(step)
        self._current = {}

    def clear(self) -> None:
        """Forget the current update's values (a failed step)."""
        self._current = {}

    def read(self) -> Dict[str, List]:
        """The closed updates' values, one transfer; they are forgotten."""
        names = sorted({k for r in self._rows for k in r})
        out: Dict[str, List] = {"update": list(self._steps)}
        if names:
            dev = next(iter(self._rows[0].values())).device
            nan = torch.tensor(float("nan"), device=dev)
            table = torch.stack([torch.stack([r.get(k, nan).to(dev) for k in names]) for r in self._rows]).cpu()
            for i, k in enumerate(names):  # an absent value is None, not the NaN that filled the table
                out[k] = [v if k in r else None for v, r in zip(table[:, i].tolist(), self._rows)]
        self._rows, self._steps = [], []
        return out


class LayerGradients:
    """Per update, from one fused norm over the gradients: ``grad_norm`` (``||g||_2`` over every parameter) and
    ``grad_rms_eps_min`` (the smallest, over the layer groups, of ``sqrt(sum g_l^2 / N_l) / eps``), as device
    scalars (no sync), in float32 whatever the gradients' dtype; for CPU gradients, whose norms are host memory
    already, as Python floats (the sums over the norms in float64 Python floats: no op dispatched per update; a
    result beyond float32's range is inf, as the device path's float32 one). A parameter without a gradient at a
    step (not used by that forward pass) is left out of both: the norm and each layer's RMS are over the
    parameters that have one (a layer with none is left out of the minimum).

    Args:
        groups: ``[(row, [(name, parameter)])]`` (`stability_toolbox.sites.SitePlan.groups`; the row
            ``(other)`` is no layer).
        model_norm: also ``grad_norm`` over every parameter; False reads the layer groups' gradients only
            (``grad_rms_eps_min`` alone: the embeddings and output head, often the largest tensors of an
            LM, are not read).

    Examples:
        >>> a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(1))
        >>> a.grad, b.grad = torch.full((4,), 3e-8), torch.tensor([4e-8])
        >>> out = LayerGradients([("l0", [("a", a)]), ("l1", [("b", b)])])(1e-8)
        >>> round(float(out["grad_norm"]) * 1e8, 4), round(float(out["grad_rms_eps_min"]), 4)
        (7.2111, 3.0)
    """

    def __init__(self, groups, model_norm: bool = True):
        self.model_norm = checks.as_bool("model_norm", model_norm)
        if not self.model_norm:  # the layer rows only: the other row's gradients are never read
            groups = [(row, ps) for row, ps in groups if row != OTHER_ROW]
        self.params = [p for _, ps in groups for _, p in ps]
        layer_rows = [row for row, _ in groups if row != OTHER_ROW]
        self.n_layers = len(layer_rows)
        gid = []
        index = {row: i for i, row in enumerate(layer_rows)}
        for row, ps in groups:
            gid += [index.get(row, self.n_layers)] * len(ps)
        self._gid, self._gid_list = torch.tensor(gid, dtype=torch.long), gid
        self._sizes = torch.tensor([float(p.numel()) for p in self.params], dtype=torch.float64)
        # (device, which parameters have a gradient) -> (gid, numel, any layer) there: built once per pattern
        self._on: Dict[Any, tuple] = {}

    def _pattern(self, dev: torch.device, present: tuple) -> tuple:
        """The layer index and entry count of the parameters with a gradient (``present``), on ``dev``:
        ``(gid, numel, any layer)``, built once per pattern."""
        host = scalar_reader.host_memory(dev)
        key = (dev, host, present)
        if key not in self._on:
            if len(self._on) >= 16:  # bounded: a model whose unused parameters change every step (MoE)
                self._on.clear()
            keep = [i for i, ok in enumerate(present) if ok]
            numel = torch.zeros(self.n_layers + 1, dtype=torch.float64)
            gid = self._gid[keep]
            numel.index_add_(0, gid, self._sizes[keep])
            any_layer = any(self._gid_list[i] < self.n_layers for i in keep)  # host lists: no tensor read
            if host:  # plain lists: the host reduction (`_host`)
                self._on[key] = (gid.tolist(), numel.tolist(), any_layer)
            else:
                self._on[key] = (gid.to(dev), numel.float().to(dev), any_layer)
        return self._on[key]

    def __call__(self, eps: float) -> Dict[str, Any]:
        grads = [p.grad for p in self.params]
        present = tuple(g is not None for g in grads)
        if not any(present):
            return {}
        with torch.no_grad():
            norms = norm_list([g for g in grads if g is not None])
            dev = norms[0].device
            if scalar_reader.host_memory(dev):
                return self._host([n.item() for n in norms], self._pattern(dev, present), eps)
            # the squares in float64 where the device has it: a norm past 1.8e19 squared overflows float32 (a false
            # non-finite signal); the results are float32 again
            wide = torch.float32 if dev.type == "mps" else torch.float64
            sq = torch.stack([n.to(wide) for n in norms]).pow(2)
            gid, numel, any_layer = self._pattern(dev, present)
            out = {"grad_norm": sq.sum().sqrt().float()} if self.model_norm else {}
            if any_layer:
                per = torch.zeros(self.n_layers + 1, device=dev, dtype=wide).index_add_(0, gid, sq)
                rms = (per[:-1] / numel[:-1].to(wide).clamp_min(1)).sqrt()
                # a layer none of whose parameters has a gradient is no layer at this step
                low = torch.where(numel[:-1] > 0, rms, torch.full_like(rms, math.inf)).amin()
                out["grad_rms_eps_min"] = (low / eps).float()
        return out

    def _host(self, norms: List[float], pattern: tuple, eps: float) -> Dict[str, float]:
        # CPU gradients: their norms are host memory already, so the sums over them run in plain Python floats
        # (float64). Right after a backward every torch or NumPy call here costs 10-40 us of cold caches: with
        # the torch ops of the device path this was 0.6 ms a step on the overhead benchmark's model, now 0.1 ms
        gid, numel, any_layer = pattern
        per = [0.0] * (self.n_layers + 1)
        for i, v in zip(gid, norms):
            per[i] += v * v
        out = {"grad_norm": _float32_range(math.sqrt(sum(per)))} if self.model_norm else {}
        if any_layer:
            # a layer none of whose parameters has a gradient (or an entry) is no layer at this step
            rms = [math.sqrt(per[i] / numel[i]) for i in range(self.n_layers) if numel[i] > 0]
            # a NaN is the answer, as torch's amin gives it (Python's min would depend on where it stands)
            low = math.inf if not rms else (math.nan if any(r != r for r in rms) else min(rms))
            out["grad_rms_eps_min"] = _float32_range(low / eps)
        return out


#: the smallest magnitude float32 rounds to inf (``2**128 - 2**103``: FLT_MAX and half its last place)
_F32_OVERFLOW = 2.0 ** 128 - 2.0 ** 103


def _float32_range(v: float) -> float:
    """``v`` (>= 0 or NaN), inf where float32 would overflow: the host path's results as the device path's float32
    ones (a norm of 4e38 from two finite float32 norms is inf there; finite here, the per-update rules would read
    a finite value on a CPU and a non-finite one on a GPU, and the record, kept in float32, inf)."""
    return math.inf if v >= _F32_OVERFLOW else v
