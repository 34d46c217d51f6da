r"""Expert parallelism: the experts of a [`RoutedFeedForward`][reinmax.RoutedFeedForward] split over the ranks of a
process group, tokens sent to their expert's rank by ``torch.distributed.all_to_all_single``.

With ``RoutedFeedForward(..., expert_parallel_group=group)`` on each of the P ranks of ``group``, rank ``q``
holds experts ``q E/P, ..., (q+1) E/P - 1`` (E/P of them: 1/P of the experts' bytes). Each rank routes its own
tokens (its router is a replica, like any non-expert parameter) and:

* **capacity mode** (``capacity_factor=c``): fills its ``E x C x d`` slots exactly as the single-process layer
  does (``C = layer.capacity(N)`` for its own N tokens, the first C tokens per expert kept), sends the
  ``E/P x C x d`` block of rank ``q``'s experts to rank ``q`` with one ``all_to_all_single`` of equal splits,
  runs its E/P experts on the ``P x C`` slots it received (batched matmuls), and sends the outputs back by
  the reverse exchange. Ranks with different token counts pad to the largest C of the group (read with one
  small all-reduce per call); empty slots cost compute but change nothing.
* **no-capacity mode** (``capacity_factor=None``): sorts its tokens by expert and sends each rank exactly its
  experts' tokens (the variable-size exchange: one all-to-all of the ``E`` counts, read on the host, then one
  of the tokens and one back).

The result on each rank is exactly the single-process layer's on that rank's tokens: the same outputs, the
same dropped tokens, the same ``stats`` (computed over the rank's own tokens, like data parallelism), and the
gradient of each expert is the sum over the group's ranks of the single-process gradients (the backward of
each exchange is the reverse exchange, `all_to_all`). Every rank of the group must run each forward and
backward of the layer (as with DDP); a rank that does not makes the others fail after the group's timeout,
with an error naming the group, instead of waiting forever.

The ranks must exchange one dtype: each call checks it inside the collectives it already makes (the same
ValueError on every rank otherwise). Each rank runs all its experts, on no rows if none arrived, so that
every rank takes part in the backward exchange even when its input needs no gradient; the backward of an
exchange is an exchange through the same autograd function (a double backward is exact). Gradient clipping
must count every rank's experts: `clip_grad_norm_` (``torch.nn.utils.clip_grad_norm_`` sees this rank's).

``router="reinmax"`` (every expert on every token) is refused by name: its exchange would send every token
to every rank (an all-gather of the batch), which is what expert parallelism exists to avoid.

Examples:
    >>> x = torch.arange(6.0).view(3, 2)
    >>> all_to_all(x, None) is x  # no group (a single process): the exchange is the identity
    True
"""

from datetime import timedelta
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from toolbox_core import validation

__all__ = ["all_to_all", "resolve_group", "group_description", "ExpertParallelError", "EXPERT_PARAMETERS",
           "expert_parameter_names", "exclude_experts_from_ddp", "reduce_expert_gradients", "gather_experts",
           "gather_optimizer_state", "shard_optimizer_state", "expert_grad_square_norms", "clip_grad_norm_"]


class ExpertParallelError(RuntimeError):
    """A collective of the expert-parallel group failed (a rank died, or did not join before the group's timeout)."""


def _dist():
    import torch.distributed as dist

    return dist


