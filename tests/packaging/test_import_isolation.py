"""Importing a library loads only what it needs: none of the libraries imports fairseq or the fairseq
plugins (only ``fairseq_plugins`` does, for ``--user-dir``), nor transformers (loaded by admin_torch only
when it is handed a HuggingFace model). Each import runs in a fresh interpreter."""

import subprocess
import sys

import pytest

LIBRARIES = ["admin_torch", "reinmax", "sign_optim", "stability_toolbox", "stability_toolbox.monitor"]
FORBIDDEN = ["fairseq", "fairseq_plugins", "transformers", "accelerate", "hydra", "omegaconf"]


def _loaded_after(statement: str):
    code = (f"import sys; {statement}; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(FORBIDDEN)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("library", LIBRARIES)
def test_library_import_loads_no_fairseq_and_no_transformers(library):
    assert _loaded_after(f"import {library}") == "[]"


def test_the_probe_sees_a_forbidden_import():
    """The check above would catch a regression: a library that imported transformers would show it (the
    plugins' fairseq import is seen the same way, at several seconds of start-up)."""
    pytest.importorskip("transformers")
    assert "transformers" in _loaded_after("import admin_torch, transformers")
