"""The attention-logit statistic: the largest ``|q . k| / sqrt(d_head)`` of each attention module.

On a logging step, [`AttentionLogits`][stability_toolbox.attention_stats.AttentionLogits] recomputes the
scaled logits of every attention module [`SitePlan`][stability_toolbox.sites.SitePlan] found, from the
module's own query/key projections (no grad, on the device), and keeps their largest magnitude over the step:

* torch.nn ``MultiheadAttention``: its packed (or separate) projection weights, applied to the
  ``query`` / ``key`` arguments;
* fairseq's ``MultiheadAttention``: it hands ``q_proj.weight`` to ``F.multi_head_attention_forward``
  without calling ``q_proj``, so ``q_proj`` / ``k_proj`` are applied to the module's inputs (time-first);
* modules with ``q_proj`` / ``k_proj`` (BART, Marian, our reference stacks) or ``query`` / ``key`` (BERT,
  RoBERTa): the projections' outputs, read by forward hooks.

With qk-layernorm (``q_norm`` / ``k_norm``) the logits are those of the normalised q and k. Masks and
position biases are not applied, so the value is an upper bound of the softmax's input.
"""

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .quantities import Recorder, running_max
from .sites import heads, qk_normed

__all__ = ["AttentionLogits"]


# each style (`stability_toolbox.sites.attention_style`) -> the query and key projections its hooks read
_PROJECTIONS = {"torch_mha": None, "fairseq": ("q_proj", "k_proj"), "batch_first": ("q_proj", "k_proj"),
                "hf_bert": ("query", "key")}


def _fits_style(entry: Any) -> bool:
    """Whether ``entry`` is a ``(name, module, style)`` whose module has what the style's hooks read."""
    if not (isinstance(entry, tuple) and len(entry) == 3 and isinstance(entry[0], str)
            and isinstance(entry[1], nn.Module) and entry[2] in _PROJECTIONS):
        return False
    _, module, style = entry
    if style == "torch_mha":
        return isinstance(module, nn.MultiheadAttention)
    return all(isinstance(getattr(module, attr, None), nn.Module) for attr in _PROJECTIONS[style])


