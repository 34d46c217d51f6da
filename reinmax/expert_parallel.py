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

``torch.compile(fullgraph=True)``: the capacity mode compiles (the exchange is then torch's traceable, differentiable
``torch.distributed._functional_collectives.all_to_all_single``; compiled equals eager, outputs and gradients,
tested at P = 2). Under compile the group's largest C is not read (a host read): every rank of the group must
then give the layer the same number of tokens (a fixed batch shape) of the same dtype; a compiled call checks
both on the device (`same_over_group_compiled`: every rank raises the same RuntimeError otherwise). The
no-capacity mode reads its counts on the host and runs eagerly (``fullgraph=True`` refuses it: compile it without
``fullgraph``, or use a capacity).

FSDP2: `fully_shard_experts` shards each layer's experts over their data-parallel replicas of a ``(dp, ep)``
mesh (and the router like the rest of the model), then ``fully_shard(model, mesh=mesh)``: trains like one
process (tested with AdamW on 4 ranks). The ``state_dict`` and ``load_state_dict`` of such a model are refused by
name (DCP + DDP is the tested checkpoint path); a model without expert-parallel layers, or already sharded by
``fully_shard`` (a second call), is refused before anything is sharded.

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
           "expert_parameter_names", "exclude_experts_from_ddp", "reduce_expert_gradients", "fully_shard_experts",
           "gather_experts", "gather_optimizer_state", "shard_optimizer_state", "expert_grad_square_norms",
           "clip_grad_norm_"]


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
    if torch.compiler.is_compiling():
        # the traceable collective (torch's functional all_to_all_single, differentiable: its backward is the
        # reverse exchange); eager calls keep `_AllToAll`, whose failures name the group
        from torch.distributed import _functional_collectives as funcol

        splits = (None, None) if output_splits is None else (list(output_splits), list(input_splits))
        return funcol.all_to_all_single(x.contiguous(), *splits, group)
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


def same_over_group_compiled(value: int, group, device: torch.device, dtype: Optional[torch.dtype] = None) -> int:
    """``value`` (the capacity C), after checking under torch.compile that every rank of ``group`` has the same
    (and, with ``dtype``, the tokens' dtype, that every rank exchanges the same dtype).

    One traceable all-reduce of ``(value, -value, code, -code)`` (max) and assertions on the device (no host
    read): with different values or dtypes every rank fails the same way (a RuntimeError on the CPU) before the
    exchange, whose blocks would not match in size (gloo aborts the process on such a mismatch).
    """
    from torch.distributed import _functional_collectives as funcol

    code = 0 if dtype is None else dtype_code(dtype)
    both = funcol.all_reduce(torch.tensor([value, -value, code, -code], dtype=torch.int64, device=device), "max",
                             group)
    torch._assert_async(both[0] == -both[1], "under torch.compile every rank of the expert-parallel group must give "
                        "the layer the same number of tokens (the same capacity C); pad the batch, or run eagerly")
    torch._assert_async(both[2] == -both[3], "x must have the same dtype on every rank of the expert-parallel group "
                        "(the tokens are exchanged between them); convert the layer and its input on every rank")
    return value


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
        if full["versions"] != _versions(layer):
            # the gathered copies are of experts changed since (an optimizer step): a stale checkpoint otherwise
            raise ValueError(f"state_dict of an expert-parallel RoutedFeedForward ({prefix or 'the layer'}): its "
                             f"experts changed after gather_experts (e.g. an optimizer step); call "
                             f"gather_experts(model) right before state_dict()")
        for name in EXPERT_PARAMETERS:
            if prefix + name in state_dict:
                state_dict[prefix + name] = full[name]
        return
    if any(isinstance(state_dict.get(prefix + name), DTensor) for name in EXPERT_PARAMETERS):
        # fully_shard_experts: DTensors over the data-parallel ranks of this rank's E/P experts, which do not say
        # where the experts sit among the E: a checkpoint of them would mix up the groups' experts
        raise ValueError(f"state_dict of an expert-parallel RoutedFeedForward ({prefix or 'the layer'}) whose experts "
                         f"are sharded by fully_shard (fully_shard_experts) is not supported; checkpoint the model "
                         f"without FSDP2 over the experts (DDP + expert parallelism) or gather its parameters first")
    mesh = _device_mesh(layer)
    for name in EXPERT_PARAMETERS:
        key = prefix + name
        value = state_dict.get(key)
        if value is not None:
            state_dict[key] = DTensor.from_local(value, mesh, [Shard(0)], run_check=False)