def resolve_group(group) -> Optional[object]:
    """The process group of ``group``: None (no expert parallelism), a ``ProcessGroup`` or a 1-D ``DeviceMesh``.

    TypeError for anything else, ValueError for a group this process is not a member of or a mesh of more
    than one dimension (pick one: ``mesh["ep"]``).
    """
    if group is None:
        return None
    dist = _dist()
    if dist.is_available() and isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
        # what new_group returns on the ranks outside the group
        raise ValueError("expert_parallel_group must be a group this process belongs to, got "
                         "GroupMember.NON_GROUP_MEMBER (new_group's value on a rank outside the group)")
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without DeviceMesh
        DeviceMesh = ()
    is_mesh = bool(DeviceMesh) and isinstance(group, DeviceMesh)
    if not is_mesh and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"expert_parallel_group must be None, a torch.distributed ProcessGroup or a 1-D DeviceMesh, "
                        f"got {type(group).__name__}")
    if not dist.is_initialized():
        raise ValueError("expert_parallel_group needs torch.distributed initialized (init_process_group), "
                         "got a group while it is not")
    if is_mesh:
        if group.ndim != 1:
            raise ValueError(f"expert_parallel_group must be a 1-D DeviceMesh (select the expert dimension, "
                             f"mesh['ep']), got a {group.ndim}-D mesh {tuple(group.shape)}")
        group = group.get_group()
    if dist.get_rank(group) < 0:
        raise ValueError("expert_parallel_group must be a group this process belongs to, got one it is not in")
    return group


def group_description(group) -> str:
    """``"expert-parallel group of ranks [0, 1] (gloo)"``: how errors name the group."""
    dist = _dist()
    try:
        ranks = dist.get_process_group_ranks(group)
    except Exception:  # pragma: no cover - very old torch
        ranks = list(range(dist.get_world_size(group)))
    try:
        backend = dist.get_backend(group)
    except Exception:  # pragma: no cover
        backend = "?"
    return f"expert-parallel group of ranks {ranks} ({backend})"


def _group_timeout(group) -> Optional[timedelta]:
    try:
        return group.options._timeout  # type: ignore[attr-defined]
    except Exception:
        return None


def _collective(group, what: str, fn):
    """Run the collective ``fn()``; a failure (a dead rank, the group's timeout) names the group."""
    try:
        return fn()
    except RuntimeError as err:  # gloo/NCCL raise DistBackendError (a RuntimeError) on timeouts and lost peers
        timeout = _group_timeout(group)
        after = f" (the group's timeout is {timeout})" if timeout is not None else ""
        raise ExpertParallelError(f"{what} on the {group_description(group)} failed: a rank died or did not join "
                                  f"in time{after}: {err}") from err


def exchange(x: Tensor, group, output_splits: Optional[Sequence[int]] = None,
             input_splits: Optional[Sequence[int]] = None) -> Tensor:
    """``all_to_all_single`` along dim 0 without autograd (the building block of `all_to_all`)."""
    dist = _dist()
    x = x.contiguous()
    rows = x.shape[0] if output_splits is None else int(sum(output_splits))
    out = x.new_empty((rows, *x.shape[1:]))
    _collective(group, "all_to_all_single", lambda: dist.all_to_all_single(
        out, x, None if output_splits is None else list(output_splits),
        None if input_splits is None else list(input_splits), group=group))
    return out


class _AllToAll(torch.autograd.Function):
    """Forward: ``all_to_all_single``; backward: the reverse exchange (the splits swapped)."""

    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        return exchange(x, group, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad):
        # the reverse exchange through this Function again (not the bare `exchange`): a double backward
        # (create_graph=True, gradient penalties) differentiates it too instead of silently dropping its terms
        return _AllToAll.apply(grad, ctx.group, ctx.input_splits, ctx.output_splits), None, None, None


def all_to_all(x: Tensor, group, output_splits: Optional[List[int]] = None,
               input_splits: Optional[List[int]] = None) -> Tensor:
    r"""``torch.distributed.all_to_all_single`` along dim 0, differentiable: the backward is the reverse exchange.

    Args:
        x: ``(rows, *)``; rank ``q`` receives rows ``input_splits[q]`` (equal chunks of ``rows / P`` if None).
        group: the process group (None: one process, ``x`` is returned as it is).
        output_splits: rows received from each rank (None: equal chunks, the shape of ``x``).
        input_splits: rows sent to each rank (None: equal chunks).

    Returns:
        ``(sum(output_splits), *)`` (``x``'s shape when None): rank ``s``'s rows for this rank, in rank order.

    Raises:
        ExpertParallelError: a rank died or did not join before the group's timeout (the message names the group).
    """
    if group is None:
        return x
    return _AllToAll.apply(x, group, output_splits, input_splits)


