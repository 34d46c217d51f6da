r"""A mixture-of-experts feed-forward layer: each token goes to one of E expert FFNs, chosen by a router.

[`RoutedFeedForward`][reinmax.RoutedFeedForward] replaces a transformer's FFN ``fc2(act(fc1(x)))`` by E experts of the
same shape and a router ``theta = x W_r`` (no bias); each token's output is ``gate * f_D(x)``
for its chosen expert ``D`` ([`reinmax.route_tokens`][reinmax.route_tokens]). Active parameters per token
are those of one dense FFN (plus the E x d router).

Compute. The sparse routers (``sparsemixer``, ``switch``, ``straight_through``,
``gumbel_softmax``) run each expert on its own tokens only (dispatch by expert), so a token costs
one FFN. ``reinmax`` runs every expert on every token (its gradient needs all outputs): E FFNs
per token, for small E.

Capacity and dropped tokens. ``capacity_factor=None`` (default): no token is dropped; the
tokens are sorted by expert and each expert runs on its slice (one host read of the per-expert
counts per call). ``capacity_factor=c``: each expert takes at most ``C = ceil(c * N / E)`` tokens,
in token order (the first C tokens routed to it); a token beyond that is *dropped*: the layer
outputs 0 for it (in a residual block the token passes through the shortcut unchanged) and its
router gets no gradient from it. Shapes are then static (E x C slots, batched matmuls), with no
host-device synchronization: this mode compiles with ``torch.compile(fullgraph=True)`` and a
token costs ``c`` FFNs. ``C`` is clamped to ``N`` (an expert never receives more than the N
tokens, so ``C = N`` already drops nothing): any finite ``c`` is accepted, and every ``c >= E``
(``1e308`` included) is exactly the no-drop layer with ``C = N``. ``reinmax`` computes every
expert and accepts no capacity.

Dtypes. The input must have the layer's dtype (``layer.to(dtype)`` converts the layer), except
under ``torch.autocast``, where the matmuls take autocast's dtype; anything else is a TypeError
(never a silent cast). The routing runs in float32 (float64 for a float64 layer) in every case.

Balance. After each call `RoutedFeedForward.stats` holds a [`RoutingStats`][reinmax.RoutingStats]: Switch's
load-balancing loss (with gradient; add ``weight * stats.balance_loss`` to the training loss, as
[`moe_balance_loss`][reinmax.moe_balance_loss] does for a whole model), the fraction of tokens routed to each expert and
the fraction dropped. When a model may skip layers (LayerDrop), call [`clear_moe_stats`][reinmax.clear_moe_stats]
before each forward so that a skipped layer contributes nothing (its stats are None) instead of
its previous call's loss, whose graph is gone. A copy (``copy.deepcopy``, pickling) of a layer
has ``stats`` None: it has not run.

Examples:
    >>> moe = RoutedFeedForward(64, 256, num_experts=4, router="sparsemixer")
    >>> y = moe(torch.randn(10, 8, 64))            # (*, 64) -> (*, 64)
    >>> loss = y.pow(2).mean() + 0.01 * moe.stats.balance_loss
"""

import math
from typing import Callable, Iterator, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolbox_core import validation

from .routing import Routing, _balance_loss, _expert_counts, check_router, check_router_tau, route_tokens


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")

__all__ = ["ACTIVATIONS", "RoutedFeedForward", "RoutingStats", "clear_moe_stats", "moe_balance_loss", "moe_layers",
           "moe_load"]

#: activation names accepted by [`RoutedFeedForward`][reinmax.RoutedFeedForward] (a callable is accepted too).
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": F.silu,
    "tanh": torch.tanh,
}


class RoutingStats(NamedTuple):
    """What the last call of a [`RoutedFeedForward`][reinmax.RoutedFeedForward] routed.

    Attributes:
        balance_loss: 0-d, Switch's load-balancing loss (1 when balanced, E at worst), with gradient.
        load: ``(E,)`` fraction of the tokens routed to each expert (before any drop).
        dropped: 0-d, fraction of the tokens dropped for capacity (0 without a capacity); float32 (float64
            for a float64 layer), like ``load`` and ``balance_loss``.
        index: ``(N,)`` the chosen expert of each token (flattened input order).
    """

    balance_loss: Tensor
    load: Tensor
    dropped: Tensor
    index: Tensor


