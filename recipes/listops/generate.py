#!/usr/bin/env python
"""Generate ListOps examples (official distribution) as ``label<TAB>expression`` lines.

Pure Python (:mod:`listops_data`): imports neither torch nor fairseq.

Example::

    python recipes/listops/generate.py --num-examples 90000 --seed 1 --output data/train.tsv --max-length 100
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from listops_data import generate, read_listops, write_listops  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-examples", type=int, required=True, help="how many unique examples")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--output", required=True, help="output .tsv file ('-' for stdout)")
    p.add_argument("--max-depth", type=int, default=20, help="depth cap; nodes there are values (default 20)")
    p.add_argument("--max-args", type=int, default=5, help="most arguments of an operator (default 5)")
    p.add_argument("--operator-prob", type=float, default=0.25,
                   help="probability that a node below the cap is an operator (default 0.25, official)")
    p.add_argument("--min-length", type=int, default=1, help="fewest tokens without parentheses")
    p.add_argument("--max-length", type=int, default=None, help="most tokens without parentheses")
    p.add_argument("--min-depth", type=int, default=1, help="keep only trees at least this deep")
    p.add_argument("--allow-value-root", action="store_true", help="allow bare-digit expressions")
    p.add_argument("--exclude", action="append", default=[],
                   help="a .tsv file whose expressions must not be generated (repeatable), e.g. the test set")
    args = p.parse_args(argv)
    exclude = set()
    for path in args.exclude:
        exclude.update(ex.expression for ex in read_listops(path))
    examples = generate(args.num_examples, args.seed, max_depth=args.max_depth, max_args=args.max_args,
                        operator_prob=args.operator_prob, min_length=args.min_length, max_length=args.max_length,
                        min_depth=args.min_depth, allow_value_root=args.allow_value_root, exclude=exclude,
                        progress=args.output != "-")
    if args.output == "-":
        for ex in examples:
            print(ex)
    else:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_listops(args.output, examples)
        print(f"wrote {len(examples)} examples to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