#: the dtypes the exchanges carry, by code (what `dtype_code` sends to the other ranks)
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def dtype_code(dtype: torch.dtype) -> int:
    """A small integer naming ``dtype`` (1 + its position in the exchanged dtypes; 0 for any other)."""
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else 0


def check_same_dtype(codes: Sequence[int], group) -> None:
    """ValueError (the same on every rank, which all hold the same ``codes``) when the ranks' token dtypes differ.

    Without it, ranks exchanging float32 with float64 read each other's bytes as their own (a crash of the
    transport or wrong numbers).
    """
    codes = sorted({int(c) for c in codes})
    if len(codes) > 1:
        names = [str(_DTYPES[c - 1]) if 0 < c <= len(_DTYPES) else "another dtype" for c in codes]
        raise ValueError(f"x must have the same dtype on every rank of the {group_description(group)} (the tokens "
                         f"are exchanged between them), got {names}; convert the layer and its input on every rank")


def max_over_group(value: int, group, device: torch.device, dtype: Optional[torch.dtype] = None) -> int:
    """The largest ``value`` over the ranks of ``group`` (one all-reduce of three integers, read on the host).

    With ``dtype`` (the tokens' dtype), the same all-reduce checks that every rank exchanges that dtype
    (`check_same_dtype`: the same ValueError on every rank).
    """
    dist = _dist()
    code = 0 if dtype is None else dtype_code(dtype)
    t = torch.tensor([value, code, -code], dtype=torch.int64, device=device)
    _collective(group, "all_reduce of the capacity", lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group))
    largest, high, low = t.tolist()
    check_same_dtype([high, -low], group)
    return int(largest)


def agree(group, name: str, config: dict, local_error: Optional[BaseException]) -> None:
    """Check collectively that every rank of ``group`` built ``name`` with the same ``config``.

    One ``all_gather_object``; every rank then raises the same ValueError for a mismatch, and when a rank
    refused its own arguments (``local_error``) every rank raises the same error naming that rank and the
    argument (instead of the others waiting for it in a later collective).
    """
    dist = _dist()
    world = dist.get_world_size(group)
    gathered: list = [None] * world
    mine = {"error": None if local_error is None else f"{type(local_error).__name__}: {local_error}",
            "config": config}
    _collective(group, f"the consistency check of {name}",
                lambda: dist.all_gather_object(gathered, mine, group=group))
    for rank, other in enumerate(gathered):
        if other["error"] is not None:  # the same error on every rank, the refusing one included
            kind, _, message = other["error"].partition(": ")
            raise (TypeError if kind == "TypeError" else ValueError)(
                f"{name}: rank {rank} of the {group_description(group)} refused its arguments: {message}")
    for key in config:
        values = [other["config"].get(key) for other in gathered]
        if any(v != values[0] for v in values):
            raise ValueError(f"{name}: {key} must be the same on every rank of the {group_description(group)}, "
                             f"got {values} (by rank)")


# ---------------------------------------------------------------- checkpoints and data parallelism

#: the parameters of a `RoutedFeedForward` that hold one row per expert (sharded over the expert-parallel group).
EXPERT_PARAMETERS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def _device_mesh(layer):
    """A 1-D DeviceMesh over the layer's group (cached): what the experts' DTensor views live on."""
    ref = layer._group
    if getattr(ref, "mesh", None) is None:
        from torch.distributed.device_mesh import DeviceMesh

        ref.mesh = DeviceMesh.from_group(ref.group, layer.fc1_weight.device.type)
    return ref.mesh


