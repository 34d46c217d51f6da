"""The mixture-of-experts FFN of the Admin transformers: its ``--moe-*`` flags, their checks, and the layer surgery.

With ``--moe-experts E`` (E >= 1) every FFN of ``transformer_admin`` (encoder and decoder) and of
``transformer_lm_admin`` becomes a [`reinmax.RoutedFeedForward`][reinmax.RoutedFeedForward] with E experts of the
FFN's size (``--encoder/decoder-ffn-embed-dim``), so a token's active parameters are a dense
FFN's. 0 (the default) keeps the dense FFN. The flags:

* ``--moe-router {sparsemixer,switch,straight_through,gumbel_softmax,reinmax}`` (default sparsemixer;
  ``reinmax`` computes every expert for every token: small E only),
* ``--moe-tau`` (straight_through, gumbel_softmax, reinmax; default 1.0),
* ``--moe-balance-weight`` (default 0.01): weight of Switch's load-balancing loss, which the
  criteria ``cross_entropy_moe`` / ``label_smoothed_cross_entropy_moe`` add (and log, with the
  per-expert load); with a weight > 0 training with a stock criterion is refused,
* ``--moe-capacity-factor`` (default 0: no token dropped): a token beyond an expert's
  ``min(tokens, ceil(factor * tokens / E))`` slots is dropped and passes through the residual
  unchanged; any finite factor is accepted, and one >= E drops nothing (the slots are clamped to
  the batch's tokens, exactly: [`reinmax.RoutedFeedForward.capacity`][reinmax.RoutedFeedForward.capacity]).
* ``--moe-expert-parallel-size P`` (default 1): expert parallelism (``reinmax.expert_parallel``).
  The ranks ``kP, ..., kP + P - 1`` share each FFN's experts, each holding ``E / P`` of them, and exchange
  tokens by all-to-all; the ranks that hold the same experts (``j, j + P, ...``) average their gradients.
  Needs ``--ddp-backend c10d`` (or ``pytorch_ddp``: torch's DDP, which then leaves the experts to the
  exchange), ``--distributed-backend gloo`` or ``nccl``, P dividing ``--moe-experts`` and the world size, a
  sparse router, no ``--zero-sharding``, no LayerDrop (each rank would skip other layers) and float32 training
  (``--fp16``, ``--bf16``, ``--memory-efficient-*``, ``--amp`` take the gradient norm over this rank's experts
  only); anything else is one line naming the flag (exit 2) at argument
  parsing. Checkpoints hold every expert (gathered before the save): they resume at any P and load in one
  process (``fairseq-generate``, ``fairseq-eval-lm``), optimizer state included.

With ``--encoder-layerdrop`` / ``--decoder-layerdrop``, a layer skipped in a step adds nothing to
the balance loss or the logged load: the ``*_moe`` criteria clear every layer's routing stats
before each forward.

The layer swap: fairseq's FFN is ``fc2(activation_dropout(activation_fn(fc1(x))))``; ``fc1``
becomes the routed layer (which applies the activation and its dropout to each expert) and the
other three become identities, so the stock ``forward`` runs unchanged. fairseq's
``--scale-fc`` (a LayerNorm inside the FFN) is refused with MoE.

Example:

    fairseq-train data-bin --user-dir fairseq_plugins --arch transformer_admin \\
        --moe-experts 8 --moe-router sparsemixer --criterion label_smoothed_cross_entropy_moe ...
"""

import os
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

import reinmax
from fairseq import utils
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from toolbox_core import validation

from reinmax.routing import ROUTER_MIN_TAU, TAU_ROUTERS

from .flags import FlagError, check_flag, declared_defaults, declared_values

__all__ = ["MoEConfig", "MOE_DEFAULTS", "MOE_CRITERIA", "add_moe_args", "check_moe_args", "install_moe_ffn",
           "expert_parallel_groups"]