class RoutedFeedForward(nn.Module):
    r"""E expert FFNs ``fc2_i(act(fc1_i(x)))`` with top-1 routing by a discrete sample.

    Args:
        embed_dim: d, the input and output size.
        ffn_dim: the hidden size of each expert.
        num_experts: E >= 1. With E = 1 the layer is a plain FFN (the gate is exactly 1).
        router: one of `reinmax.routing.ROUTERS` (default ``"sparsemixer"``).
        tau: temperature of ``straight_through``, ``gumbel_softmax`` and ``reinmax``: finite, >=
            `reinmax.routing.ROUTER_MIN_TAU` (1e-30) for them, > 0 for the others; any such tau gives
            finite gates and gradients.
        capacity_factor: None (no token dropped) or a finite number > 0, in units of ``N / E``
            slots per expert; the slots are clamped to N, so ``c >= E`` drops nothing (module docstring).
        activation: a name in `ACTIVATIONS` or a callable.
        activation_dropout: dropout probability on the hidden activations.
        jitter_eps: ``sparsemixer``'s masking threshold.

    Shape:
        input ``(*, embed_dim)`` of the layer's dtype (any dtype under ``torch.autocast``); output
        the same shape. ``forward(x, generator=None)``: an optional ``torch.Generator`` for the
        routing samples. An empty input gives an empty output.

    Parameters: ``router`` (``nn.Linear(embed_dim, E, bias=False)``), ``fc1_weight`` ``(E, ffn_dim,
    embed_dim)``, ``fc1_bias`` ``(E, ffn_dim)``, ``fc2_weight`` ``(E, embed_dim, ffn_dim)``,
    ``fc2_bias`` ``(E, embed_dim)``, each expert initialized like an ``nn.Linear``.

    Examples:
        >>> moe = RoutedFeedForward(16, 32, num_experts=2, router="reinmax", tau=1.3)
        >>> moe(torch.randn(5, 16)).shape
        torch.Size([5, 16])
    """

    def __init__(self, embed_dim: int, ffn_dim: int, num_experts: int, router: str = "sparsemixer",
                 tau: float = 1.0, capacity_factor: Optional[float] = None,
                 activation: Union[str, Callable[[Tensor], Tensor]] = "relu", activation_dropout: float = 0.0,
                 jitter_eps: float = 0.1):
        super().__init__()
        embed_dim = validation.as_int("embed_dim", embed_dim, minimum=1)
        ffn_dim = validation.as_int("ffn_dim", ffn_dim, minimum=1)
        self.num_experts = validation.as_int("num_experts", num_experts, minimum=1)
        self.router_name = check_router(router)
        self.tau = check_router_tau(self.router_name, tau)
        if capacity_factor is not None:
            capacity_factor = validation.as_real("capacity_factor", capacity_factor, low=0.0, low_open=True)
            if self.router_name == "reinmax":
                raise ValueError("capacity_factor must be None with router='reinmax' (it runs every expert on "
                                 "every token, so no token is dropped)")
        self.capacity_factor = capacity_factor
        if isinstance(activation, str):
            self.activation = ACTIVATIONS[validation.as_choice("activation", activation, sorted(ACTIVATIONS))]
        elif callable(activation):
            self.activation = activation
        else:
            raise TypeError(f"activation must be one of {sorted(ACTIVATIONS)} or a callable, "
                            f"got {type(activation).__name__}")
        self.activation_dropout = validation.as_real("activation_dropout", activation_dropout, low=0.0, high=1.0,
                                                     high_open=True)
        self.jitter_eps = validation.as_real("jitter_eps", jitter_eps, low=0.0)

        E = self.num_experts
        self.router = nn.Linear(embed_dim, E, bias=False)
        self.fc1_weight = nn.Parameter(torch.empty(E, ffn_dim, embed_dim))
        self.fc1_bias = nn.Parameter(torch.empty(E, ffn_dim))
        self.fc2_weight = nn.Parameter(torch.empty(E, embed_dim, ffn_dim))
        self.fc2_bias = nn.Parameter(torch.empty(E, embed_dim))
        self.reset_parameters()
        self.stats: Optional[RoutingStats] = None

    def reset_parameters(self) -> None:
        """Each expert's fc1/fc2 like ``nn.Linear`` (uniform in +-1/sqrt(fan_in)); the router likewise."""
        self.router.reset_parameters()
        for weight, bias in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
            bound = 1.0 / math.sqrt(weight.shape[2])
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    @property
    def sparse(self) -> bool:
        """Whether a token runs through one expert only (every router but ``reinmax``)."""
        return self.router_name != "reinmax"

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """``(*, embed_dim) -> (*, embed_dim)``; sets `stats` (a [`RoutingStats`][reinmax.RoutingStats])."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point torch.Tensor, got "
                            f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
        d = self.fc1_weight.shape[2]
        if x.dim() == 0 or x.shape[-1] != d:
            raise ValueError(f"x must have shape (*, embed_dim={d}), got {tuple(x.shape)}")
        dtype = self.fc1_weight.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x must have the layer's dtype {dtype} (or run under torch.autocast), got {x.dtype}; "
                            f"convert the input or the layer (layer.to({x.dtype}))")
        tokens = x.reshape(-1, d)
        router_weight = self.router.weight
        # a router kept in another precision than the experts (e.g. float32 with bfloat16 experts) gets its own
        logits = F.linear(tokens if tokens.dtype == router_weight.dtype else tokens.to(router_weight.dtype),
                          router_weight)
        routing = route_tokens(logits, self.router_name, self.tau, training=self.training,
                               jitter_eps=self.jitter_eps, generator=generator)
        if self.sparse:
            out, dropped = self._sparse(tokens, routing)
        else:
            out, dropped = self._dense(tokens, routing), routing.probs.new_zeros(())
        self.stats = RoutingStats(
            balance_loss=_balance_loss(routing.probs, routing.index),
            load=_expert_counts(routing.index, self.num_experts, routing.probs.dtype) / max(tokens.shape[0], 1),
            dropped=dropped, index=routing.index)
        return out.reshape(x.shape)

    def __getstate__(self):
        # the last call's stats hold its autograd graph (not copyable, not picklable): a copy has not run
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["stats"] = None
        return state

    # -------------------------------------------------------------- expert computation

    def _hidden(self, h: Tensor) -> Tensor:
        h = self.activation(h)
        return F.dropout(h, self.activation_dropout, self.training) if self.activation_dropout else h

    def _dense(self, tokens: Tensor, routing: Routing) -> Tensor:
        """Every expert on every token; output ``sum_i weights_i f_i``."""
        h = torch.einsum("nd,efd->enf", tokens, self.fc1_weight) + self.fc1_bias.unsqueeze(1)
        outs = torch.einsum("enf,edf->end", self._hidden(h), self.fc2_weight) + self.fc2_bias.unsqueeze(1)
        return torch.einsum("ne,end->nd", routing.weights.to(outs.dtype), outs)

    def _sparse(self, tokens: Tensor, routing: Routing):
        if self.capacity_factor is None:
            out, dropped = self._by_sorting(tokens, routing.index), routing.probs.new_zeros(())
        else:
            # a dropped token's row is 0, so its gate (and router) gets no gradient from it; the fraction is
            # counted in the routing dtype (float32 or float64), not in a half-precision input's
            out, keep = self._by_capacity(tokens, routing.index)
            probs = routing.probs
            dropped = 1.0 - keep.to(probs.dtype).mean() if tokens.shape[0] else probs.new_zeros(())
        return out * routing.gate.to(out.dtype).unsqueeze(1), dropped

    def _expert(self, e: int, x: Tensor) -> Tensor:
        h = F.linear(x, self.fc1_weight[e], self.fc1_bias[e])
        return F.linear(self._hidden(h), self.fc2_weight[e], self.fc2_bias[e])

    def _by_sorting(self, tokens: Tensor, index: Tensor) -> Tensor:
        """Tokens sorted by expert; each expert runs on its contiguous slice."""
        if self.num_experts == 1:
            return self._expert(0, tokens)
        order = torch.argsort(index, stable=True)
        counts = torch.bincount(index, minlength=self.num_experts).tolist()  # the one host read
        sorted_tokens = tokens.index_select(0, order)
        chunks = [self._expert(e, chunk) for e, chunk in enumerate(sorted_tokens.split(counts)) if chunk.shape[0]]
        sorted_out = torch.cat(chunks) if chunks else sorted_tokens
        return torch.empty_like(sorted_out).index_copy(0, order, sorted_out)

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for ``num_tokens`` tokens: ``min(N, ceil(capacity_factor * N / E))``, at least 1 (None: N).

        The clamp to N is exact (no expert can receive more than N tokens) and keeps every finite
        factor finite: ``c >= E`` is N without computing ``c * N`` (which overflows for ``c = 1e308``).
        """
        if self.capacity_factor is None:
            return num_tokens
        if self.capacity_factor >= self.num_experts:
            return max(1, num_tokens)
        return max(1, min(num_tokens, math.ceil(self.capacity_factor * num_tokens / self.num_experts)))

    def _by_capacity(self, tokens: Tensor, index: Tensor):
        """Static shapes: E x C slots filled in token order, batched matmuls, one gather back."""
        E, (n, d) = self.num_experts, tokens.shape
        C = self.capacity(n)
        chosen = (index.unsqueeze(1) == torch.arange(E, device=index.device)).long()  # one-hot, no host check
        position = (torch.cumsum(chosen, 0) * chosen).sum(1) - 1  # rank of the token among its expert's
        keep = position < C
        slot = torch.where(keep, index * C + position, E * C)  # dropped tokens go to a spare slot
        slots = tokens.new_zeros(E * C + 1, d).index_add(0, slot, tokens)
        h = torch.baddbmm(self.fc1_bias.unsqueeze(1), slots[:-1].view(E, C, d), self.fc1_weight.transpose(1, 2))
        outs = torch.baddbmm(self.fc2_bias.unsqueeze(1), self._hidden(h), self.fc2_weight.transpose(1, 2))
        outs = torch.cat([outs.reshape(E * C, d), outs.new_zeros(1, d)])
        return outs.index_select(0, slot), keep

    def extra_repr(self) -> str:
        e, f, d = self.fc1_weight.shape
        return (f"embed_dim={d}, ffn_dim={f}, num_experts={e}, router={self.router_name!r}, tau={self.tau}, "
                f"capacity_factor={self.capacity_factor}")