def experts_as_dtensors(layer, state_dict, prefix, local_metadata) -> None:
    """``state_dict`` post-hook: an expert-parallel layer's experts as DTensors sharded on dim 0 over its group.

    ``torch.distributed.checkpoint`` then stores each expert once with its global position, and a checkpoint
    saved at P ranks loads at any other P (each rank reads its own experts). The DTensors share the
    parameters' memory (no copy).
    """
    if layer.expert_parallel_group is None:
        return
    from torch.distributed.tensor import DTensor, Shard

    full = getattr(layer._group, "full", None)
    if full is not None:  # gather_experts ran: every expert, once
        layer._group.full = None
        for name in EXPERT_PARAMETERS:
            if prefix + name in state_dict:
                state_dict[prefix + name] = full[name]
        return
    mesh = _device_mesh(layer)
    for name in EXPERT_PARAMETERS:
        key = prefix + name
        value = state_dict.get(key)
        if value is not None and not isinstance(value, DTensor):
            state_dict[key] = DTensor.from_local(value, mesh, [Shard(0)], run_check=False)


def experts_from_state(layer, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs) -> None:
    """``load_state_dict`` pre-hook: this rank's experts from a DTensor (any sharding) or a full ``(E, ...)`` tensor.

    A single-process checkpoint (every expert) thus loads into an expert-parallel layer (each rank keeps its
    experts); a tensor with this rank's ``(E/P, ...)`` rows loads as it is.
    """
    if layer.expert_parallel_group is None:
        return
    from torch.distributed.tensor import DTensor, Shard

    local = slice(layer.first_expert, layer.first_expert + layer.num_local_experts)
    for name in EXPERT_PARAMETERS:
        key = prefix + name
        value = state_dict.get(key)
        if value is None:
            continue
        if isinstance(value, DTensor):
            same = value.device_mesh.size() == layer.expert_parallel_group.size()
            if tuple(value.placements) == (Shard(0),) and same:
                value = value.to_local()
            else:
                value = value.full_tensor()[local]  # a collective: every rank loads
        elif value.dim() and value.shape[0] == layer.num_experts != layer.num_local_experts:
            value = value[local]
        state_dict[key] = value


def _expert_parallel_layers(model):
    from .moe import moe_layers

    return [m for m in moe_layers(model) if m.expert_parallel_group is not None]


def expert_parameter_names(model) -> List[str]:
    """The names (as in ``model.named_parameters()``) of the experts of every expert-parallel layer of ``model``.

    These differ between the ranks of an expert-parallel group: data parallelism must leave them alone
    (`exclude_experts_from_ddp`) and reduce their gradients over the data-parallel group only
    (`reduce_expert_gradients`).
    """
    layers = {id(m) for m in _expert_parallel_layers(model)}
    names = []
    for module_name, module in model.named_modules():
        if id(module) in layers:
            names += [f"{module_name}.{p}" if module_name else p for p in EXPERT_PARAMETERS]
    return names


def exclude_experts_from_ddp(model) -> List[str]:
    """Make ``DistributedDataParallel(model)`` (built afterwards) skip the experts; returns their names.

    DDP all-reduces every other parameter (the routers, attention, embeddings) over its process group, as usual.
    """
    from torch.nn.parallel import DistributedDataParallel

    names = expert_parameter_names(model)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


def reduce_expert_gradients(model, data_parallel_group=None) -> None:
    r"""Turn each expert's gradient into the gradient of the mean loss over all ``W = DP x P`` ranks.

    After the backward, an expert's gradient on its rank is the sum over its expert-parallel group's ranks
    of their losses' gradients (the reverse all-to-all brings them). Data parallelism (DDP) averages every
    other parameter's gradient over the ``W`` ranks; this sums the experts' gradients over
    ``data_parallel_group`` (the ranks that hold the same experts: None when every rank is in one
    expert-parallel group) and divides by ``W``, so that every parameter steps on the same mean loss. Call it
    between ``backward()`` and ``optimizer.step()``.
    """
    dist = _dist()
    for layer in _expert_parallel_layers(model):
        dp = 1 if data_parallel_group is None else dist.get_world_size(data_parallel_group)
        world = dp * layer.expert_parallel_group.size()
        for name in EXPERT_PARAMETERS:
            grad = getattr(layer, name).grad
            if grad is None:
                continue
            if data_parallel_group is not None:
                _collective(data_parallel_group, "all_reduce of the expert gradients",
                            lambda g=grad: dist.all_reduce(g, group=data_parallel_group))
            grad.div_(world)


