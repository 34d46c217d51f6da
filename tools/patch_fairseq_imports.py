"""Defer fairseq 0.12.3's scikit-learn and SciPy imports to their first use, in the installed package.

``import fairseq`` imports every criterion and task module. Two of them import scikit-learn (and through it
``scipy.stats``) at module level for metrics that only they compute: ``criterions/sentence_prediction.py``
(F1, Matthews, Pearson and Spearman correlations of GLUE-style runs) and ``tasks/audio_classification.py``
(a ROC curve). That is about 0.7 s of CPU at the start of every ``fairseq-*`` tool, a quarter of
``fairseq-train --help``. Each import moves into the function that uses it: the metrics are the same
functions, imported on their first call, and a tool that computes none of them never imports scikit-learn.

Usage (``make install`` runs it after installing fairseq)::

    python tools/patch_fairseq_imports.py [FAIRSEQ_DIR]   # default: the fairseq this Python imports

Idempotent; exits 2 with one line if FAIRSEQ_DIR holds no fairseq, or a file differs from fairseq 0.12.3's.
"""

import importlib.util
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

_LAZY_SENTENCE_METRICS = '''\
def f1_score(*args, **kwargs):  # deferred imports: tools/patch_fairseq_imports.py
    from sklearn.metrics import f1_score as metric
    return metric(*args, **kwargs)


def _matthews_corrcoef(*args, **kwargs):
    from sklearn.metrics import matthews_corrcoef as metric
    return metric(*args, **kwargs)


def pearsonr(*args, **kwargs):
    from scipy.stats import pearsonr as metric
    return metric(*args, **kwargs)


def spearmanr(*args, **kwargs):
    from scipy.stats import spearmanr as metric
    return metric(*args, **kwargs)
'''

# file (relative to the package) -> [(original text, replacement)]
REPAIRS: Dict[str, List[Tuple[str, str]]] = {
    "criterions/sentence_prediction.py": [
        ("from sklearn.metrics import f1_score\n"
         "from sklearn.metrics import matthews_corrcoef as _matthews_corrcoef\n"
         "from scipy.stats import pearsonr, spearmanr\n", ""),
        # where the module's functions start, after its imports
        ("\n\ndef simple_accuracy(", "\n\n" + _LAZY_SENTENCE_METRICS + "\n\ndef simple_accuracy("),
    ],
    "tasks/audio_classification.py": [
        ("from sklearn import metrics as sklearn_metrics\n", ""),
        ("fpr, tpr, thresholds = sklearn_metrics.roc_curve(",
         "from sklearn import metrics as sklearn_metrics  # deferred: tools/patch_fairseq_imports.py\n"
         "            fpr, tpr, thresholds = sklearn_metrics.roc_curve("),
    ],
}
MARK = "tools/patch_fairseq_imports.py"


def patch(root: Path) -> int:
    """Repair the files of ``root`` (a fairseq package directory); the number of files changed (0: already
    repaired). Raises ValueError naming the file if one is neither fairseq 0.12.3's nor repaired, before
    any file is changed."""
    todo = {}
    for name, repairs in REPAIRS.items():
        path = root / name
        with open(path, encoding="utf-8", newline="") as f:  # its own line endings (fairseq's files use CRLF)
            text = f.read()
        if MARK in text:
            continue
        eol = "\r\n" if "\r\n" in text else "\n"
        repairs = [(old.replace("\n", eol), new.replace("\n", eol)) for old, new in repairs]
        missing = [old for old, _ in repairs if text.count(old) != 1]
        if missing:
            raise ValueError(f"{path}: not fairseq 0.12.3's file (expected once: {missing[0].strip()!r})")
        for old, new in repairs:
            text = text.replace(old, new)
        todo[path] = text
    for path, text in todo.items():
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    return len(todo)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1:
        print("usage: python tools/patch_fairseq_imports.py [FAIRSEQ_DIR]", file=sys.stderr)
        return 2
    if argv:
        root = Path(argv[0])
    else:
        spec = importlib.util.find_spec("fairseq")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            print("patch_fairseq_imports: error: fairseq is not installed for this Python", file=sys.stderr)
            return 2
        root = Path(list(spec.submodule_search_locations)[0])
    if not all((root / name).is_file() for name in REPAIRS):
        print(f"patch_fairseq_imports: error: {root} is not a fairseq package (no {' or '.join(REPAIRS)})",
              file=sys.stderr)
        return 2
    try:
        count = patch(root)
    except ValueError as err:
        print(f"patch_fairseq_imports: error: {err}", file=sys.stderr)
        return 2
    print(f"patch_fairseq_imports: {root}: {count} file(s) repaired" if count
          else f"patch_fairseq_imports: {root}: already repaired")
    return 0


if __name__ == "__main__":
    sys.exit(main())
