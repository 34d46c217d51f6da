"""Mixture-of-experts FFNs in the Admin transformers: the ``--moe-*`` flags and the layer surgery.

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

from dataclasses import dataclass, field, fields
from typing import Optional

from torch import nn

import reinmax
from fairseq import utils
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from toolbox_core import validation

from reinmax.routing import ROUTER_MIN_TAU, TAU_ROUTERS

from .flags import FlagError, check_flag

__all__ = ["MoEConfig", "MOE_DEFAULTS", "MOE_CRITERIA", "add_moe_args", "moe_defaults", "check_moe_args",
           "install_moe_ffn"]


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


#: the ``--moe-*`` arguments and their defaults (`MoEConfig`'s).
MOE_DEFAULTS = {f.name: f.default for f in fields(MoEConfig) if f.name != "_name"}
#: the criteria that add the balance loss.
MOE_CRITERIA = ("cross_entropy_moe", "label_smoothed_cross_entropy_moe")
_STOCK_CRITERIA = ("cross_entropy", "label_smoothed_cross_entropy")


def add_moe_args(parser) -> None:
    """The ``--moe-*`` flags of an args-based model (``add_args``), generated from `MoEConfig` as fairseq
    generates a dataclass model's (no defaults: `moe_defaults` fills what was not given)."""
    group = parser.add_argument_group("mixture-of-experts FFN (fairseq_plugins.moe)")
    gen_parser_from_dataclass(group, MoEConfig(), delete_default=True)


def moe_defaults(args) -> None:
    """Fill the ``--moe-*`` values a configuration lacks (``None``: not given)."""
    for name, default in MOE_DEFAULTS.items():
        if getattr(args, name, None) is None:
            try:
                setattr(args, name, default)
            except Exception:  # an OmegaConf struct config without that key keeps its own default
                pass


def check_moe_args(args) -> None:
    """The ``--moe-*`` flags; `FlagError` names the flag and the accepted values."""
    moe_defaults(args)
    # every value is checked whether or not --moe-experts turns the feature on: a bad value is a bad command line
    experts = check_flag("--moe-experts", validation.as_int, args.moe_experts, minimum=0)
    router = check_flag("--moe-router", validation.as_choice, str(args.moe_router), choices=reinmax.ROUTERS)
    tau = check_flag("--moe-tau", validation.as_real, args.moe_tau, low=0.0, low_open=True)
    if router in TAU_ROUTERS and tau < ROUTER_MIN_TAU:
        raise FlagError(f"--moe-tau must be a finite real number >= {ROUTER_MIN_TAU:g} with --moe-router {router}, "
                        f"got {tau!r}")
    weight = check_flag("--moe-balance-weight", validation.as_real, args.moe_balance_weight, low=0.0)
    capacity = check_flag("--moe-capacity-factor", validation.as_real, args.moe_capacity_factor, low=0.0)
    if capacity > 0 and router == "reinmax":
        raise FlagError("--moe-capacity-factor must be 0 with --moe-router reinmax (it runs every expert on every "
                        "token, so no token is dropped)")
    if experts == 0:
        return
    if getattr(args, "scale_fc", False):
        raise FlagError("--scale-fc is not accepted with --moe-experts (the experts have no inner LayerNorm)")
    criterion = getattr(args, "criterion", None)
    if weight > 0 and criterion in _STOCK_CRITERIA:
        raise FlagError(f"--criterion {criterion} ignores the load-balancing loss of --moe-experts; use "
                        f"--criterion {criterion}_moe (or --moe-balance-weight 0)")


def install_moe_ffn(layer: nn.Module, args, embed_dim: int, ffn_dim: int, activation: Optional[str]) -> None:
    """Make the FFN of fairseq transformer ``layer`` a routed mixture of ``args.moe_experts`` experts."""
    experts = int(getattr(args, "moe_experts", 0) or 0)
    if experts == 0:
        return
    capacity = float(args.moe_capacity_factor) or None
    layer.fc1 = reinmax.RoutedFeedForward(
        embed_dim, ffn_dim, experts, router=str(args.moe_router), tau=float(args.moe_tau),
        capacity_factor=capacity, activation=utils.get_activation_fn(activation or "relu"),
        activation_dropout=float(layer.activation_dropout_module.p))
    layer.fc2 = nn.Identity()
    layer.activation_fn = _identity
    layer.activation_dropout_module = nn.Identity()


def _identity(x):
    return x
