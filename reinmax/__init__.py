"""reinmax: the ReinMax gradient estimator for categorical samples, its baselines, and layers.

Every estimator maps logits to ``(y_hard, y_soft)``: a one-hot sample carrying the estimator's
gradient, and ``softmax(logits)``. Pick one by name with [`estimate`][reinmax.estimate].

Examples:
    >>> import torch, reinmax
    >>> y_hard, y_soft = reinmax.reinmax(torch.randn(8, 4, requires_grad=True), 1.3)
    >>> y_hard, y_soft = reinmax.estimate("gumbel_softmax", torch.randn(8, 4), 0.5)

Layers with discrete choices: [`CategoricalLayer`][reinmax.CategoricalLayer], [`DiscreteBottleneck`][reinmax.DiscreteBottleneck] and the
latent-tree encoder [`LatentTreeLSTM`][reinmax.LatentTreeLSTM] (which adjacent pair to merge, chosen by any
estimator) and the mixture-of-experts FFN [`RoutedFeedForward`][reinmax.RoutedFeedForward] (which expert a token goes
to: [`route_tokens`][reinmax.route_tokens] with ReinMax, SparseMixer, Switch, straight-through or Gumbel-Softmax). The package carries no data set: ListOps' generator and reader live, free of torch
and fairseq, in the `listops_data` package.

The layer lives in `reinmax.routed_experts`; ``reinmax.moe``, its former name, still names that module (a deprecated
alias, kept for old imports and for models pickled under it).
"""

import sys

from . import expert_parallel
from .baselines import gapped_straight_through, gumbel_rao, gumbel_softmax, straight_through
from .layers import CategoricalLayer, DiscreteBottleneck
from . import routed_experts
from .routed_experts import RoutedFeedForward, RoutingStats, clear_moe_stats, moe_balance_loss, moe_layers, moe_load
from .registry import ESTIMATORS, estimate
from .reinmax_function import ReinMaxFunction, reinmax
from .routing import ROUTER_MIN_TAU, ROUTERS, SPARSE_ROUTERS, TAU_ROUTERS, Routing, balance_loss, route_tokens
from .sampling import sample_categorical
from .tree import BinaryTreeLSTMCell, LatentTreeLSTM, TreeClassifier

__all__ = [
    "ROUTERS",
    "ROUTER_MIN_TAU",
    "SPARSE_ROUTERS",
    "TAU_ROUTERS",
    "clear_moe_stats",
    "expert_parallel",
    "RoutedFeedForward",
    "Routing",
    "RoutingStats",
    "balance_loss",
    "moe_balance_loss",
    "moe_layers",
    "moe_load",
    "route_tokens",
    "BinaryTreeLSTMCell",
    "LatentTreeLSTM",
    "TreeClassifier",
    "CategoricalLayer",
    "DiscreteBottleneck",
    "ESTIMATORS",
    "ReinMaxFunction",
    "estimate",
    "gapped_straight_through",
    "gumbel_rao",
    "gumbel_softmax",
    "reinmax",
    "sample_categorical",
    "straight_through",
]

# the former name of the routed-experts module: ``import reinmax.moe`` and a pickle naming reinmax.moe.RoutedFeedForward
# get the module itself
sys.modules.setdefault(f"{__name__}.moe", routed_experts)


def __getattr__(name: str):
    """PEP 562: ``reinmax.moe``, the deprecated name of `reinmax.routed_experts`."""
    if name == "moe":
        return routed_experts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