def _all_gather_rows(t: Tensor, group) -> Tensor:
    """The ``(P * rows, *)`` concatenation over the group's ranks of each rank's ``t`` (the same shape on each)."""
    dist = _dist()
    parts = [torch.empty_like(t) for _ in range(group.size())]
    _collective(group, "all_gather of the experts", lambda: dist.all_gather(parts, t.contiguous(), group=group))
    return torch.cat(parts)


def gather_experts(model) -> None:
    """Collective (every rank): the next ``model.state_dict()`` holds every expert as a full ``(E, ...)`` tensor.

    For a trainer that saves one file from one rank (fairseq): that file then loads at any P, or in one process
    (``load_state_dict`` keeps each rank's experts). Without this call, ``state_dict()`` holds DTensor views
    for ``torch.distributed.checkpoint``.
    """
    for layer in _expert_parallel_layers(model):
        group = layer.expert_parallel_group
        layer._group.full = {name: _all_gather_rows(getattr(layer, name).detach(), group)
                             for name in EXPERT_PARAMETERS}


def _expert_params(model) -> dict:
    """``id(parameter) -> (layer, name)`` for the experts of the expert-parallel layers of ``model``."""
    return {id(getattr(layer, name)): layer for layer in _expert_parallel_layers(model) for name in EXPERT_PARAMETERS}


def gather_optimizer_state(model, optimizer) -> dict:
    """Collective: ``optimizer.state_dict()`` with the experts' per-expert state (tensors shaped like the expert
    parameter, e.g. Adam's moments) gathered into full ``(E, ...)`` tensors, as in a single-process run."""
    experts = _expert_params(model)
    state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, p in enumerate(params):
        layer = experts.get(id(p))
        if layer is None:
            continue
        # optimizer.state_dict() holds the live state's dicts: a copy, so the optimizer keeps its own rows
        entries = state["state"][index] = dict(state["state"].get(index, {}))
        for key, value in sorted(entries.items()):
            if isinstance(value, Tensor) and value.shape == p.shape:
                entries[key] = _all_gather_rows(value, layer.expert_parallel_group)
    return state


