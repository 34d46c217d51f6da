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

from . import expert_parallel
from .routing import (SPARSE_ROUTERS, Routing, _balance_loss, _expert_counts, check_router, check_router_tau,
                      route_tokens)


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


class _GroupRef:
    """Holds a layer's expert-parallel process group: a copy of the layer (``copy.deepcopy``) shares the group
    (a ProcessGroup cannot be copied); pickling a layer that has a group is refused by name."""

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        # a new holder of the same group: what gather_experts leaves here for the next state_dict (this layer's
        # experts) must not reach a copy's (e.g. an EMA model's) state_dict
        return _GroupRef(self.group)

    def __reduce__(self):
        if self.group is not None:
            raise TypeError("a RoutedFeedForward with an expert_parallel_group cannot be pickled (its process group "
                            "cannot); save its state_dict (torch.distributed.checkpoint reshards it)")
        return (_GroupRef, (None,))


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
        expert_parallel_group: None (every expert here), or a ``torch.distributed`` process group or 1-D
            ``DeviceMesh`` of P ranks whose size divides ``num_experts``: this rank then holds experts
            ``[rank * E/P, (rank+1) * E/P)`` and exchanges tokens with the others by all-to-all, with exactly the
            single-process layer's numbers on its own tokens (``reinmax.expert_parallel``). A collective at
            construction checks that every rank passed the same arguments; ``router="reinmax"`` is refused.

    Shape:
        input ``(*, embed_dim)`` of the layer's dtype (any dtype under ``torch.autocast``); output
        the same shape. ``forward(x, generator=None)``: an optional ``torch.Generator`` for the
        routing samples. An empty input gives an empty output.

    Parameters: ``router`` (``nn.Linear(embed_dim, E, bias=False)``), ``fc1_weight`` ``(E, ffn_dim,
    embed_dim)``, ``fc1_bias`` ``(E, ffn_dim)``, ``fc2_weight`` ``(E, embed_dim, ffn_dim)``,
    ``fc2_bias`` ``(E, embed_dim)``, each expert initialized like an ``nn.Linear`` (with a group: E/P rows,
    the same numbers as the single-process layer's rows of this rank's experts for the same seed).

    Examples:
        >>> moe = RoutedFeedForward(16, 32, num_experts=2, router="reinmax", tau=1.3)
        >>> moe(torch.randn(5, 16)).shape
        torch.Size([5, 16])
    """

    def __init__(self, embed_dim: int, ffn_dim: int, num_experts: int, router: str = "sparsemixer",
                 tau: float = 1.0, capacity_factor: Optional[float] = None,
                 activation: Union[str, Callable[[Tensor], Tensor]] = "relu", activation_dropout: float = 0.0,
                 jitter_eps: float = 0.1, expert_parallel_group=None):
        super().__init__()
        group = expert_parallel.resolve_group(expert_parallel_group)
        try:
            self._check_arguments(embed_dim, ffn_dim, num_experts, router, tau, capacity_factor, activation,
                                  activation_dropout, jitter_eps)
            if group is not None:
                self._check_expert_parallel(group)
            error = None
        except (TypeError, ValueError) as err:
            if group is None:
                raise
            error = err
        if group is not None:
            # collectively, once: every rank raises the same error for arguments that differ between ranks
            expert_parallel.agree(group, "RoutedFeedForward", None if error else self._config(), error)
        self._group = _GroupRef(group)
        E = self.num_experts
        size = 1 if group is None else group.size()
        rank = 0 if group is None else group.rank()
        self.num_local_experts = E // size
        self.first_expert = rank * self.num_local_experts
        E_local, embed_dim, ffn_dim = self.num_local_experts, self._embed_dim, self._ffn_dim
        self.router = nn.Linear(embed_dim, E, bias=False)
        self.fc1_weight = nn.Parameter(torch.empty(E_local, ffn_dim, embed_dim))
        self.fc1_bias = nn.Parameter(torch.empty(E_local, ffn_dim))
        self.fc2_weight = nn.Parameter(torch.empty(E_local, embed_dim, ffn_dim))
        self.fc2_bias = nn.Parameter(torch.empty(E_local, embed_dim))
        self.reset_parameters()
        self.stats: Optional[RoutingStats] = None
        if group is not None:
            # checkpoints hold each expert once, at its global position: they load at any P (or in one process)
            self.register_state_dict_post_hook(expert_parallel.experts_as_dtensors)
            self.register_load_state_dict_pre_hook(expert_parallel.experts_from_state)

    def _check_arguments(self, embed_dim, ffn_dim, num_experts, router, tau, capacity_factor, activation,
                         activation_dropout, jitter_eps) -> None:
        self._embed_dim = validation.as_int("embed_dim", embed_dim, minimum=1)
        self._ffn_dim = validation.as_int("ffn_dim", ffn_dim, minimum=1)
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

    def _check_expert_parallel(self, group) -> None:
        size = group.size()
        if self.router_name == "reinmax":
            raise ValueError("router='reinmax' cannot be expert parallel (expert_parallel_group): it runs every "
                             "expert on every token, so every token would travel to every rank; use one of "
                             f"{list(SPARSE_ROUTERS)}")
        if self.num_experts % size:
            raise ValueError(f"expert_parallel_group must have a size that divides num_experts={self.num_experts}, "
                             f"got a group of {size} ranks")

    def _config(self) -> dict:
        """What every rank of an expert-parallel group must agree on."""
        activation = getattr(self.activation, "__qualname__", type(self.activation).__qualname__)
        return {"embed_dim": self._embed_dim, "ffn_dim": self._ffn_dim, "num_experts": self.num_experts,
                "router": self.router_name, "tau": self.tau, "capacity_factor": self.capacity_factor,
                "activation": activation, "activation_dropout": self.activation_dropout,
                "jitter_eps": self.jitter_eps}

    @property
    def expert_parallel_group(self):
        """The expert-parallel process group (None: every expert on this process)."""
        return self._group.group

    def expert_range(self) -> range:
        """The (global) numbers of the experts this rank holds: all of them without a group."""
        return range(self.first_expert, self.first_expert + self.num_local_experts)

    def reset_parameters(self) -> None:
        """Each expert's fc1/fc2 like ``nn.Linear`` (uniform in +-1/sqrt(fan_in)); the router likewise."""
        self.router.reset_parameters()
        local = slice(self.first_expert, self.first_expert + self.num_local_experts)
        for weight, bias in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
            bound = 1.0 / math.sqrt(weight.shape[2])
            for p in (weight, bias):
                if self.num_local_experts == self.num_experts:
                    nn.init.uniform_(p, -bound, bound)
                else:
                    # the numbers the single-process layer draws (the same seed gives the same experts on every
                    # P), one full tensor at a time, of which this rank keeps its experts
                    full = torch.empty((self.num_experts, *p.shape[1:]), dtype=p.dtype, device=p.device)
                    with torch.no_grad():
                        p.copy_(nn.init.uniform_(full, -bound, bound)[local])

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
        validation.check_device("x", x, self.fc1_weight.device, "the layer's parameters")
        dtype = self.fc1_weight.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x must have the layer's dtype {dtype} (or run under torch.autocast), got {x.dtype}; "
                            f"convert the input or the layer (layer.to({x.dtype}))")
        tokens = x.reshape(-1, d)
        router_dtype = self.router.weight.dtype
        # a router kept in another precision than the experts (e.g. float32 with bfloat16 experts) gets its own;
        # the router is called as a module (not through its weight): hooks on it run, e.g. FSDP2's all-gather
        # when it is sharded on its own (reinmax.expert_parallel.fully_shard_experts)
        logits = self.router(tokens if tokens.dtype == router_dtype else tokens.to(router_dtype))
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
        # not a view when the shapes agree (FSDP2 warns about a sharded module that returns a view)
        return out if out.shape == x.shape else out.reshape(x.shape)

    def __getstate__(self):
        # the last call's stats hold its autograd graph (not copyable, not picklable): a copy has not run
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["stats"] = None
        return state

    def __setstate__(self, state):
        # a layer pickled before expert parallelism existed holds every expert
        state = dict(state)
        if "_group" not in state:
            experts = state["_parameters"]["fc1_weight"].shape[0]
            state.update(_group=_GroupRef(None), num_local_experts=experts, first_expert=0)
        super().__setstate__(state)

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
        """Local expert ``e`` (``0 <= e < num_local_experts``) on the rows of ``x``."""
        h = F.linear(x, self.fc1_weight[e], self.fc1_bias[e])
        return F.linear(self._hidden(h), self.fc2_weight[e], self.fc2_bias[e])

    def _by_sorting(self, tokens: Tensor, index: Tensor) -> Tensor:
        """Tokens sorted by expert; each expert runs on its contiguous slice (sent to its rank and back)."""
        group = self.expert_parallel_group
        if self.num_experts == 1:
            return self._expert(0, tokens)
        order = torch.argsort(index, stable=True)
        sorted_tokens = tokens.index_select(0, order)
        if group is None:
            counts = torch.bincount(index, minlength=self.num_experts).tolist()  # the one host read
            sorted_out = self._run_sorted(sorted_tokens, counts)
        else:
            sorted_out = self._exchange_sorted(sorted_tokens, index, group)
        return torch.empty_like(sorted_out).index_copy(0, order, sorted_out)

    def _run_sorted(self, sorted_tokens: Tensor, counts, every: bool = False) -> Tensor:
        """The local experts on their contiguous slices of ``sorted_tokens`` (``counts``: rows per local expert);
        ``every``: also the experts with no rows."""
        chunks = [self._expert(e, chunk) for e, chunk in enumerate(sorted_tokens.split(counts))
                  if every or chunk.shape[0]]
        return torch.cat(chunks) if chunks else sorted_tokens

    def _exchange_sorted(self, sorted_tokens: Tensor, index: Tensor, group) -> Tensor:
        """The variable-size exchange: each rank gets its experts' tokens, in (source rank, expert) order."""
        P, E_local = group.size(), self.num_local_experts
        counts = _expert_counts(index, self.num_experts, torch.int64)  # (E,) tokens this rank sends per expert
        # each rank's block carries its tokens' dtype too: every rank then checks that all exchange the same one
        code = torch.full((P, 1), expert_parallel.dtype_code(sorted_tokens.dtype), dtype=torch.int64,
                          device=counts.device)
        received = expert_parallel.exchange(torch.cat([counts.view(P, E_local), code], 1), group)
        received = received.view(P, E_local + 1)  # [source, local expert | dtype]
        host = torch.cat([counts, received.flatten()]).tolist()  # the one host read of the call
        send = torch.tensor(host[:self.num_experts]).view(P, E_local).sum(1).tolist()
        received = torch.tensor(host[self.num_experts:]).view(P, E_local + 1)
        expert_parallel.check_same_dtype(received[:, -1].tolist(), group)
        recv_counts = received[:, :-1]
        recv = recv_counts.sum(1).tolist()
        arrived = expert_parallel.all_to_all(sorted_tokens, group, recv, send)
        # regroup the arrivals by local expert (stable: the source ranks in order), run, undo the regrouping
        local_expert = torch.repeat_interleave(torch.arange(E_local).repeat(P), recv_counts.flatten())
        by_expert = torch.argsort(local_expert, stable=True).to(arrived.device)
        # every local expert runs, on no rows if none arrived: the output then depends on the experts on every
        # rank, so every rank runs the backward exchange (a rank whose experts got no token and whose input
        # needs no gradient would otherwise skip it and the others wait for it) and every expert gets a gradient
        out = self._run_sorted(arrived.index_select(0, by_expert), recv_counts.sum(0).tolist(), every=True)
        out = torch.empty_like(out).index_copy(0, by_expert, out)
        return expert_parallel.all_to_all(out, group, send, recv)

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for ``num_tokens`` tokens: ``min(N, ceil(capacity_factor * N / E))``, at least 1 (None: N).

        The clamp to N is exact (no expert can receive more than N tokens) and keeps every finite
        factor finite: ``c >= E`` is N without computing ``c * N`` (which overflows for ``c = 1e308``).
        """
        if not torch.compiler.is_compiling():  # traced: a symbolic size, not a Python int
            num_tokens = validation.as_int("num_tokens", num_tokens, minimum=0)
        if self.capacity_factor is None:
            return num_tokens
        if self.capacity_factor >= self.num_experts:
            return max(1, num_tokens)
        return max(1, min(num_tokens, math.ceil(self.capacity_factor * num_tokens / self.num_experts)))

    def _by_capacity(self, tokens: Tensor, index: Tensor):
        """Static shapes: E x C slots filled in token order, batched matmuls, one gather back."""
        group = self.expert_parallel_group
        E, (n, d) = self.num_experts, tokens.shape
        C = self.capacity(n)
        chosen = (index.unsqueeze(1) == torch.arange(E, device=index.device)).long()  # one-hot, no host check
        position = (torch.cumsum(chosen, 0) * chosen).sum(1) - 1  # rank of the token among its expert's
        keep = position < C
        # the exchange needs the same number of slots on every rank: the largest C of the group (empty slots pad)
        if group is None:
            width = C
        elif torch.compiler.is_compiling():
            # no host read under compile: every rank must have the same C, checked on the device by every rank
            width = expert_parallel.same_over_group_compiled(C, group, tokens.device, tokens.dtype)
        else:
            width = expert_parallel.max_over_group(C, group, tokens.device, tokens.dtype)
        slot = torch.where(keep, index * width + position, E * width)  # dropped tokens go to a spare slot
        slots = tokens.new_zeros(E * width + 1, d).index_add(0, slot, tokens)
        outs = self._run_slots(slots[:-1].view(E, width, d), group)
        outs = torch.cat([outs.reshape(E * width, d), outs.new_zeros(1, d)])
        return outs.index_select(0, slot), keep

    def _run_slots(self, slots: Tensor, group) -> Tensor:
        """``(E, C, d)`` slots -> the experts' outputs ``(E, C, d)`` (with a group: sent to their ranks and back)."""
        E_local, (E, C, d) = self.num_local_experts, slots.shape
        if group is not None:
            P = group.size()
            # block q of the E x C x d slots (rank q's experts) goes to rank q; what arrives is
            # [source rank, local expert, slot], regrouped as each local expert's P x C slots
            arrived = expert_parallel.all_to_all(slots.reshape(P, E_local * C * d), group)
            slots = arrived.view(P, E_local, C, d).transpose(0, 1).reshape(E_local, P * C, d)
        h = torch.baddbmm(self.fc1_bias.unsqueeze(1), slots, self.fc1_weight.transpose(1, 2))
        outs = torch.baddbmm(self.fc2_bias.unsqueeze(1), self._hidden(h), self.fc2_weight.transpose(1, 2))
        if group is not None:
            outs = outs.view(E_local, P, C, d).transpose(0, 1).reshape(P, E_local * C * d)
            outs = expert_parallel.all_to_all(outs, group).view(E, C, d)
        return outs

    def extra_repr(self) -> str:
        _, f, d = self.fc1_weight.shape
        text = (f"embed_dim={d}, ffn_dim={f}, num_experts={self.num_experts}, router={self.router_name!r}, "
                f"tau={self.tau}, capacity_factor={self.capacity_factor}")
        if self.expert_parallel_group is not None:
            text += f", local experts {self.first_expert}..{self.first_expert + self.num_local_experts - 1}"
        return text


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
