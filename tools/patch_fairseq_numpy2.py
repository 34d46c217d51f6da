"""Repair fairseq-fixed 0.12.3.1 for NumPy 2, in its source tree, before its wheel is built.

NumPy 2 removed ``np.compat`` and NumPy 1.24 the aliases ``np.int`` and ``np.float``. fairseq still
uses them on the paths this toolbox runs: ``--task language_modeling`` and ``fairseq-eval-lm``
(``data/token_block_dataset.py``), ``num_tokens_vec`` of translation data
(``data/language_pair_dataset.py``), batching by shapes (``data/data_utils.py``) and the CRF layer.
Each is replaced by the type it always meant (``np.int64``, ``int``, ``float``), so the repaired fairseq
behaves as before on NumPy 1 and works on NumPy 2, with or without this toolbox's ``--user-dir``.

Usage (``make install`` runs it on the unpacked sdist)::

    python tools/patch_fairseq_numpy2.py SOURCE_DIR    # the directory holding fairseq/ and setup.py

It also tags the version (``0.12.3.1+numpy2``) so that a cached wheel built from the repaired source
is told apart from one that is not. Idempotent; exits 2 with one line if SOURCE_DIR is not fairseq's.
"""

import re
import sys
from pathlib import Path

# file (relative to the source root) -> [(pattern, replacement)]
REPAIRS = {
    "fairseq/data/token_block_dataset.py": [(r"np\.compat\.long", "np.int64")],
    "fairseq/data/language_pair_dataset.py": [(r"np\.compat\.long", "np.int64")],
    "fairseq/data/data_utils.py": [(r"\bnp\.int\b(?!\d|_)", "int")],
    "fairseq/modules/dynamic_crf_layer.py": [(r"\bnp\.float\b(?!\d|_)", "float")],
}
VERSION_FILE = "fairseq/version.txt"
LOCAL_TAG = "+numpy2"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python tools/patch_fairseq_numpy2.py SOURCE_DIR", file=sys.stderr)
        return 2
    root = Path(argv[0])
    if not (root / VERSION_FILE).is_file():
        print(f"patch_fairseq_numpy2: error: {root} is not a fairseq source tree (no {VERSION_FILE})", file=sys.stderr)
        return 2
    for rel, subs in REPAIRS.items():
        path = root / rel
        text = path.read_text()
        for pattern, repl in subs:
            text = re.sub(pattern, repl, text)
        path.write_text(text)
    version = (root / VERSION_FILE).read_text().strip()
    if not version.endswith(LOCAL_TAG):
        (root / VERSION_FILE).write_text(version + LOCAL_TAG + "\n")
    print(f"repaired fairseq {version} for NumPy 2: {', '.join(REPAIRS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