def shard_optimizer_state(model, optimizer, state: dict) -> dict:
    """The inverse of `gather_optimizer_state` (no communication): each rank's rows of the full per-expert state,
    for ``optimizer.load_state_dict``. A state already shaped like this rank's experts is left as it is."""
    experts = _expert_params(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, p in enumerate(params):
        layer = experts.get(id(p))
        if layer is None:
            continue
        local = slice(layer.first_expert, layer.first_expert + layer.num_local_experts)
        if index not in state["state"]:
            continue
        entries = state["state"][index] = dict(state["state"][index])
        for key, value in list(entries.items()):
            if isinstance(value, Tensor) and value.dim() and value.shape[0] == layer.num_experts \
                    and value.shape[1:] == p.shape[1:] and value.shape != p.shape:
                entries[key] = value[local].clone()
    return state


def expert_grad_square_norms(model):
    """``(this rank's, the group's)``: the squared L2 norm of the experts' gradients on this rank, and summed over
    each layer's expert-parallel group (one all-reduce per layer), as float32 0-d tensors.

    A gradient-norm clipper that sees only this rank's experts computes a different norm on each rank (and
    clips the replicated parameters differently): ``total^2 - local + group`` is the whole model's norm.
    """
    dist = _dist()
    local = every = torch.zeros((), dtype=torch.float32)
    for layer in _expert_parallel_layers(model):
        grads = [getattr(layer, name).grad for name in EXPERT_PARAMETERS]
        mine = sum((g.float().pow(2).sum() for g in grads if g is not None),
                   torch.zeros((), dtype=torch.float32, device=layer.fc1_weight.device))
        summed = mine.clone()
        _collective(layer.expert_parallel_group, "all_reduce of the expert gradient norms",
                    lambda t=summed, g=layer.expert_parallel_group: dist.all_reduce(t, group=g))
        local, every = local.to(mine.device) + mine, every.to(mine.device) + summed
    return local, every


def clip_grad_norm_(model, max_norm: float, norm_type: float = 2.0) -> Tensor:
    r"""``torch.nn.utils.clip_grad_norm_`` over every parameter of ``model``, the experts of every rank counted.

    ``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)`` on an expert-parallel model sees only this
    rank's experts: each rank computes another norm and scales the replicated parameters (router, attention)
    by another factor, so the replicas drift apart silently. This computes the norm of the whole model's
    gradient (the non-expert gradients as they are, the same on every rank after DDP; the experts' summed
    over each layer's expert-parallel group, one all-reduce per distinct group), the same number on every
    rank, and scales every gradient by ``min(1, max_norm / (norm + 1e-6))`` like torch. Call it after
    `reduce_expert_gradients` (collective: every rank of the groups).

    Args:
        model: an ``nn.Module``.
        max_norm: a finite real >= 0.
        norm_type: a real > 0, or ``math.inf`` (the largest absolute value).

    Returns:
        the total norm before clipping, a float32 0-d tensor (float64 when the gradients are).

    Examples:
        >>> from reinmax import RoutedFeedForward
        >>> layer = RoutedFeedForward(4, 8, 2)  # no group: torch.nn.utils.clip_grad_norm_'s numbers
        >>> layer(torch.randn(3, 4)).pow(2).sum().backward()
        >>> norm = clip_grad_norm_(layer, max_norm=1e-3)
        >>> bool(norm > 1e-3), torch.nn.utils.get_total_norm([p.grad for p in layer.parameters()]) <= 1e-3
        (True, tensor(True))
    """
    from .moe import _check_model

    model = _check_model(model)
    max_norm = validation.as_real("max_norm", max_norm, low=0.0)
    norm_type = validation.as_real("norm_type", norm_type, low=0.0, low_open=True, finite=False)
    dist = _dist()
    experts = _expert_params(model)
    params = [p for p in model.parameters() if p.grad is not None]
    dtype = torch.float64 if any(p.grad.dtype == torch.float64 for p in params) else torch.float32
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inf = norm_type == float("inf")

    def part(grads) -> Tensor:  # max |g| (inf) or sum |g|^p, over the gradients given
        values = [torch.linalg.vector_norm(g.to(dtype), norm_type).to(device) for g in grads]
        if not values:
            return torch.zeros((), dtype=dtype, device=device)
        stacked = torch.stack(values)
        return stacked.max() if inf else stacked.pow(norm_type).sum()

    total = part([p.grad for p in params if id(p) not in experts])
    # every layer's group takes part, with or without gradients here: the all-reduces are the same on every rank
    by_group: dict = {}
    for layer in _expert_parallel_layers(model):
        grads = [getattr(layer, name).grad for name in EXPERT_PARAMETERS]
        entry = by_group.setdefault(id(layer.expert_parallel_group), (layer.expert_parallel_group, []))
        entry[1].extend(g for g in grads if g is not None)
    for group, grads in by_group.values():
        mine = part(grads)
        op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
        _collective(group, "all_reduce of the expert gradient norms", lambda: dist.all_reduce(mine, op=op, group=group))
        total = torch.maximum(total, mine) if inf else total + mine
    norm = total if inf else total.pow(1.0 / norm_type)
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(scale.to(p.grad.dtype))
    return norm
