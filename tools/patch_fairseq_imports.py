"""Defer fairseq 0.12.3's scikit-learn and SciPy imports to their first use, in the installed package.

``import fairseq`` imports every criterion and task module. Two of them import scikit-learn (and through it
``scipy.stats``) at module level for metrics that only they compute: ``criterions/sentence_prediction.py``
(F1, Matthews, Pearson and Spearman correlations of GLUE-style runs) and ``tasks/audio_classification.py``
(a ROC curve). That is about 0.7 s of CPU at the start of every ``fairseq-*`` tool, a quarter of
``fairseq-train --help``. Each import moves into the function that uses it: the metrics are the same
functions, imported on their first call, and a tool that computes none of them never imports scikit-learn.

Usage (``make install`` runs it after installing fairseq)::

    python tools/patch_fairseq_imports.py [FAIRSEQ_DIR]   # default: the fairseq this Python imports

Idempotent; exits 2 with one line, both files left as they were, if FAIRSEQ_DIR holds no fairseq, a file
differs from fairseq 0.12.3's, a file or its directory is read-only, or a write fails.
"""

import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

from installed_package import package_dir  # tools/installed_package.py, beside this script

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
    repaired). Raises ValueError naming the file if one is neither fairseq 0.12.3's nor repaired, and
    PermissionError if one (or its directory) is read-only, before any file is changed; an OSError while
    writing (a full disk) leaves both files as they were.

    Each file is written to a uniquely named temporary beside it (so a leftover or a concurrent run's temporary
    is never written through) with the file's permission bits, then renamed over it: a symbolic or hard link
    is replaced by the repaired file under this name only, and what it pointed to (a shared cache) stays as
    it is."""
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
        original = text
        for old, new in repairs:
            text = text.replace(old, new)
        todo[path] = (original, text)
    for path in todo:
        # a file without any write bit is read-only on purpose (for root too, who may write it anyway); a link
        # is replaced, not written through, so only its directory needs to be writable
        link = path.is_symlink()
        if not os.access(path.parent, os.W_OK) or not link and (
                not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222):
            raise PermissionError(f"{path}: read-only (the file or its directory); nothing was changed")
    links = {path: os.readlink(path) for path in todo if path.is_symlink()}
    tmps = {}
    try:
        for path, (_, text) in todo.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            tmps[path] = tmp
            with open(fd, "w", encoding="utf-8", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        done = []
        try:
            for path, tmp in tmps.items():
                os.replace(tmp, path)
                done.append(path)
        except OSError:
            for path in done:  # put back what was replaced (a link as the link): both files repaired, or neither
                if path in links:  # os.symlink creates exclusively: a name another process took is an error
                    tmp = tmps[path] = tempfile.mktemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                    os.symlink(links[path], tmp)
                else:
                    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                    tmps[path] = tmp
                    with open(fd, "w", encoding="utf-8", newline="") as f:
                        f.write(todo[path][0])
                    os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
                os.replace(tmp, path)
            raise
    finally:
        for tmp in tmps.values():
            if os.path.lexists(tmp):
                os.unlink(tmp)
    return len(todo)


def main(argv=None) -> int:
    root = package_dir("patch_fairseq_imports", "fairseq", sys.argv[1:] if argv is None else argv, list(REPAIRS))
    if root is None:
        return 2
    try:
        count = patch(root)
    except (ValueError, OSError) as err:  # not fairseq's file, read-only, a full disk: one line, files intact
        print(f"patch_fairseq_imports: error: {err}", file=sys.stderr)
        return 2
    print(f"patch_fairseq_imports: {root}: {count} file(s) repaired" if count
          else f"patch_fairseq_imports: {root}: already repaired")
    return 0


if __name__ == "__main__":
    sys.exit(main())