@dataclass
class MoEConfig(FairseqDataclass):
    """The ``--moe-*`` flags, declared once: a dataclass model config inherits them
    (``transformer_lm_admin``'s ``TransformerLMAdminConfig``), an args-based model adds them with `add_moe_args`."""

    moe_experts: int = field(default=0, metadata={"help": "experts per FFN (0, the default: the dense FFN)"})
    moe_router: ChoiceEnum(list(reinmax.ROUTERS)) = field(  # type: ignore[valid-type]
        default="sparsemixer",
        metadata={"help": "how a token's expert is chosen and its gradient estimated (default sparsemixer)"})
    moe_tau: float = field(
        default=1.0, metadata={"help": "temperature of straight_through, gumbel_softmax and reinmax (default 1.0)"})
    moe_balance_weight: float = field(
        default=0.01, metadata={"help": "weight of the load-balancing loss added by the *_moe criteria (default 0.01)"})
    moe_capacity_factor: float = field(
        default=0.0, metadata={"help": "expert capacity in units of tokens/E; excess tokens are dropped (default 0: "
                                       "none; >= E: none either)"})
    moe_expert_parallel_size: int = field(
        default=1, metadata={"help": "ranks sharing each FFN's experts, each holding --moe-experts / P of them, "
                                     "tokens exchanged by all-to-all (default 1: every rank holds every expert)"})


#: the ``--moe-*`` arguments and their defaults (`MoEConfig`'s).
MOE_DEFAULTS = declared_defaults(MoEConfig)
#: the criteria that add the balance loss.
MOE_CRITERIA = ("cross_entropy_moe", "label_smoothed_cross_entropy_moe")
_STOCK_CRITERIA = ("cross_entropy", "label_smoothed_cross_entropy")


def add_moe_args(parser) -> None:
    """The ``--moe-*`` flags of an args-based model (``add_args``), generated from `MoEConfig` as fairseq
    generates a dataclass model's (no defaults: the architecture function fills what was not given)."""
    group = parser.add_argument_group("mixture-of-experts FFN (fairseq_plugins.moe_ffn)")
    gen_parser_from_dataclass(group, MoEConfig(), delete_default=True)


def check_moe_args(args) -> None:
    """The ``--moe-*`` flags of a parsed command line (a flag not given: its declared default); `FlagError` names
    the flag and the accepted values. ``args`` is read, not changed."""
    moe = declared_values(args, MoEConfig)
    # every value is checked whether or not --moe-experts turns the feature on: a bad value is a bad command line
    experts = check_flag("--moe-experts", validation.as_int, moe.moe_experts, minimum=0)
    router = check_flag("--moe-router", validation.as_choice, str(moe.moe_router), choices=reinmax.ROUTERS)
    tau = check_flag("--moe-tau", validation.as_real, moe.moe_tau, low=0.0, low_open=True)
    if router in TAU_ROUTERS and tau < ROUTER_MIN_TAU:
        raise FlagError(f"--moe-tau must be a finite real number >= {ROUTER_MIN_TAU:g} with --moe-router {router}, "
                        f"got {tau!r}")
    weight = check_flag("--moe-balance-weight", validation.as_real, moe.moe_balance_weight, low=0.0)
    capacity = check_flag("--moe-capacity-factor", validation.as_real, moe.moe_capacity_factor, low=0.0)
    if capacity > 0 and router == "reinmax":
        raise FlagError("--moe-capacity-factor must be 0 with --moe-router reinmax (it runs every expert on every "
                        "token, so no token is dropped)")
    parallel = check_flag("--moe-expert-parallel-size", validation.as_int, moe.moe_expert_parallel_size, minimum=1)
    if parallel > 1:
        _check_expert_parallel_args(args, parallel, experts, router)
    if experts == 0:
        return
    if getattr(args, "scale_fc", False):
        raise FlagError("--scale-fc is not accepted with --moe-experts (the experts have no inner LayerNorm)")
    criterion = getattr(args, "criterion", None)
    if weight > 0 and criterion in _STOCK_CRITERIA:
        raise FlagError(f"--criterion {criterion} ignores the load-balancing loss of --moe-experts; use "
                        f"--criterion {criterion}_moe (or --moe-balance-weight 0)")


#: the --ddp-backend values that leave the experts to the expert-parallel exchange (torch's DDP with ignored
#: parameters); the others all-reduce every parameter (legacy_ddp, no_c10d) or shard them (fully_sharded)
_EP_DDP_BACKENDS = ("c10d", "pytorch_ddp")


