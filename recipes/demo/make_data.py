#!/usr/bin/env python
"""Generate the demo's toy translation corpus: a random sentence over an invented source
vocabulary, and its word-by-word translation into a target vocabulary in reverse order.
Learnable, but only with attention across the whole sentence, so a deep encoder-decoder has to
actually train. Writes {train,valid,test}.{src,tgt} in --out.

    python recipes/demo/make_data.py --out DIR --train 4000 --vocab 64
"""

import argparse
import os
import random


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=4000, help="training sentences")
    p.add_argument("--valid", type=int, default=200, help="validation and test sentences (each)")
    p.add_argument("--vocab", type=int, default=64, help="words per language")
    p.add_argument("--min-len", type=int, default=4)
    p.add_argument("--max-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for name in ("train", "valid", "vocab", "min_len"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.max_len < a.min_len:
        raise ValueError(f"--max-len ({a.max_len}) must be >= --min-len ({a.min_len})")
    rng = random.Random(a.seed)
    os.makedirs(a.out, exist_ok=True)
    for split, n in (("train", a.train), ("valid", a.valid), ("test", a.valid)):
        with open(os.path.join(a.out, f"{split}.src"), "w") as src, open(os.path.join(a.out, f"{split}.tgt"), "w") as tgt:
            for _ in range(n):
                words = [rng.randrange(a.vocab) for _ in range(rng.randint(a.min_len, a.max_len))]
                src.write(" ".join(f"s{w}" for w in words) + "\n")
                tgt.write(" ".join(f"t{w}" for w in reversed(words)) + "\n")


if __name__ == "__main__":
    main()
