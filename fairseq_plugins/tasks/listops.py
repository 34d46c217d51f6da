"""fairseq task ``listops`` (expression in, digit out) and criterion ``listops_cross_entropy``.

The data directory holds ``train.tsv``, ``valid.tsv``, ``test.tsv`` (any ``<split>.tsv`` named by
``--train-subset`` / ``--valid-subset``) in the official ``label<TAB>expression`` format, read by
`listops.read_listops` (a malformed line is an error naming the file and line), where
ListOps' pure-Python data code (generator, parser, evaluator, reader and writer) lives; this module keeps only the
fairseq side. The model reads the tokens without parentheses; the dictionary is fixed (digits, operators, ``]``).

Example:

    fairseq-train DATA --user-dir fairseq_plugins --task listops --arch listops_tree \\
        --criterion listops_cross_entropy --estimator reinmax --tau 1.1 \\
        --optimizer adam --lr 7e-4 --batch-size 16 --clip-norm 5 --max-train-length 100
"""

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fairseq import metrics
from fairseq.criterions import CRITERION_REGISTRY, FairseqCriterion, register_criterion
from fairseq.data import Dictionary, FairseqDataset, data_utils
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import TASK_REGISTRY, FairseqTask, register_task

from toolbox_core import validation
from listops_data import VOCABULARY, read_listops

from ..flags import DataError, FlagError, check_flag, flag_check
from ..registry import register_once

logger = logging.getLogger(__name__)

NUM_CLASSES = 10


def listops_dictionary() -> Dictionary:
    """The fixed source dictionary: fairseq's specials, then the ListOps tokens in a fixed order."""
    d = Dictionary()
    for tok in VOCABULARY:
        d.add_symbol(tok)
    return d


class ListOpsDataset(FairseqDataset):
    """Examples as (token ids, label); batches are right-padded with ``src_lengths``."""

    def __init__(self, tokens, labels, pad: int):
        self.tokens, self.labels, self.pad = tokens, labels, pad
        self.sizes = np.array([len(t) for t in tokens], dtype=np.int64)

    def __getitem__(self, index):
        return {"id": index, "source": self.tokens[index], "target": self.labels[index]}

    def __len__(self):
        return len(self.tokens)

    def num_tokens(self, index):
        return int(self.sizes[index])

    def size(self, index):
        return int(self.sizes[index])

    def ordered_indices(self):
        # length-bucketed batches: the tree model's cost grows with the padded length squared
        return np.lexsort((np.arange(len(self)), self.sizes))

    def collater(self, samples):
        if not samples:
            return {}
        src = data_utils.collate_tokens([s["source"] for s in samples], self.pad, left_pad=False)
        lengths = torch.tensor([len(s["source"]) for s in samples], dtype=torch.long)
        return {
            "id": torch.tensor([s["id"] for s in samples]),
            "nsentences": len(samples),
            "ntokens": int(lengths.sum()),
            "net_input": {"src_tokens": src, "src_lengths": lengths},
            "target": torch.tensor([s["target"] for s in samples], dtype=torch.long),
        }


@dataclass
class ListOpsConfig(FairseqDataclass):
    data: str = field(default="", metadata={"help": "directory with <split>.tsv files (label<TAB>expression)"})
    max_train_length: int = field(default=0, metadata={
        "help": "drop training examples with more tokens (without parentheses) than this; 0 keeps all"})
    check_labels: bool = field(default=False, metadata={
        "help": "fail (file:line) when a label differs from the expression's value"})


@flag_check
def check_listops_flags(args) -> None:
    """The flags of ``--task listops`` (FlagError naming the flag)."""
    if getattr(args, "task", None) != "listops":
        return
    if not args.data or not os.path.isdir(args.data):
        raise FlagError(f"DATA must be a directory holding <split>.tsv files, got {args.data!r}")
    check_flag("--max-train-length", validation.as_int, args.max_train_length, minimum=0)


@register_once(TASK_REGISTRY, register_task, "listops", dataclass=ListOpsConfig)
class ListOpsTask(FairseqTask):
    """ListOps classification: a ListOps expression in, its value (0-9) out."""

    def __init__(self, cfg: ListOpsConfig, dictionary: Dictionary):
        super().__init__(cfg)
        self.dictionary = dictionary

    @classmethod
    def setup_task(cls, cfg: ListOpsConfig, **kwargs):
        if not cfg.data or not os.path.isdir(cfg.data):
            raise ValueError(f"data must be a directory holding <split>.tsv files, got {cfg.data!r}")
        if cfg.max_train_length < 0:
            raise ValueError(f"max_train_length must be >= 0 (0 keeps all), got {cfg.max_train_length}")
        return cls(cfg, listops_dictionary())

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        path = os.path.join(self.cfg.data, f"{split}.tsv")
        if not os.path.exists(path):
            raise FileNotFoundError(f"ListOps split {split!r}: {path} not found")
        examples = read_listops(path, check_labels=self.cfg.check_labels)
        read = len(examples)
        training = split == getattr(self.cfg, "train_subset", "train") or split == "train"
        if training and self.cfg.max_train_length:
            examples = [ex for ex in examples if len(ex.tokens) <= self.cfg.max_train_length]
            logger.info(f"{split}: kept {len(examples)}/{read} examples of at most "
                        f"{self.cfg.max_train_length} tokens")
        if not examples:
            why = (f"all {read} are longer than --max-train-length {self.cfg.max_train_length}"
                   if read else "the file is empty")
            raise DataError(f"ListOps split {split!r} ({path}) has no example: {why}")
        tokens = [torch.tensor([self.dictionary.index(t) for t in ex.tokens], dtype=torch.long) for ex in examples]
        self.datasets[split] = ListOpsDataset(tokens, [ex.label for ex in examples], self.dictionary.pad())
        logger.info(f"{split}: {len(examples)} examples from {path}")
        return self.datasets[split]

    def max_positions(self):
        return None

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return None


@dataclass
class ListOpsCriterionConfig(FairseqDataclass):
    pass


@register_once(CRITERION_REGISTRY, register_criterion, "listops_cross_entropy", dataclass=ListOpsCriterionConfig)
class ListOpsCrossEntropy(FairseqCriterion):
    """Cross-entropy over the 10 labels; logs ``loss`` (base 2, per sentence) and ``accuracy`` (%)."""

    def __init__(self, cfg: ListOpsCriterionConfig, task):
        super().__init__(task)

    def forward(self, model, sample, reduce=True):
        logits = model(**sample["net_input"])
        target = sample["target"]
        loss = F.cross_entropy(logits.float(), target, reduction="sum" if reduce else "none")
        n = target.numel()
        logging_output = {
            "loss": loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": n,
            "sample_size": n,
            "ncorrect": (logits.argmax(-1) == target).sum().item(),
        }
        return loss, n, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
        n = sum(log.get("nsentences", 0) for log in logging_outputs)
        ncorrect = sum(log.get("ncorrect", 0) for log in logging_outputs)
        metrics.log_scalar("loss", loss_sum / max(n, 1) / math.log(2), n, round=3)
        metrics.log_scalar("accuracy", 100.0 * ncorrect / max(n, 1), n, round=2)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