class AttentionLogits:
    """The largest scaled attention logit of each module, over one logging step (device tensors).

    Args:
        modules: ``[(name, module, style)]`` ([`SitePlan.attention`][stability_toolbox.sites.SitePlan]).
        recorder: the monitor's recorder: logits are kept on the training pass only.
    """

    def __init__(self, modules: List[Tuple[str, nn.Module, str]], recorder: Recorder):
        if not isinstance(modules, (list, tuple)) or not all(_fits_style(entry) for entry in modules):
            raise TypeError(f"modules must be a list of (name, module, style), style one of {list(_PROJECTIONS)} "
                            f"and the module an attention module of that style (SitePlan.attention), got {modules!r}")
        self.modules = modules
        self.recorder = recorder
        #: ``{module name: largest |q.k|/sqrt(d_head)}`` of the step (None: not called yet)
        self.maxima: Dict[str, Optional[Tensor]] = {}

    def clear(self) -> None:
        """Forget the step's maxima."""
        self.maxima = {}

    def arm(self, handles: List[Any]) -> None:
        """Install the hooks that read each module's query and key, appending their handles to ``handles``
        (as they go in: a failure leaves none that the caller cannot remove)."""
        for name, module, style in self.modules:
            self.maxima.setdefault(name, None)
            if style == "torch_mha":
                handles.append(module.register_forward_pre_hook(
                    lambda m, a, k, name=name: self._mha_logits(name, m, a, k), with_kwargs=True))
            elif style == "fairseq":
                # fairseq's attention hands q_proj.weight to F.multi_head_attention_forward without
                # calling q_proj: project the query and key from the module's inputs instead
                handles.append(module.register_forward_pre_hook(
                    lambda m, a, k, name=name: self._fairseq_logits(name, m, a, k), with_kwargs=True))
            else:
                q_name, k_name = ("query", "key") if style == "hf_bert" else ("q_proj", "k_proj")
                if qk_normed(module):  # qk-layernorm: the logits are those of the normalised q and k
                    q_name, k_name = "q_norm", "k_norm"
                slot: Dict[str, Tensor] = {}

                def proj_hook(_m, _a, out, which, name=name, module=module, style=style, slot=slot):
                    slot[which] = out
                    if "q" in slot and "k" in slot:
                        self._proj_logits(name, module, style, slot.pop("q"), slot.pop("k"))

                handles.append(getattr(module, q_name).register_forward_hook(
                    lambda m, a, o, h=proj_hook: h(m, a, o, "q")))
                handles.append(getattr(module, k_name).register_forward_hook(
                    lambda m, a, o, h=proj_hook: h(m, a, o, "k")))

    def _training_pass(self) -> bool:
        # the logits are kept on the training pass only: on the probe pass (and on another monitor's) the
        # projections are not recomputed at all (a logged step would pay two matmuls per module for nothing)
        return self.recorder.phase == "train" and not self.recorder.foreign

    def _mha_logits(self, name: str, m: nn.MultiheadAttention, args, kwargs) -> None:
        if not self._training_pass():
            return
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
            if query.shape[-1] != wq.shape[1] or key.shape[-1] != wk.shape[1]:
                return  # inputs the module itself refuses: its own error is raised, not one from this hook
            bq = bk = None
            if m.in_proj_bias is not None:
                bq, bk = m.in_proj_bias[:e], m.in_proj_bias[e:2 * e]
            q = nn.functional.linear(query.detach(), wq, bq)
            k = nn.functional.linear(key.detach(), wk, bk)
            if qk_normed(m):
                q, k = m.q_norm(q), m.k_norm(k)
            self._store(name, q, k, m.num_heads, batch_first=m.batch_first)

    def _fairseq_logits(self, name: str, m: nn.Module, args, kwargs) -> None:
        if not self._training_pass():
            return
        query = args[0] if args else kwargs.get("query")
        key = args[1] if len(args) > 1 else kwargs.get("key")
        key = query if key is None else key
        if not isinstance(query, Tensor) or not isinstance(key, Tensor) or query.dim() != 3:
            return
        if query.shape[-1] != getattr(m.q_proj, "in_features", query.shape[-1]) or \
                key.shape[-1] != getattr(m.k_proj, "in_features", key.shape[-1]):
            return  # inputs the module itself refuses: its own error is raised, not one from this hook
        with torch.no_grad():
            q, k = m.q_proj(query.detach()), m.k_proj(key.detach())
            if qk_normed(m):
                q, k = m.q_norm(q), m.k_norm(k)
            self._store(name, q, k, m.num_heads, batch_first=False)

    def _proj_logits(self, name: str, module: nn.Module, style: str, q: Tensor, k: Tensor) -> None:
        n_heads = heads(module)
        if n_heads is None or q.dim() != 3 or k.dim() != 3:
            return
        with torch.no_grad():
            self._store(name, q.detach(), k.detach(), n_heads, batch_first=(style != "fairseq"))

    def _store(self, name: str, q: Tensor, k: Tensor, n_heads: int, batch_first: bool) -> None:
        if not self._training_pass():
            return
        logits = scaled_logits(q, k, n_heads, batch_first)
        if logits is not None and logits.numel():  # an empty batch or sequence has no logit (amax of none fails)
            self._record(name, logits)

    def _record(self, name: str, logits: Tensor) -> None:
        """What is kept of one call's logits ``(batch, heads, tq, tk)``: their largest magnitude."""
        self.maxima[name] = running_max(self.maxima.get(name), logits.abs().amax())


def scaled_logits(q: Tensor, k: Tensor, n_heads: int, batch_first: bool) -> Optional[Tensor]:
    """The attention logits ``q.k / sqrt(d_head)`` per head, ``(batch, heads, tq, tk)`` in float32, from projected
    queries and keys ``(batch, t, d)`` (``(t, batch, d)`` unless ``batch_first``); None when the shapes do not
    split into ``n_heads`` heads."""
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    b, tq, d = q.shape
    if k.shape[0] != b or k.shape[2] != d or d % n_heads:
        return None
    dh = d // n_heads
    qh = q.detach().reshape(b, tq, n_heads, dh).transpose(1, 2).float()
    kh = k.detach().reshape(b, k.shape[1], n_heads, dh).transpose(1, 2).float()
    return qh @ kh.transpose(-1, -2) / math.sqrt(dh)
