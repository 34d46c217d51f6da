#!/usr/bin/env python
"""Prepare a ListOps data directory for ``fairseq-train --task listops``.

Writes ``DEST/train.tsv`` (generated, excluding the official test and valid expressions) and
links ``DEST/valid.tsv`` and ``DEST/test.tsv`` to the official files of ``--official`` when they
exist (otherwise generates them too). The task reads the text format directly; no binarization.
Pure Python (:mod:`listops_data`): imports neither torch nor fairseq.

Example::

    python recipes/listops/prepare.py --dest /tmp/listops --num-train 20000 --max-length 100
"""

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from listops_data import generate, read_listops, write_listops  # noqa: E402

OFFICIAL = REPO.parent / "shared" / "data" / "listops"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", required=True, help="data directory to create")
    p.add_argument("--num-train", type=int, default=90000, help="generated training examples (default 90000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-length", type=int, default=100,
                   help="most tokens (without parentheses) in a training example (default 100)")
    p.add_argument("--official", default=str(OFFICIAL),
                   help=f"directory with the official test_d20s.tsv and valid.tsv (default {OFFICIAL})")
    p.add_argument("--num-eval", type=int, default=1000, help="size of generated valid/test when no official files")
    args = p.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    official = Path(args.official)
    sources = {"valid": official / "valid.tsv", "test": official / "test_d20s.tsv"}
    exclude = set()
    for split, src in sources.items():
        target = dest / f"{split}.tsv"
        if src.exists():
            exclude.update(ex.expression for ex in read_listops(src))
            if target.is_symlink() or target.exists():
                target.unlink()
            os.symlink(src.resolve(), target)
            print(f"{target} -> {src}", file=sys.stderr)
    for i, (split, src) in enumerate(sources.items()):
        if not src.exists():
            examples = generate(args.num_eval, args.seed + 100 + i, exclude=exclude)
            exclude.update(ex.expression for ex in examples)
            write_listops(dest / f"{split}.tsv", examples)
            print(f"{dest / f'{split}.tsv'}: {len(examples)} generated (no official file at {src})", file=sys.stderr)
    train = generate(args.num_train, args.seed, max_length=args.max_length, exclude=exclude, progress=True)
    write_listops(dest / "train.tsv", train)
    print(f"{dest / 'train.tsv'}: {len(train)} generated examples", file=sys.stderr)


if __name__ == "__main__":
    main()
