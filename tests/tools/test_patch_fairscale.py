"""tools/patch_fairscale_amp.py: fairscale's deprecated torch.cuda.amp decorators replaced, idempotently, and the
installed fairscale imports without a FutureWarning (the one line of a refused fairseq flag is the whole output)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "patch_fairscale_amp.py"

OFFLOAD = '''import torch
def _conditional_amp_fwd_decorator(orig_func):
    if hasattr(torch.cuda.amp, "custom_fwd"):
        return torch.cuda.amp.custom_fwd(orig_func)  # type: ignore
    return orig_func
def _conditional_amp_bwd_decorator(orig_func):
    if hasattr(torch.cuda.amp, "custom_bwd"):
        return torch.cuda.amp.custom_bwd(orig_func)  # type: ignore
    return orig_func
'''


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_the_decorators_are_replaced_once_and_the_file_runs_quietly(tmp_path):
    root = tmp_path / "fairscale"
    (root / "experimental" / "nn").mkdir(parents=True)
    (root / "experimental" / "nn" / "offload.py").write_text(OFFLOAD)
    first = _run(root)
    assert first.returncode == 0 and "2 call(s) replaced" in first.stdout, first.stderr
    text = (root / "experimental" / "nn" / "offload.py").read_text()
    assert "torch.cuda.amp.custom_fwd(" not in text and 'torch.amp.custom_fwd(orig_func, device_type="cuda")' in text
    again = _run(root)
    assert again.returncode == 0 and "already repaired" in again.stdout
    assert (root / "experimental" / "nn" / "offload.py").read_text() == text
    code = f"import runpy, warnings; warnings.simplefilter('error', FutureWarning); " \
           f"g = runpy.run_path({str(root / 'experimental' / 'nn' / 'offload.py')!r}); " \
           "g['_conditional_amp_fwd_decorator'](lambda x: x); g['_conditional_amp_bwd_decorator'](lambda x: x)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args", [["/no/such/dir"], ["a", "b"]])
def test_a_wrong_argument_is_one_line_exit_2(args):
    proc = _run(*args)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("fairscale") is None, reason="fairscale is not installed (make install)")
def test_installed_fairscale_imports_without_a_future_warning():
    """What `import fairseq` imports of fairscale, with FutureWarnings as errors (make install ran the tool)."""
    code = "import warnings; warnings.simplefilter('error', FutureWarning); import fairscale.experimental.nn.offload"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