def _world_size(args) -> Optional[int]:
    """The world size the run has or will have; None where the arguments do not say (a command line that leaves it
    to the launcher or to fairseq's default, or a model configuration checked directly)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    launcher = os.environ.get("WORLD_SIZE", "")
    if launcher.isdigit() and int(launcher) > 1 and getattr(args, "distributed_init_method", None) is None:
        return int(launcher)  # torchrun: fairseq_plugins.repairs.launcher_env takes it as it is
    world = getattr(args, "distributed_world_size", None)
    return None if world is None else int(world)


def _check_expert_parallel_args(args, parallel: int, experts: int, router: str) -> None:
    flag = f"--moe-expert-parallel-size {parallel}"
    if experts == 0:
        raise FlagError(f"{flag} needs --moe-experts (a multiple of {parallel})")
    if experts % parallel:
        raise FlagError(f"{flag} must divide --moe-experts {experts} (each rank holds experts / P of them)")
    if router == "reinmax":
        raise FlagError(f"{flag} is not accepted with --moe-router reinmax (it runs every expert on every token; "
                        f"use a sparse router: {', '.join(reinmax.SPARSE_ROUTERS)})")
    world = _world_size(args)
    if world is not None and world % parallel:
        raise FlagError(f"{flag} must divide the world size ({world} ranks: --distributed-world-size or the "
                        f"launcher's WORLD_SIZE)")
    backend = str(getattr(args, "ddp_backend", "c10d"))
    if backend not in _EP_DDP_BACKENDS:
        raise FlagError(f"{flag} needs --ddp-backend c10d or pytorch_ddp (torch's DDP, which leaves the experts to "
                        f"the expert-parallel exchange), got --ddp-backend {backend}")
    sharding = str(getattr(args, "zero_sharding", "none") or "none")
    if sharding != "none":
        raise FlagError(f"{flag} is not accepted with --zero-sharding {sharding} (it shards the optimizer state "
                        f"as if every rank held the same parameters)")
    for name in ("encoder_layerdrop", "decoder_layerdrop"):
        if float(getattr(args, name, 0.0) or 0.0) > 0:
            # fairseq draws the skipped layers from each rank's generator, whose state depends on the rank's
            # batch: the ranks of a group would skip different layers and their exchanges would not pair up
            raise FlagError(f"{flag} is not accepted with --{name.replace('_', '-')} > 0 (the ranks of an "
                            f"expert-parallel group would skip different layers); use --{name.replace('_', '-')} 0")
    for name in ("fp16", "bf16", "memory_efficient_fp16", "memory_efficient_bf16", "amp"):
        if getattr(args, name, False) is True:
            # their optimizers compute the gradient norm (clipping, overflow checks) over this rank's experts
            # only: the ranks would clip and skip differently and their replicated parameters drift apart
            raise FlagError(f"{flag} is not accepted with --{name.replace('_', '-')} (its gradient norm would count "
                            f"this rank's experts only); train in float32")
    comm = getattr(args, "distributed_backend", None)
    if comm is not None and str(comm) not in ("gloo", "nccl"):
        raise FlagError(f"{flag} needs --distributed-backend gloo or nccl (torch.distributed.all_to_all_single), "
                        f"got --distributed-backend {comm}")


#: P -> (this rank's expert-parallel group, its data-parallel group or None): created once per process
_GROUPS: dict = {}


def expert_parallel_groups(parallel: int):
    """This rank's (expert-parallel group, data-parallel group) for P = ``parallel`` (a collective the first time).

    Expert-parallel groups: consecutive ranks ``kP .. kP + P - 1``; data-parallel groups: ``j, j + P, ...`` (the
    ranks that hold the same experts; None when the world is one expert-parallel group).
    """
    if parallel not in _GROUPS:
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        if world % parallel:
            raise FlagError(f"--moe-expert-parallel-size {parallel} must divide the world size ({world} ranks)")
        # every rank creates every group, in the same order (new_group is collective)
        ep = [dist.new_group(list(range(s, s + parallel))) for s in range(0, world, parallel)]
        dp = [dist.new_group(list(range(j, world, parallel))) for j in range(parallel)] if world > parallel else None
        _GROUPS[parallel] = (ep[rank // parallel], None if dp is None else dp[rank % parallel])
        _install_expert_parallel_hooks()
    return _GROUPS[parallel]


def _data_parallel_group():
    return next(iter(_GROUPS.values()))[1] if _GROUPS else None


def _install_expert_parallel_hooks() -> None:
    """Wrap the four places of fairseq's trainer that expert parallelism needs (once, only when it is used)."""
    from fairseq import models, trainer
    from fairseq.optim import fairseq_optimizer

    from .repairs._wrap import wrap_once
    from reinmax import expert_parallel as ep

    def wrapper_of_ddp(make):  # DDP leaves the experts alone: they differ between ranks
        def distributed_model(args, model, process_group, device):
            ep.exclude_experts_from_ddp(model)
            return make(args, model, process_group, device)
        return distributed_model

    def reducing(all_reduce_grads):  # after every backward of the update: the experts' gradients
        def all_reduce_then_experts(self, module):
            all_reduce_grads(self, module)
            ep.reduce_expert_gradients(module, _data_parallel_group())
        return all_reduce_then_experts

    def gathering(consolidate):  # every rank, right before rank 0 saves: every expert and its optimizer state
        def consolidate_with_experts(self):
            ep.gather_experts(self._model)
            self._moe_optimizer_state = ep.gather_optimizer_state(self._model, self.optimizer.optimizer)
            out = consolidate(self)
            if not self.should_save_checkpoint_on_current_rank:  # only the saving rank uses them
                self.__dict__.pop("_moe_optimizer_state", None)
                for layer in reinmax.moe_layers(self._model):
                    layer._group.full = None
            return out
        return consolidate_with_experts

    def with_full_state(state_dict):
        def state_dict_with_experts(self):
            state = state_dict(self)
            full = self.__dict__.pop("_moe_optimizer_state", None)
            if full is not None and state.get("last_optimizer_state") is not None:
                state["last_optimizer_state"]["state"] = full["state"]
            return state
        return state_dict_with_experts

    def sharding(load_state_dict):
        def load_own_experts(self, state_dict, optimizer_overrides=None):
            model = getattr(self, "_moe_model", None)
            if model is not None:
                state_dict = ep.shard_optimizer_state(model, self.optimizer, state_dict)
            return load_state_dict(self, state_dict, optimizer_overrides)
        return load_own_experts

    def global_norm(clip_grad_norm):  # the gradient norm of the whole model: every expert of the group counted
        def clip_grad_norm_with_every_expert(self, max_norm, aggregate_norm_fn=None):
            model = getattr(self, "_moe_model", None)
            if model is None:
                return clip_grad_norm(self, max_norm, aggregate_norm_fn)
            local, every = ep.expert_grad_square_norms(model)

            def with_every_expert(total_norm):
                total = total_norm.float().pow(2) - local + every
                total = total.clamp_min(0).sqrt()
                return total if aggregate_norm_fn is None else aggregate_norm_fn(total)

            return clip_grad_norm(self, max_norm, with_every_expert)
        return clip_grad_norm_with_every_expert

    def remembering(build_optimizer):  # the optimizer must know the model to shard its loaded state
        def build_optimizer_knowing_the_model(self):
            build_optimizer(self)
            self._optimizer._moe_model = self._model
        return build_optimizer_knowing_the_model

    wrap_once(models, "DistributedFairseqModel", wrapper_of_ddp)
    wrap_once(fairseq_optimizer.FairseqOptimizer, "all_reduce_grads", reducing)
    wrap_once(fairseq_optimizer.FairseqOptimizer, "load_state_dict", sharding)
    wrap_once(fairseq_optimizer.FairseqOptimizer, "clip_grad_norm", global_norm)
    wrap_once(trainer.Trainer, "consolidate_optimizer", gathering)
    wrap_once(trainer.Trainer, "state_dict", with_full_state)
    wrap_once(trainer.Trainer, "_build_optimizer", remembering)


def install_moe_ffn(layer: nn.Module, args, embed_dim: int, ffn_dim: int, activation: Optional[str]) -> None:
    """Make the FFN of fairseq transformer ``layer`` a routed mixture of ``args.moe_experts`` experts."""
    experts = int(getattr(args, "moe_experts", 0) or 0)
    if experts == 0:
        return
    capacity = float(args.moe_capacity_factor) or None
    parallel = int(getattr(args, "moe_expert_parallel_size", 1) or 1)
    group = None
    if parallel > 1 and _distributed():
        group = expert_parallel_groups(parallel)[0]
    # else: one process (fairseq-generate, eval-lm on a checkpoint trained with experts in parallel): every expert
    layer.fc1 = reinmax.RoutedFeedForward(
        embed_dim, ffn_dim, experts, router=str(args.moe_router), tau=float(args.moe_tau),
        capacity_factor=capacity, activation=utils.get_activation_fn(activation or "relu"),
        activation_dropout=float(layer.activation_dropout_module.p), expert_parallel_group=group)
    layer.fc2 = nn.Identity()
    layer.activation_fn = _identity
    layer.activation_dropout_module = nn.Identity()


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _identity(x):
    return x
