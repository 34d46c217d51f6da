#!/usr/bin/env python
"""Accuracy of a trained ``listops_tree`` checkpoint on a ListOps file (greedy trees).

Default test file: the official ``test_d20s.tsv`` beside the repository, when present.
Prints accuracy, sentences/second and accuracy by length bucket; ``--json`` writes them.

Example::

    python recipes/listops/evaluate.py --checkpoint /tmp/ck_reinmax/checkpoint_last.pt
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
OFFICIAL_TEST = REPO.parent / "shared" / "data" / "listops" / "test_d20s.tsv"


def evaluate(model, dictionary, examples, max_tokens=4000, progress=False):
    """Greedy predictions of ``model`` (a ListOpsTreeModel) on ``examples``; returns a list of ints.

    Every example is checked first: an expression that is not well-formed ListOps (an operator
    without an argument such as ``( [MAX ] )``, an unknown token, unbalanced parentheses) is a
    ValueError naming the example and its expression, before the model runs. ``max_tokens`` is an
    integer >= 1.
    """
    import torch
    from fairseq.data import data_utils

    from toolbox_core import validation
    from listops_data import ListOpsExample, parse_expression

    max_tokens = validation.as_int("max_tokens", max_tokens, minimum=1)
    examples = list(examples)
    for i, ex in enumerate(examples):
        if not isinstance(ex, ListOpsExample):
            raise TypeError(f"examples[{i}] must be a ListOpsExample, got {type(ex).__name__}")
        try:
            parse_expression(ex.expression.split())
        except ValueError as e:
            raise ValueError(f"examples[{i}]: expression {ex.expression[:200]!r} is not well-formed ListOps: {e}") \
                from None
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].tokens))
    preds = [None] * len(examples)
    batch, done = [], 0

    def flush():
        nonlocal done
        toks = [torch.tensor([dictionary.index(t) for t in examples[i].tokens]) for i in batch]
        src = data_utils.collate_tokens(toks, dictionary.pad(), left_pad=False)
        lengths = torch.tensor([len(t) for t in toks])
        with torch.no_grad():
            out = model(src, lengths).argmax(-1).tolist()
        for i, p in zip(batch, out):
            preds[i] = p
        done += len(batch)
        if progress:
            print(f"\r{done}/{len(examples)}", end="", file=sys.stderr, flush=True)
        batch.clear()

    for i in order:
        if batch and (len(batch) + 1) * len(examples[i].tokens) > max_tokens:
            flush()
        batch.append(i)
    if batch:
        flush()
    if progress:
        print(file=sys.stderr)
    return preds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--test", default=str(OFFICIAL_TEST), help=f"ListOps .tsv file (default {OFFICIAL_TEST})")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N lines (0: all)")
    p.add_argument("--max-tokens", type=int, default=4000, help="padded tokens per evaluation batch")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    import fairseq_plugins  # noqa: F401  registers the task/model and the safe checkpoint loader
    from fairseq import checkpoint_utils
    from listops_data import read_listops

    test = Path(args.test)
    if not test.exists():
        sys.exit(f"test file {test} not found (pass --test FILE)")
    if args.limit < 0:
        p.error(f"--limit must be >= 0 (0: all), got {args.limit}")
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    examples = read_listops(test)
    if args.limit:
        examples = examples[:args.limit]
    if not examples:
        sys.exit(f"test file {test} holds no example")
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [args.checkpoint], arg_overrides={"data": str(test.parent)})
    model = models[0]
    start = time.perf_counter()
    preds = evaluate(model, task.source_dictionary, examples, args.max_tokens, progress=True)
    seconds = time.perf_counter() - start
    correct = [p == ex.label for p, ex in zip(preds, examples)]
    buckets = {}
    for ok, ex in zip(correct, examples):
        n = len(ex.tokens)
        key = "<=50" if n <= 50 else "51-100" if n <= 100 else "101-200" if n <= 200 else ">200"
        buckets.setdefault(key, []).append(ok)
    result = {
        "checkpoint": args.checkpoint, "test": str(test), "examples": len(examples),
        "accuracy": 100.0 * sum(correct) / len(correct), "eval_seconds": seconds,
        "eval_sentences_per_second": len(examples) / seconds,
        "accuracy_by_length": {k: {"n": len(v), "accuracy": 100.0 * sum(v) / len(v)} for k, v in buckets.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
