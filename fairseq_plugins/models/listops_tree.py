"""fairseq model ``listops_tree``: the latent-tree classifier of `reinmax.tree` for task ``listops``.

The tree is built by discrete merge choices made through a ``reinmax`` estimator (``--estimator``,
``--tau``; sampled in training, greedy in evaluation). Train with criterion ``listops_cross_entropy``.
"""

from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import MODEL_REGISTRY, BaseFairseqModel, register_model

from reinmax import ESTIMATORS
from reinmax.tree import TreeClassifier

from toolbox_core import validation

from ..flags import check_flag, flag_check
from ..registry import register_once

ESTIMATOR_CHOICES = ChoiceEnum(sorted(ESTIMATORS))


@dataclass
class ListOpsTreeConfig(FairseqDataclass):
    embed_dim: int = field(default=128, metadata={"help": "token embedding size"})
    hidden_dim: int = field(default=128, metadata={"help": "Tree-LSTM state size (300 in the ReinMax paper)"})
    mlp_dim: int = field(default=128, metadata={"help": "hidden size of the classifier MLP"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on embeddings and in the classifier"})
    estimator: ESTIMATOR_CHOICES = field(default="reinmax", metadata={"help": "merge-choice gradient estimator"})
    tau: float = field(default=1.0, metadata={"help": "estimator temperature (ReinMax: >= 1; paper 1.1)"})
    gap: float = field(default=1.0, metadata={"help": "gap of gapped_straight_through"})
    gumbel_rao_k: int = field(default=10, metadata={"help": "samples of gumbel_rao"})


@flag_check
def check_listops_tree_flags(args) -> None:
    """The flags of ``--arch listops_tree`` (FlagError naming the flag and the accepted values)."""
    if getattr(args, "arch", None) != "listops_tree":
        return
    defaults = ListOpsTreeConfig()

    def value(name: str):  # fairseq's parser leaves out model flags that were not given
        return getattr(args, name, getattr(defaults, name))

    for flag, name in (("--embed-dim", "embed_dim"), ("--hidden-dim", "hidden_dim"), ("--mlp-dim", "mlp_dim"),
                       ("--gumbel-rao-k", "gumbel_rao_k")):
        check_flag(flag, validation.as_int, value(name), minimum=1)
    check_flag("--dropout", validation.as_real, value("dropout"), low=0.0, high=1.0, high_open=True)
    check_flag("--tau", validation.as_real, value("tau"), low=0.0, low_open=True)
    check_flag("--gap", validation.as_real, value("gap"), low=0.0)


@register_once(MODEL_REGISTRY, register_model, "listops_tree", dataclass=ListOpsTreeConfig)
class ListOpsTreeModel(BaseFairseqModel):
    """Thin fairseq wrapper of [`reinmax.TreeClassifier`][reinmax.TreeClassifier]; ``forward`` returns ``(batch, 10)`` logits."""

    def __init__(self, classifier: TreeClassifier):
        super().__init__()
        self.classifier = classifier

    @classmethod
    def build_model(cls, cfg: ListOpsTreeConfig, task):
        name = str(cfg.estimator)
        options = {"gapped_straight_through": {"gap": cfg.gap}, "gumbel_rao": {"k": cfg.gumbel_rao_k}}.get(name, {})
        dictionary = task.source_dictionary
        return cls(TreeClassifier(len(dictionary), num_classes=10, embed_dim=cfg.embed_dim,
                                  hidden_dim=cfg.hidden_dim, mlp_dim=cfg.mlp_dim, padding_idx=dictionary.pad(),
                                  dropout=cfg.dropout, estimator=name, tau=cfg.tau, estimator_options=options))

    def forward(self, src_tokens, src_lengths, **kwargs):
        return self.classifier(src_tokens, src_lengths)

    def max_positions(self):
        return None
