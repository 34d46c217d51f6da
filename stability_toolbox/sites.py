"""Where the monitor's sites are in a model, and which module gets which hook.

A [`SitePlan`][stability_toolbox.sites.SitePlan] finds, once, when the monitor attaches: the residual
sublayers (the rows of ``beta``, ``output_change``, ``act_*``), the attention modules (``attn_logit_max``)
and the parameter groups (one per layer: ``grad_*``, ``update_ratio``). Its
[`arm`][stability_toolbox.sites.SitePlan.arm] installs the hooks that hand each residual sum ``s`` and branch
``f`` to a [`Recorder`][stability_toolbox.quantities.Recorder] on a logging step.

Where the residual sums are found (most exact first):

1. residual modules called as ``module(x, f_x)``: [`admin_torch.OmegaResidual`][admin_torch.OmegaResidual],
   [`admin_torch.DeepNormResidual`][admin_torch.DeepNormResidual], [`admin_torch.AddResidual`][admin_torch.AddResidual] (the
   reference stacks, converted torch.nn and HuggingFace models, fairseq's ``transformer_admin``);
2. the per-layer descriptions that drive [`admin_torch.convert`][admin_torch.convert] / [`admin_torch.fold`][admin_torch.fold]
   (`admin_torch.LAYER_KINDS`: torch.nn, BERT, RoBERTa, BART, Marian; fairseq's layers are
   added by `fairseq_plugins.modules.layer_kinds` through [`register_layer_kind`][stability_toolbox.register_layer_kind]), Post-LN or Pre-LN
   (``norm_first`` / ``normalize_before``): ``f = s - x`` with ``x`` the sublayer's input stream;
3. any other model: every LayerNorm/RMSNorm in call order, the shortcut of norm i being the previous
   norm's output (Post-LN) or input (Pre-LN), decided once from the first logged step (the candidate
   leaving the smaller branch, [`resolve_fallback`][stability_toolbox.quantities.resolve_fallback]) unless
   ``fallback=`` says which.

Attention modules are those whose query/key projections are known
([`attention_style`][stability_toolbox.sites.attention_style]); their logits are `stability_toolbox.attention_stats`'s.
"""

import functools
from typing import Any, List, Optional, Tuple

from torch import Tensor, nn

from admin_torch.architectures import layer_kind, register_layer_kind
from admin_torch.hooks import capture_sums
from admin_torch.stacks import as_run, resolve

from .quantities import OTHER_ROW, Recorder, Site

__all__ = ["register_layer_kind", "SitePlan", "FALLBACK_MODES", "attention_style", "heads", "qk_normed"]

_NORM_SUFFIXES = ("LayerNorm", "RMSNorm")
#: how the fallback reads the shortcut of a norm: decided from the first logged step, or given
FALLBACK_MODES = ("auto", "post_ln", "pre_ln")

# ----------------------------------------------------------------------------- layer descriptions

# one registry of layer descriptions, admin_torch's: Admin and the monitor see the same sublayers. Its
# register_layer_kind is re-exported here and as stability_toolbox.register_layer_kind.
_describe_layer = layer_kind


def _residual_types() -> Tuple[type, ...]:
    from admin_torch.deepnorm import DeepNormResidual
    from admin_torch.reference_stack import AddResidual
    from admin_torch.residual import OmegaResidual

    return (OmegaResidual, DeepNormResidual, AddResidual)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(_NORM_SUFFIXES)


def _first_tensor(value) -> Optional[Tensor]:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


# ----------------------------------------------------------------------------- attention modules