def _check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def moe_layers(model: nn.Module) -> Iterator[RoutedFeedForward]:
    """Every [`RoutedFeedForward`][reinmax.RoutedFeedForward] of ``model`` (an ``nn.Module``, else TypeError), in module order."""
    return (m for m in _check_model(model).modules() if isinstance(m, RoutedFeedForward))


def clear_moe_stats(model: nn.Module) -> None:
    """Set ``stats`` of every MoE layer of ``model`` to None.

    Call it before a forward of a model that may skip layers (LayerDrop): afterwards only the
    layers that ran have stats, so [`moe_balance_loss`][reinmax.moe_balance_loss] and [`moe_load`][reinmax.moe_load] count exactly
    those (a skipped layer would otherwise add its previous call's loss, whose graph was freed by
    the previous backward). The ``*_moe`` fairseq criteria call it on every call.

    Examples:
        >>> model = torch.nn.Sequential(RoutedFeedForward(8, 16, 2), RoutedFeedForward(8, 16, 2))
        >>> clear_moe_stats(model); out = model[0](torch.randn(4, 8))   # layer 1 skipped
        >>> loss = out.pow(2).mean() + 0.01 * moe_balance_loss(model)   # layer 0's balance loss only
    """
    for m in moe_layers(model):
        m.stats = None


