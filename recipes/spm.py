#!/usr/bin/env python
"""Text steps of the recipes: normalize, train a joint sentencepiece model, encode, decode.

The sentencepiece pip package has no ``spm_train`` / ``spm_encode`` binaries; this script is the
recipes' entry point to its Python API::

    python recipes/spm.py normalize < raw.txt > clean.txt
    python recipes/spm.py train --input train.en train.de --model-prefix out/spm --vocab-size 8000
    python recipes/spm.py encode --model out/spm.model --inputs train.en train.de \\
        --outputs spm/train.en spm/train.de --max-len 250 --max-ratio 2.0
    python recipes/spm.py decode --model out/spm.model < pieces.txt
"""

import argparse
import re
import sys
import unicodedata
from typing import List, Optional

_SPACES = re.compile(r"\s+")


def normalize(line: str) -> str:
    """NFKC, no control characters, single spaces (the recipes' only normalization)."""
    line = unicodedata.normalize("NFKC", line)
    line = "".join(c for c in line if unicodedata.category(c)[0] != "C" or c in " \t")
    return _SPACES.sub(" ", line).strip()


def cmd_normalize(args) -> None:
    for line in sys.stdin:
        sys.stdout.write(normalize(line) + "\n")


def cmd_train(args) -> None:
    import sentencepiece as spm

    if args.vocab_size < 8:
        raise ValueError(f"--vocab-size must be >= 8, got {args.vocab_size}")
    spm.SentencePieceTrainer.train(
        input=",".join(args.input), model_prefix=args.model_prefix, vocab_size=args.vocab_size,
        model_type=args.model_type, character_coverage=args.character_coverage,
        input_sentence_size=args.input_sentence_size, shuffle_input_sentence=True,
        hard_vocab_limit=False,  # small corpora (tests) may not support the requested size
        minloglevel=2,
    )


def cmd_encode(args) -> None:
    import sentencepiece as spm

    if len(args.inputs) != len(args.outputs):
        raise ValueError("--inputs and --outputs must name the same number of files")
    sp = spm.SentencePieceProcessor(model_file=args.model)
    readers = [open(f, encoding="utf-8") for f in args.inputs]
    writers = [open(f, "w", encoding="utf-8") for f in args.outputs]
    kept = dropped = 0
    for lines in zip(*readers):
        pieces: List[List[str]] = [sp.encode(line.strip(), out_type=str) for line in lines]
        lengths = [len(p) for p in pieces]
        if args.max_len and (min(lengths) == 0 or max(lengths) > args.max_len or
                             (args.max_ratio and max(lengths) > args.max_ratio * min(lengths))):
            dropped += 1
            continue
        kept += 1
        for w, p in zip(writers, pieces):
            w.write(" ".join(p) + "\n")
    for f in readers + writers:
        f.close()
    print(f"encoded {kept} lines, dropped {dropped} (length filter)", file=sys.stderr)


def cmd_decode(args) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=args.model)
    for line in sys.stdin:
        sys.stdout.write(sp.decode(line.split()) + "\n")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("normalize", help="stdin -> stdout: NFKC, control characters removed, single spaces")
    p = sub.add_parser("train", help="train a joint sentencepiece model on several files")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument("--input-sentence-size", type=int, default=2_000_000, help="sample this many lines at most")
    p = sub.add_parser("encode", help="encode aligned files into pieces, optionally dropping bad pairs")
    p.add_argument("--model", required=True)
    p.add_argument("--inputs", nargs="+", required=True)
    p.add_argument("--outputs", nargs="+", required=True)
    p.add_argument("--max-len", type=int, default=0, help="drop lines longer than this in pieces (0: keep all)")
    p.add_argument("--max-ratio", type=float, default=0.0, help="with --max-len: drop pairs with a longer length ratio")
    p = sub.add_parser("decode", help="stdin pieces -> stdout text")
    p.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    {"normalize": cmd_normalize, "train": cmd_train, "encode": cmd_encode, "decode": cmd_decode}[args.command](args)


if __name__ == "__main__":
    main()
