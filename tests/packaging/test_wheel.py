"""The distribution as a user gets it: a wheel built from a clean copy of the checkout (no in-place build),
installed outside the checkout, holds the libraries and the fused C kernel."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from checkout import copy_checkout

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = copy_checkout(tmp_path_factory.mktemp("src"))
    assert not list(src.rglob("*.so"))  # the kernel must come from the wheel's own build
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, timeout=600)
    (whl,) = out.glob("stability_toolbox-*.whl")
    return whl


def test_wheel_installs_the_libraries_with_the_fused_kernel(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    code = ("import json, warnings, torch\n"
            "warnings.simplefilter('error')\n"  # no 'kernel not built' warning
            "import admin_torch, reinmax, sign_optim, stability_toolbox\n"
            "from sign_optim import fused\n"
            "y, s = reinmax.reinmax(torch.randn(4, 3), 1.3)\n"
            "print(json.dumps({m.__name__: m.__file__ for m in (admin_torch, reinmax, sign_optim, stability_toolbox)}"
            " | {'fused': fused.available(torch.device('cpu'))}))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got.pop("fused") is True
    assert all(path.startswith(str(site)) for path in got.values()), got  # not the checkout
    assert (site / "fairseq_plugins" / "__init__.py").exists()
    assert wheel.stat().st_size < 2_000_000