def moe_balance_loss(model: nn.Module) -> Optional[Tensor]:
    """The sum over ``model``'s MoE layers of their last call's balance loss (Switch sums over layers).

    None when the model has no MoE layer or none has run yet.

    Examples:
        >>> model = torch.nn.Sequential(RoutedFeedForward(8, 16, 2), RoutedFeedForward(8, 16, 2))
        >>> out = model(torch.randn(4, 8))
        >>> loss = out.pow(2).mean() + 0.01 * moe_balance_loss(model)
    """
    losses = [m.stats.balance_loss for m in moe_layers(model) if m.stats is not None]
    return torch.stack(losses).sum() if losses else None


def moe_load(model: nn.Module) -> Optional[Tensor]:
    """``(layers, E)``: each MoE layer's last fraction of tokens per expert (layers that have stats).

    None when no MoE layer has stats. ValueError when those layers have different expert counts
    (take ``[m.stats.load for m in moe_layers(model)]`` then).
    """
    layers = [m for m in moe_layers(model) if m.stats is not None]
    counts = sorted({m.num_experts for m in layers})
    if len(counts) > 1:
        raise ValueError(f"model's MoE layers must all have the same num_experts for moe_load, got {counts}; "
                         f"use [m.stats.load for m in reinmax.moe_layers(model)]")
    return torch.stack([m.stats.load.detach() for m in layers]) if layers else None
