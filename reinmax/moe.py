r"""A mixture-of-experts feed-forward layer: each token goes to one of E expert FFNs, chosen by a router.

:class:`RoutedFeedForward` replaces a transformer's FFN ``fc2(act(fc1(x)))`` by E experts of the
same shape and a router ``theta = x W_r`` (no bias); each token's output is ``gate * f_D(x)``
for its chosen expert ``D`` (:func:`reinmax.routing.route_tokens`). Active parameters per token
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
token costs ``c`` FFNs. ``reinmax`` computes every expert and accepts no capacity.

Balance. After each call :attr:`RoutedFeedForward.stats` holds a :class:`RoutingStats`: Switch's
load-balancing loss (with gradient; add ``weight * stats.balance_loss`` to the training loss, as
:func:`moe_balance_loss` does for a whole model), the fraction of tokens routed to each expert and
the fraction dropped.

Example::

    >>> moe = RoutedFeedForward(64, 256, num_experts=4, router="sparsemixer")
    >>> y = moe(torch.randn(10, 8, 64))            # (*, 64) -> (*, 64)
    >>> loss = y.pow(2).mean() + 0.01 * moe.stats.balance_loss
"""

import math
from typing import Callable, Iterator, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stability_toolbox import validation

from ._checks import check_tau
from .routing import Routing, balance_loss, check_router, expert_counts, route_tokens

__all__ = ["ACTIVATIONS", "RoutedFeedForward", "RoutingStats", "moe_balance_loss", "moe_layers", "moe_load"]

#: activation names accepted by :class:`RoutedFeedForward` (a callable is accepted too).
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
}


class RoutingStats(NamedTuple):
    """What the last call of a :class:`RoutedFeedForward` routed.

    Attributes:
        balance_loss: 0-d, Switch's load-balancing loss (1 when balanced, E at worst), with gradient.
        load: ``(E,)`` fraction of the tokens routed to each expert (before any drop).
        dropped: 0-d, fraction of the tokens dropped for capacity (0 without a capacity).
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
        router: one of :data:`reinmax.routing.ROUTERS` (default ``"sparsemixer"``).
        tau: temperature of ``straight_through``, ``gumbel_softmax`` and ``reinmax``.
        capacity_factor: None (no token dropped) or a finite number > 0 (see the module docstring).
        activation: a name in :data:`ACTIVATIONS` or a callable.
        activation_dropout: dropout probability on the hidden activations.
        jitter_eps: ``sparsemixer``'s masking threshold.

    Shape:
        input ``(*, embed_dim)``; output the same. ``forward(x, generator=None)``: an optional
        ``torch.Generator`` for the routing samples. An empty input gives an empty output.

    Parameters: ``router`` (``nn.Linear(embed_dim, E, bias=False)``), ``fc1_weight`` ``(E, ffn_dim,
    embed_dim)``, ``fc1_bias`` ``(E, ffn_dim)``, ``fc2_weight`` ``(E, embed_dim, ffn_dim)``,
    ``fc2_bias`` ``(E, embed_dim)``, each expert initialized like an ``nn.Linear``.

    Example::

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
        self.tau = check_tau(tau)
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
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point torch.Tensor, got "
                            f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
        d = self.fc1_weight.shape[2]
        if x.dim() == 0 or x.shape[-1] != d:
            raise ValueError(f"x must have shape (*, embed_dim={d}), got {tuple(x.shape)}")
        tokens = x.reshape(-1, d)
        routing = route_tokens(self.router(tokens), self.router_name, self.tau, training=self.training,
                               jitter_eps=self.jitter_eps, generator=generator)
        if self.sparse:
            out, dropped = self._sparse(tokens, routing)
        else:
            out, dropped = self._dense(tokens, routing), tokens.new_zeros(())
        self.stats = RoutingStats(
            balance_loss=balance_loss(routing.probs, routing.index),
            load=expert_counts(routing.index, self.num_experts, routing.probs.dtype) / max(tokens.shape[0], 1),
            dropped=dropped, index=routing.index)
        return out.reshape(x.shape)

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
            out, dropped = self._by_sorting(tokens, routing.index), tokens.new_zeros(())
        else:
            # a dropped token's row is 0, so its gate (and router) gets no gradient from it
            out, keep = self._by_capacity(tokens, routing.index)
            dropped = 1.0 - keep.to(tokens.dtype).mean() if tokens.shape[0] else tokens.new_zeros(())
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
        """Slots per expert for ``num_tokens`` tokens: ``ceil(capacity_factor * N / E)`` (None: N)."""
        if self.capacity_factor is None:
            return num_tokens
        return max(1, math.ceil(self.capacity_factor * num_tokens / self.num_experts))

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


def moe_layers(model: nn.Module) -> Iterator[RoutedFeedForward]:
    """Every :class:`RoutedFeedForward` of ``model``, in module order."""
    return (m for m in model.modules() if isinstance(m, RoutedFeedForward))


def moe_balance_loss(model: nn.Module) -> Optional[Tensor]:
    """The sum over ``model``'s MoE layers of their last call's balance loss (Switch sums over layers).

    None when the model has no MoE layer or none has run yet.

    Example::

        >>> loss = task_loss + 0.01 * moe_balance_loss(model)
    """
    losses = [m.stats.balance_loss for m in moe_layers(model) if m.stats is not None]
    return torch.stack(losses).sum() if losses else None


def moe_load(model: nn.Module) -> Optional[Tensor]:
    """``(layers, E)``: each MoE layer's last fraction of tokens per expert (layers with the same E)."""
    loads = [m.stats.load.detach() for m in moe_layers(model) if m.stats is not None]
    return torch.stack(loads) if loads else None