def heads(module: nn.Module) -> Optional[int]:
    """The number of attention heads of ``module`` (its own attribute, else its ``config``'s), or None."""
    for attr in ("num_heads", "heads", "num_attention_heads", "n_heads"):
        v = getattr(module, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    cfg = getattr(module, "config", None)
    v = getattr(cfg, "num_attention_heads", None)
    return v if isinstance(v, int) and v > 0 else None


def qk_normed(module: nn.Module) -> bool:
    """Whether an attention module applies qk-layernorm (``q_norm`` / ``k_norm``, `admin_torch.qk_norm`)."""
    return isinstance(getattr(module, "q_norm", None), nn.Module) and isinstance(getattr(module, "k_norm", None),
                                                                                 nn.Module)


def attention_style(module: nn.Module) -> Optional[str]:
    """How the query/key projections of an attention module are found, or None if it is not one we know.

    ``'torch_mha'``: ``nn.MultiheadAttention``'s packed or separate projection weights; ``'fairseq'``:
    fairseq's time-first ``q_proj`` / ``k_proj``; ``'batch_first'``: ``q_proj`` / ``k_proj`` of BART, Marian
    and our stacks; ``'hf_bert'``: BERT/RoBERTa's ``query`` / ``key``.
    """
    if isinstance(module, nn.MultiheadAttention):
        return "torch_mha"
    if isinstance(getattr(module, "q_proj", None), nn.Linear) and isinstance(getattr(module, "k_proj", None), nn.Linear) \
            and heads(module) is not None:
        # fairseq's MultiheadAttention is time-first; HF BART/Marian and our stacks are batch-first
        return "fairseq" if type(module).__module__.startswith("fairseq.") else "batch_first"
    if isinstance(getattr(module, "query", None), nn.Linear) and isinstance(getattr(module, "key", None), nn.Linear) \
            and heads(module) is not None:
        return "hf_bert"
    return None


# ----------------------------------------------------------------------------- the plan

class SitePlan:
    """The sites of ``model``, found once, and the hooks that read them.

    Attributes:
        residual_sites: ``[(residual module, Site)]``: sums read from the module's arguments.
        layer_plans: ``[(name, layer, LayerKind, pre_ln, [Site per sublayer])]``: sums read around the norms.
        fallback_norms: ``[(norm, Site)]``: every norm, when neither of the above found anything.
        attention: ``[(name, module, style)]`` of the attention modules
            ([`attention_style`][stability_toolbox.sites.attention_style]).
        groups: ``[(row, [(parameter name, parameter)])]``: the trainable parameters per layer, the rest
            under ``(other)``.

    Raises:
        ValueError: the model has no residual module, no known layer and no norm.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        residual_types = _residual_types()
        self.residual_sites: List[Tuple[nn.Module, Site]] = []
        self.layer_plans: List[Tuple[str, nn.Module, Any, bool, List[Site]]] = []
        covered: set = set()  # ids of modules whose norms are accounted for
        described: List[Tuple[str, nn.Module, Any]] = []
        for name, module in model.named_modules():
            if id(module) in covered:
                continue
            kind = _describe_layer(module)
            if kind is not None:
                described.append((name, module, kind))
                covered.update(id(m) for m in module.modules())
        # the sublayers that run, as Admin counts them (a causal LM's decoder layers without cross-attention)
        kinds = as_run([kind for _, _, kind in described])
        layers: List[Tuple[str, nn.Module]] = [(name, module) for name, module, _ in described]
        for (name, module, _), kind in zip(described, kinds):
            prefix = f"{name}." if name else ""
            residuals = [(n, m) for n, m in module.named_modules() if isinstance(m, residual_types)]
            if residuals:  # converted / Admin layer: its residual modules give x and f exactly
                for n, m in residuals:
                    self.residual_sites.append((m, Site(prefix + n)))
            else:
                pre = bool(getattr(module, "norm_first", False) or getattr(module, "normalize_before", False))
                sites = [Site(prefix + sub.norm) for sub in kind.sublayers]
                self.layer_plans.append((name, module, kind, pre, sites))
        for name, module in model.named_modules():
            if isinstance(module, residual_types) and id(module) not in covered:
                self.residual_sites.append((module, Site(name)))
                covered.add(id(module))
        # the fallback: norms not inside a known layer, when nothing else was found
        self.fallback_norms: List[Tuple[nn.Module, Site]] = []
        if not self.residual_sites and not self.layer_plans:
            self.fallback_norms = [(m, Site(n)) for n, m in model.named_modules() if _is_norm(m)]
            if not self.fallback_norms:
                raise ValueError("model has no residual module, no known transformer layer and no LayerNorm/RMSNorm: "
                                 "nothing to monitor")
        self._fallback_prev: Optional[Tuple[Tensor, Tensor]] = None  # the previous norm's (input, output)
        self.attention: List[Tuple[str, nn.Module, str]] = [
            (name, module, style) for name, module in model.named_modules()
            if (style := attention_style(module)) is not None]
        self.groups = self._group_parameters(model, layers)

    @staticmethod
    def _group_parameters(model: nn.Module, layers: List[Tuple[str, nn.Module]]):
        # parameter groups: the known layers, else the elements of the longest ModuleList
        if not layers:
            lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)
                     and any(True for _ in m.parameters())]
            if lists:
                n, best = max(lists, key=lambda t: len(t[1]))
                layers = [(f"{n}.{i}" if n else str(i), m) for i, m in enumerate(best)]
        grouped = set()
        groups: List[Tuple[str, List[Tuple[str, nn.Parameter]]]] = []
        names = {id(p): n for n, p in model.named_parameters()}
        for lname, layer in layers:
            params = [(names[id(p)], p) for p in layer.parameters() if id(p) not in grouped and p.requires_grad]
            grouped.update(id(p) for _, p in params)
            if params:
                groups.append((lname or "(model)", params))
        rest = [(n, p) for n, p in model.named_parameters() if id(p) not in grouped and p.requires_grad]
        if rest:
            groups.append((OTHER_ROW, rest))
        return groups

    def names(self) -> List[str]:
        """The names of the residual sites, in plan order (residual modules, layers, fallback norms)."""
        return [s.name for s in self.all_sites()]

    def all_sites(self) -> List[Site]:
        """Every residual site, in plan order."""
        out = [s for _, s in self.residual_sites]
        for _, _, _, _, sites in self.layer_plans:
            out += sites
        return out + [s for _, s in self.fallback_norms]

    def mechanism(self, fallback: str) -> str:
        """How the residual sums are found: ``'residual modules'``, ``'layer descriptions'``, ``'fallback (mode)'``
        or a mix joined by ``' + '``."""
        parts = [("residual modules", self.residual_sites), ("layer descriptions", self.layer_plans),
                 (f"fallback ({fallback})", self.fallback_norms)]
        return " + ".join(p for p, items in parts if items)

    def reset_fallback(self, *_) -> None:
        """Forget the previous norm's tensors (a new forward pass starts the chain again)."""
        self._fallback_prev = None

    def arm(self, rec: Recorder, hs: List[Any]) -> None:
        """Install the residual-sum hooks (they report to ``rec``), appending their handles to ``hs`` as they go
        in (a failure leaves none that the caller cannot remove)."""
        for module, site in self.residual_sites:
            def res_hook(_m, args, out, site=site):
                if len(args) >= 2 and isinstance(out, Tensor):
                    rec.record(site, args[1], out)
            hs.append(module.register_forward_hook(res_hook))
        for _, layer, kind, pre, sites in self.layer_plans:
            _arm_layer(rec, layer, kind, pre, sites, hs)
        if self.fallback_norms:
            self._fallback_prev = None
            hs.append(self.model.register_forward_pre_hook(self.reset_fallback))
            for norm, site in self.fallback_norms:
                hs.append(norm.register_forward_hook(lambda m, a, o, site=site: self._fallback_hook(rec, site, a, o)))

    def _fallback_hook(self, rec: Recorder, site: Site, args, out) -> None:
        s = args[0] if args else None
        if not isinstance(s, Tensor) or not isinstance(out, Tensor) or rec.foreign:
            return
        prev = self._fallback_prev
        self._fallback_prev = (s, out)
        if prev is None or prev[0].shape != s.shape:
            return
        rec.record_fallback(site, s, *prev)


def _arm_layer(rec: Recorder, layer: nn.Module, kind, pre: bool, sites: List[Site], hs: List[Any]) -> None:
    """The hooks of one described layer (handles appended to ``hs``): each sublayer's ``x`` kept, ``f = s - x``
    recorded at its norm."""
    slots: List[Optional[Tensor]] = [None] * len(sites)
    if not pre:
        # Post-LN: admin_torch's reader of the sums, the one Admin converts with (x as the description says:
        # the residual argument, the source norm's output, the capture module's inputs or the layer's input)
        def at_sum(x, s, site):
            if isinstance(x, Tensor) and x.shape == s.shape:
                rec.record_residual(site, x, s)
        capture_sums(layer, kind, [functools.partial(at_sum, site=site) for site in sites], strict=False, handles=hs)
    else:
        # Pre-LN: x_i = norm i's input, s_i = norm i+1's input (or the layer's output), f = s - x
        def close(i: int, s: Optional[Tensor]) -> None:
            x = slots[i]
            slots[i] = None
            if isinstance(x, Tensor) and isinstance(s, Tensor) and x.shape == s.shape:
                rec.record_residual(sites[i], x, s)

        for i, sub in enumerate(kind.sublayers):
            def at_norm(_m, args, i=i):
                if i > 0:
                    close(i - 1, args[0])
                slots[i] = args[0]
            hs.append(resolve(layer, sub.norm).register_forward_pre_hook(at_norm))
        hs.append(layer.register_forward_hook(lambda m, a, out: close(len(sites) - 1, _first_tensor(out))))
