"""Silence fairscale 0.4.13's import-time FutureWarnings, in the installed package.

``import fairseq`` imports fairscale (``fairseq/models/distributed_fairseq_model.py``), whose
``experimental/nn/offload.py`` decorates with the deprecated ``torch.cuda.amp.custom_fwd`` /
``custom_bwd`` at import: four lines of ``FutureWarning`` before anything every fairseq tool prints
(a one-line refusal of a bad flag included). Each call is replaced by the one the warning names,
``torch.amp.custom_fwd(orig_func, device_type="cuda")`` (the same decorator, CUDA autocast as before).

Usage (``make install`` runs it after installing fairscale)::

    python tools/patch_fairscale_amp.py [FAIRSCALE_DIR]   # default: the fairscale this Python imports

Idempotent; exits 2 with one line if FAIRSCALE_DIR holds no fairscale.
"""

import os
import sys
from pathlib import Path

from installed_package import package_dir  # tools/installed_package.py, beside this script

TARGET = "experimental/nn/offload.py"
REPAIRS = [
    ("torch.cuda.amp.custom_fwd(orig_func)", 'torch.amp.custom_fwd(orig_func, device_type="cuda")'),
    ("torch.cuda.amp.custom_bwd(orig_func)", 'torch.amp.custom_bwd(orig_func, device_type="cuda")'),
]


def patch(root: Path) -> int:
    """Repair ``root/experimental/nn/offload.py``; the number of calls replaced (0: already repaired)."""
    path = root / TARGET
    text = path.read_text(encoding="utf-8")
    count = sum(text.count(old) for old, _ in REPAIRS)
    for old, new in REPAIRS:
        text = text.replace(old, new)
    if count:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return count


def main(argv=None) -> int:
    root = package_dir("patch_fairscale_amp", "fairscale", sys.argv[1:] if argv is None else argv, [TARGET])
    if root is None:
        return 2
    count = patch(root)
    print(f"patch_fairscale_amp: {root / TARGET}: {count} call(s) replaced" if count
          else f"patch_fairscale_amp: {root / TARGET}: already repaired")
    return 0


if __name__ == "__main__":
    sys.exit(main())
