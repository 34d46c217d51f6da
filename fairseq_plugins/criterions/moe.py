"""Criteria ``cross_entropy_moe`` and ``label_smoothed_cross_entropy_moe``: the stock ones plus the MoE balance loss.

For a model with mixture-of-experts FFNs (``--moe-experts``), the loss that is back-propagated is
the stock criterion's plus ``--moe-balance-weight * sample_size * B``, where ``B`` is the sum over
the MoE layers of Switch's load-balancing loss ([`reinmax.moe_balance_loss`][reinmax.moe_balance_loss]; 1 per layer
when balanced); multiplying by ``sample_size`` keeps the weight's meaning under fairseq's
per-sample-size gradient normalization. The logged ``loss``/``nll_loss``/``ppl`` stay the stock
criterion's (comparable with a dense model's); added to the log:

* ``moe_balance``: the balance loss averaged over the MoE layers that ran in this call (1: balanced, E: one
  expert; a layer skipped by ``--encoder/decoder-layerdrop`` contributes nothing, to the loss either),
* ``moe_load{i}``: the fraction of tokens routed to expert ``i``, averaged over the layers,
* ``moe_dropped``: the fraction of tokens dropped for capacity.

A model without MoE layers gets exactly the stock criterion. Nothing here reads a tensor on the host.

Example:

    fairseq-train data-bin --user-dir fairseq_plugins --arch transformer_admin --moe-experts 8 \\
        --criterion label_smoothed_cross_entropy_moe --label-smoothing 0.1 ...
"""

import torch

import reinmax
from reinmax.routed_experts import clear_moe_stats
from fairseq import metrics
from fairseq.criterions import CRITERION_REGISTRY, register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig
from fairseq.criterions.label_smoothed_cross_entropy import (LabelSmoothedCrossEntropyCriterion,
                                                             LabelSmoothedCrossEntropyCriterionConfig)

from ..registry import register_once

__all__ = ["MoEBalance", "CrossEntropyMoE", "LabelSmoothedCrossEntropyMoE"]


class MoEBalance:
    """Mixin for a fairseq criterion: adds the weighted balance loss and logs the routing."""

    def forward(self, model, sample, reduce=True):
        # stats belong to this call: a layer LayerDrop skips now (--encoder/decoder-layerdrop) has none, so it adds
        # nothing (not its previous call's balance loss, whose graph the previous backward freed)
        clear_moe_stats(model)
        loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
        layers = [m for m in reinmax.moe_layers(model) if m.stats is not None]
        if not layers:
            return loss, sample_size, logging_output
        balance = torch.stack([m.stats.balance_loss for m in layers])
        weight = float(getattr(model, "moe_balance_weight", 0.0))
        if weight > 0 and model.training:
            loss = loss + weight * sample_size * balance.sum().to(loss.dtype)
        # summed over batches and workers, divided by sample_size in reduce_metrics
        logging_output["moe_balance"] = balance.mean().detach() * sample_size
        load = torch.stack([m.stats.load for m in layers]).mean(0).detach()
        for i, share in enumerate(load.unbind(0)):
            logging_output[f"moe_load{i}"] = share * sample_size
        logging_output["moe_dropped"] = torch.stack([m.stats.dropped for m in layers]).mean().detach() * sample_size
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        keys = sorted({k for log in logging_outputs for k in log if k.startswith("moe_")},
                      key=lambda k: (len(k), k))
        for key in keys:
            total = sum(log.get(key, 0) for log in logging_outputs)
            metrics.log_scalar(key, total / max(sample_size, 1), sample_size, round=3)


@register_once(CRITERION_REGISTRY, register_criterion, "cross_entropy_moe", dataclass=CrossEntropyCriterionConfig)
class CrossEntropyMoE(MoEBalance, CrossEntropyCriterion):
    """``cross_entropy`` plus the MoE balance loss (module docstring)."""


@register_once(CRITERION_REGISTRY, register_criterion, "label_smoothed_cross_entropy_moe",
               dataclass=LabelSmoothedCrossEntropyCriterionConfig)
class LabelSmoothedCrossEntropyMoE(MoEBalance, LabelSmoothedCrossEntropyCriterion):
    """``label_smoothed_cross_entropy`` plus the MoE balance loss (module docstring)."""