def experts_from_state(layer, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs) -> None:
    """``load_state_dict`` pre-hook: this rank's experts from a DTensor (any sharding) or a full ``(E, ...)`` tensor.

    A single-process checkpoint (every expert) thus loads into an expert-parallel layer (each rank keeps its
    experts); a tensor with this rank's ``(E/P, ...)`` rows loads as it is. Any other number of experts is a
    ValueError naming the key and both counts (before this layer changes; a DTensor's on every rank alike).
    """
    if layer.expert_parallel_group is None:
        return
    from torch.distributed.tensor import DTensor, Shard

    if any(isinstance(getattr(layer, name), DTensor) for name in EXPERT_PARAMETERS):
        # the counterpart of experts_as_dtensors' refusal: FSDP2 over the experts' replicas (fully_shard_experts)
        raise ValueError(f"load_state_dict of an expert-parallel RoutedFeedForward ({prefix or 'the layer'}) whose "
                         f"experts are sharded by fully_shard (fully_shard_experts) is not supported; load the "
                         f"checkpoint before fully_shard_experts (DDP + expert parallelism checkpoints load then)")
    local = slice(layer.first_expert, layer.first_expert + layer.num_local_experts)
    E, E_local, P = layer.num_experts, layer.num_local_experts, layer.expert_parallel_group.size()
    ranks = _dist().get_process_group_ranks(layer.expert_parallel_group)
    for name in EXPERT_PARAMETERS:  # every key checked before any is changed
        value = state_dict.get(prefix + name)
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"state_dict[{prefix + name!r}] must be a torch.Tensor (or DTensor) of experts, got "
                            f"{type(value).__name__}")
        rows = value.shape[0] if value.dim() else None  # a DTensor's shape is its global one
        accepted = (E,) if isinstance(value, DTensor) else (E, E_local)
        if rows not in accepted:
            wanted = f"{E} (every expert)" + ("" if isinstance(value, DTensor) else
                                              f" or {E_local} (this rank's experts {local.start}..{local.stop - 1})")
            raise ValueError(f"state_dict[{prefix + name!r}] must have {wanted} rows for this expert-parallel layer "
                             f"(num_experts={E} over P={P} ranks, E/P={E_local}), got shape {tuple(value.shape)}"
                             f"{' (a DTensor: its global shape)' if isinstance(value, DTensor) else ''}: a "
                             f"checkpoint of a layer with another num_experts")
    for name in EXPERT_PARAMETERS:
        key = prefix + name
        value = state_dict.get(key)
        if value is None:
            continue
        if isinstance(value, DTensor):
            # this rank's rows as they are only when sharded over this very group (the same ranks, in order): a
            # DTensor over another group of the same size (e.g. mesh["dp"] for a layer on mesh["ep"]) holds other
            # experts here
            mesh = value.device_mesh
            same = mesh.ndim == 1 and _dist().get_process_group_ranks(mesh.get_group()) == ranks
            if tuple(value.placements) == (Shard(0),) and same:
                value = value.to_local()
            else:
                value = value.full_tensor()[local]  # a collective: every rank loads
        elif value.dim() and value.shape[0] == layer.num_experts != layer.num_local_experts:
            value = value[local]
        state_dict[key] = value


def _expert_parallel_layers(model):
    from .routed_experts import moe_layers

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
    layers = _expert_parallel_layers(model)
    _refuse_fully_sharded(layers, "reduce_expert_gradients",
                          "FSDP2 already reduced their gradients (dividing again would shrink them)")
    for layer in layers:
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


