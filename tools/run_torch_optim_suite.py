"""Run torch's own optimizer test suite (``test/test_optim.py`` of a PyTorch checkout) on AddSign and PowerSign.

Usage: python tools/run_torch_optim_suite.py PATH/TO/test_optim.py [pytest arguments...]

The file is copied to a temporary directory without its imports of sibling test modules (``optim.test_*``, which
only re-export other suites), torch's ``optim_db`` is replaced by the sign optimizers' entries
(tests/sign_optim/optim_infos.py), and pytest runs it on CPU. torch's test utilities need ``expecttest``
(``pip install expecttest``). Exit status: pytest's (2 with one line when the path is not a file).
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not Path(argv[0]).is_file():
        print(f"run_torch_optim_suite: the first argument must be torch's test/test_optim.py, got "
              f"{argv[0] if argv else 'nothing'}", file=sys.stderr)
        return 2
    source = Path(argv[0]).read_text()
    source = re.sub(r"^from optim\.test_\w+ import .*$", "", source, flags=re.M)  # other suites' re-exports
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "test_optim_sign.py"
        target.write_text(source)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "pytest", str(target), "-p", "tests.sign_optim.torch_suite_plugin",
               "-p", "no:cacheprovider", "--rootdir", tmp, "-c", os.devnull, *argv[1:]]
        return subprocess.run(cmd, cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
