"""Tiny fairseq data made on the spot: a reversal corpus (random words and the same words reversed),
binarized by the real ``fairseq-preprocess`` of the running interpreter's environment.

    data = make_translation_data(work, sizes=(3000, 50, 50), vocab=500)   # data.raw, data.bin
"""

import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["TranslationData", "write_reversal_corpus", "make_translation_data"]

BIN_DIR = Path(sys.executable).parent


@dataclass
class TranslationData:
    raw: Path   # train/valid/test.{src,tgt} as text
    bin: Path   # fairseq-preprocess output, joined dictionary


def write_reversal_corpus(directory: Path, sizes: Sequence[int] = (400, 50, 50), vocab: int = 30,
                          seed: int = 0) -> Path:
    """Write train/valid/test.{src,tgt}: random words and the same words reversed (a learnable task)."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "valid", "test"), sizes):
        with open(directory / f"{split}.src", "w") as src, open(directory / f"{split}.tgt", "w") as tgt:
            for _ in range(n):
                sent = [rng.choice(words) for _ in range(rng.randint(3, 10))]
                src.write(" ".join(sent) + "\n")
                tgt.write(" ".join(reversed(sent)) + "\n")
    return directory


def make_translation_data(root: Path, **corpus_kwargs) -> TranslationData:
    """A reversal corpus under ``root/raw``, binarized by fairseq-preprocess into ``root/bin`` (joined
    dictionary, one worker); RuntimeError with the end of its log when fairseq-preprocess fails."""
    raw = write_reversal_corpus(root / "raw", **corpus_kwargs)
    out = root / "bin"
    tool = BIN_DIR / "fairseq-preprocess"
    if not tool.exists():
        raise RuntimeError(f"{tool} not found: is fairseq installed in {sys.prefix}?")
    cmd = [tool, "--source-lang", "src", "--target-lang", "tgt", "--trainpref", raw / "train",
           "--validpref", raw / "valid", "--testpref", raw / "test", "--destdir", out, "--joined-dictionary",
           "--workers", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    run = subprocess.run([str(c) for c in cmd], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if run.returncode != 0:
        raise RuntimeError(f"fairseq-preprocess exited {run.returncode}:\n{run.stdout[-4000:]}")
    return TranslationData(raw=raw, bin=out)