def _refuse_fully_sharded(layers, what: str, why: str) -> None:
    """ValueError naming ``what`` when a layer's experts are sharded by `fully_shard_experts` (DTensors)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(getattr(layer, name), DTensor) for layer in layers for name in EXPERT_PARAMETERS):
        raise ValueError(f"{what} takes a model whose experts are plain tensors (DDP + expert parallelism), got "
                         f"experts sharded by fully_shard (fully_shard_experts): {why}")


def fully_shard_experts(model, mesh, dp_dim: str = "dp", ep_dim: str = "ep") -> List[object]:
    r"""FSDP2 over the data-parallel replicas of each expert: ``fully_shard`` every expert-parallel layer's experts
    over ``mesh[dp_dim]`` and its router over the whole ``mesh``; then call ``fully_shard(model, mesh=mesh)``.

    On a ``(dp, ep)`` mesh each layer's group is ``mesh[ep_dim]``: a rank holds E/ep experts, which the ``dp``
    ranks along the other dimension hold too (its replicas). This shards them over those replicas (each rank
    keeps ``1/(dp ep)`` of the experts' bytes between forwards, all-gathered over ``dp`` for its forward and
    backward) and reduce-scatters their gradients with a divide factor of ``dp x ep`` (the exchange already
    summed the ``ep`` ranks' gradients), so they are the gradients of the mean loss over every rank. The router
    gets its own ``fully_shard`` on ``mesh`` (HSDP: replicated over ``dp``, sharded over ``ep``, its gradient
    averaged over every rank), like every other parameter under ``fully_shard(model, mesh=mesh)`` afterwards.
    No `reduce_expert_gradients` then: FSDP2 reduces every gradient. Collective (every rank of the mesh).

    Args:
        model: an ``nn.Module`` whose expert-parallel layers' groups are ``mesh[ep_dim]``.
        mesh: a 2-D ``DeviceMesh`` with dimensions named ``dp_dim`` and ``ep_dim``.

    Returns:
        the sharded layers (each an ``FSDPModule``), in module order.

    Raises:
        TypeError: ``mesh`` is not a DeviceMesh.
        ValueError: ``mesh`` is not 2-D with those dimension names, ``model`` has no expert-parallel layer, a
            layer's group is not ``mesh[ep_dim]``, or a layer (or a module holding it) is already sharded by
            ``fully_shard`` (a second call, or ``fully_shard(model)`` first); nothing is sharded then.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from .routed_experts import _check_model

    model = _check_model(model)
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    names = tuple(mesh.mesh_dim_names or ())
    if mesh.ndim != 2 or dp_dim not in names or ep_dim not in names or dp_dim == ep_dim:
        raise ValueError(f"mesh must be a 2-D DeviceMesh with dimensions named {dp_dim!r} (dp_dim) and {ep_dim!r} "
                         f"(ep_dim), got {mesh.ndim}-D with names {names}")
    dist = _dist()
    ep_ranks = dist.get_process_group_ranks(mesh[ep_dim].get_group())
    layers = _expert_parallel_layers(model)
    if not layers:
        from .routed_experts import moe_layers

        found = sum(1 for _ in moe_layers(model))
        raise ValueError(f"model must hold a RoutedFeedForward built with expert_parallel_group=mesh[{ep_dim!r}] "
                         f"for fully_shard_experts, got {found} RoutedFeedForward layers, none expert parallel")
    # a module that holds a layer and is already sharded (a second call, or fully_shard(model) first) owns the
    # experts: sharding them again fails inside torch, and a fully_shard over the 2-D mesh treats the ep ranks'
    # different experts as one tensor (silently mixed experts)
    holders = {id(m) for layer in layers for m in (layer, layer.router)}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule) and (id(module) in holders or any(
                id(inner) in holders for inner in module.modules())):
            raise ValueError(f"model must not be sharded by fully_shard before fully_shard_experts, got "
                             f"{name or 'the model'!r} already sharded (fully_shard_experts called twice, or "
                             f"fully_shard(model) first); call fully_shard_experts once, before fully_shard")
    for layer in layers:  # all checked before any is sharded
        if dist.get_process_group_ranks(layer.expert_parallel_group) != ep_ranks:
            raise ValueError(f"mesh[{ep_dim!r}] must be each expert-parallel layer's group (ranks {ep_ranks}), got a "
                             f"layer on the {group_description(layer.expert_parallel_group)}")
    sharded = []
    for layer in layers:
        fully_shard(layer.router, mesh=mesh)
        layer = fully_shard(layer, mesh=mesh[dp_dim])  # what is left of the layer: its experts
        layer.set_gradient_divide_factor(float(mesh.size()))
        sharded.append(layer)
    return sharded


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
    layers = _expert_parallel_layers(model)
    _refuse_fully_sharded(layers, "gather_experts", "the state_dict of such a model is not supported")
    for layer in layers:
        group = layer.expert_parallel_group
        full = {name: _all_gather_rows(getattr(layer, name).detach(), group) for name in EXPERT_PARAMETERS}
        layer._group.full = dict(full, versions=_versions(layer))


def _versions(layer) -> tuple:
    """The experts' version counters (an in-place change, an optimizer step, increments them)."""
    return tuple(getattr(layer, name)._version for name in EXPERT_PARAMETERS)


def _expert_params(model) -> dict:
    """``id(parameter) -> (layer, name)`` for the experts of the expert-parallel layers of ``model``."""
    return {id(getattr(layer, name)): layer for layer in _expert_parallel_layers(model) for name in EXPERT_PARAMETERS}


def gather_optimizer_state(model, optimizer) -> dict:
    """Collective: ``optimizer.state_dict()`` with the experts' per-expert state (tensors shaped like the expert
    parameter, e.g. Adam's moments) gathered into full ``(E, ...)`` tensors, as in a single-process run."""
    _refuse_fully_sharded(_expert_parallel_layers(model), "gather_optimizer_state",
                          "the state_dict of such a model is not supported")
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


def _value(t: Tensor) -> Tensor:
    """A reduction of (DTensor) gradients as a plain tensor: a DTensor's (sharded by FSDP2: a collective over its
    mesh, every rank of which computes the same reductions in the same order) gathered, a tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


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
        mine = sum((_value(g.float().pow(2).sum()) for g in grads if g is not None),
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
    `reduce_expert_gradients` (collective: every rank of the groups). Under `fully_shard_experts` + FSDP2
    (DTensor gradients) it takes each gradient's norm over its mesh, then the experts' over their groups, and
    scales each rank's shards: the same norm (tested on a (dp=2, ep=2) mesh).

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
    from .routed_experts import _check_model

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
        values = [_value(torch.linalg.vector_norm(g.to(dtype), norm_type)).to(device) for g in grads]
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
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for p in params:  # a DTensor gradient (FSDP2): its local shard, in place
            (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(scale.to(p.grad.dtype))
    return norm
