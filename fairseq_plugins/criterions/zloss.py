"""Criteria ``cross_entropy_zloss`` and ``label_smoothed_cross_entropy_zloss``: the stock ones plus z-loss.

z-loss (PaLM; Wortsman et al. 2023's remedy for output-logit divergence) adds ``--z-loss W`` times
``log(Z)^2`` per target position (a bad value: one line, exit 2), ``Z`` the softmax normaliser of the output
logits (`stability_toolbox.z_loss`, whose [`log_z`][stability_toolbox.log_z] computes it). fairseq's criteria
return a loss *summed* over the non-padding target positions (the trainer divides by the sample size), so the
term is summed over the same positions:
``loss = stock loss + W * sum_{t not pad} logsumexp(logits_t)^2``. ``--z-loss 0`` gives exactly the stock
criterion (no term is computed). The term is logged as ``z_loss`` (per sample-size unit, base e);
``loss``/``nll_loss``/``ppl`` stay the stock criterion's values plus nothing else but the term in ``loss``.

Flags are checked when the command line is parsed, before any data loads (one line naming the flag, exit
status 2; from Python the constructors raise the same ``ValueError``): ``--z-loss`` a finite real >= 0;
``--label-smoothing`` a real in ``[0, 1]`` (torch's range; checked for the stock
``label_smoothed_cross_entropy`` too, which would otherwise train with any value); ``--ignore-prefix-size``
an integer >= 0; and ``--adaptive-softmax-cutoff`` is refused with these criteria (the decoder's output is
then not the vocabulary logits z-loss needs).

Example:

    fairseq-train data-bin --user-dir fairseq_plugins --task language_modeling --arch transformer_lm_admin \\
        --criterion cross_entropy_zloss --z-loss 1e-4 ...
"""

from dataclasses import dataclass, field

from fairseq import metrics
from fairseq.criterions import CRITERION_REGISTRY, register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig
from fairseq.criterions.label_smoothed_cross_entropy import (LabelSmoothedCrossEntropyCriterion,
                                                             LabelSmoothedCrossEntropyCriterionConfig)
from fairseq.dataclass import FairseqDataclass

from stability_toolbox.z_loss import DEFAULT_Z_LOSS, log_z
from toolbox_core import validation

from ..flags import FlagError, check_flag, flag_check
from ..registry import register_once

__all__ = ["ZLoss", "ZLossConfig", "CrossEntropyZLoss", "LabelSmoothedCrossEntropyZLoss", "check_z_loss_flags"]


@dataclass
class ZLossConfig(FairseqDataclass):
    """``--z-loss``, declared once; each criterion's config adds it to the stock criterion's."""

    z_loss: float = field(default=DEFAULT_Z_LOSS, metadata={
        "help": "z-loss weight: adds W * log(Z)^2 per target position (1e-4 in PaLM and Wortsman et al. 2023; 0: off)"})


@dataclass
class CrossEntropyZLossConfig(ZLossConfig, CrossEntropyCriterionConfig):
    pass


@dataclass
class LabelSmoothedCrossEntropyZLossConfig(ZLossConfig, LabelSmoothedCrossEntropyCriterionConfig):
    pass


def _weight(value) -> float:
    return check_flag("--z-loss", validation.as_real, value, low=0.0)


def _label_smoothing(value) -> float:
    return check_flag("--label-smoothing", validation.as_real, value, low=0.0, high=1.0)


def _ignore_prefix_size(value) -> int:
    return check_flag("--ignore-prefix-size", validation.as_int, value, minimum=0)


@flag_check
def check_z_loss_flags(args) -> None:
    """The flags of a command line whose criterion is one of these (or the stock label-smoothed one): one
    line naming the flag, exit 2, before data loads."""
    criterion = str(getattr(args, "criterion", ""))
    if criterion.endswith("_zloss"):
        _weight(getattr(args, "z_loss", DEFAULT_Z_LOSS))
        if getattr(args, "adaptive_softmax_cutoff", None):
            raise FlagError(f"--adaptive-softmax-cutoff is not accepted with --criterion {criterion} (z-loss needs "
                            "the full vocabulary logits; drop the cutoff or use --criterion adaptive_loss)")
    if criterion.startswith("label_smoothed_cross_entropy"):
        _label_smoothing(getattr(args, "label_smoothing", 0.0))
        _ignore_prefix_size(getattr(args, "ignore_prefix_size", 0))


class ZLoss:
    """Mixin for a fairseq criterion: ``compute_loss`` adds ``z_loss * sum log(Z)^2`` over non-padding targets."""

    def _z_term(self, model, net_output, sample):
        if getattr(getattr(model, "decoder", None), "adaptive_softmax", None) is not None:
            raise ValueError("--z-loss: a decoder with an adaptive softmax has no full vocabulary logits "
                             "(--adaptive-softmax-cutoff is not accepted with the z-loss criteria)")
        logits = net_output[0]
        target = model.get_targets(sample, net_output)
        prefix = getattr(self, "ignore_prefix_size", 0)
        if prefix > 0:  # the positions label_smoothed_cross_entropy scores
            logits, target = logits[:, prefix:], target[:, prefix:]
        keep = target.ne(self.padding_idx)
        return self.z_loss * log_z(logits).pow(2).masked_fill(~keep, 0.0).sum()  # log Z in float32 or wider

    def compute_loss(self, model, net_output, sample, reduce=True):
        out = super().compute_loss(model, net_output, sample, reduce=reduce)
        if self.z_loss == 0.0:
            self._last_z = None
            return out
        if not reduce:
            raise ValueError("--z-loss: the criterion supports reduce=True only (fairseq's training path)")
        term = self._z_term(model, net_output, sample)
        self._last_z = term.detach()
        if isinstance(out, tuple):
            return (out[0] + term.to(out[0].dtype),) + tuple(out[1:])
        return out + term.to(out.dtype)

    def forward(self, model, sample, reduce=True):
        self._last_z = None
        loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
        if self._last_z is not None:
            logging_output["z_loss"] = self._last_z
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        if any("z_loss" in log for log in logging_outputs):
            sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
            total = sum(float(log.get("z_loss", 0)) for log in logging_outputs)
            metrics.log_scalar("z_loss", total / max(sample_size, 1), sample_size, round=5)


@register_once(CRITERION_REGISTRY, register_criterion, "cross_entropy_zloss", dataclass=CrossEntropyZLossConfig)
class CrossEntropyZLoss(ZLoss, CrossEntropyCriterion):
    """``cross_entropy`` plus z-loss (module docstring)."""

    def __init__(self, task, sentence_avg, z_loss=DEFAULT_Z_LOSS):
        z_loss = _weight(z_loss)
        super().__init__(task, sentence_avg)
        self.z_loss = z_loss


@register_once(CRITERION_REGISTRY, register_criterion, "label_smoothed_cross_entropy_zloss",
               dataclass=LabelSmoothedCrossEntropyZLossConfig)
class LabelSmoothedCrossEntropyZLoss(ZLoss, LabelSmoothedCrossEntropyCriterion):
    """``label_smoothed_cross_entropy`` plus z-loss (module docstring)."""

    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0, report_accuracy=False,
                 z_loss=DEFAULT_Z_LOSS):
        z_loss = _weight(z_loss)  # every check before the stock criterion is set up
        label_smoothing = _label_smoothing(label_smoothing)
        ignore_prefix_size = _ignore_prefix_size(ignore_prefix_size)
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size=ignore_prefix_size,
                         report_accuracy=report_accuracy)
        self.z_loss = z_loss
