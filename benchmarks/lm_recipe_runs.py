"""What the LM benchmarks share: running recipe scripts one thread each, preparing Multi30k's English side,
writing a results table (JSON + markdown)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.sweep import recorded_args

REPO = Path(__file__).resolve().parents[1]


def recipe_env() -> dict:
    """The environment of a recipe run: one thread, unbuffered, this interpreter's tools first on PATH."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHON=sys.executable)


def run(cmd, log: Path, env) -> int:
    """Run ``cmd`` from the repository root with stdout and stderr into ``log``; the exit status."""
    with open(log, "w") as f:
        return subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode


def prepare_english(data: Path, work: Path, env, max_lines: str = "0") -> None:
    """``recipes/lm/prepare.sh`` on the English side of Multi30k into ``work`` (it reuses finished steps)."""
    work.mkdir(parents=True, exist_ok=True)
    print("preparing the English side of Multi30k ...", flush=True)
    if run([REPO / "recipes/lm/prepare.sh", "--raw", data, "--lang", "en", "--out", work, "--max-lines", max_lines],
           work / "driver_prepare.log", env) != 0:
        sys.exit(f"prepare failed: see {work / 'driver_prepare.log'}")


def write_table(out: Path, stem: str, args, results, rows, table: str) -> None:
    """Print ``table`` and write ``out/stem.md`` and ``out/stem.json`` (arguments, runs, rows)."""
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"args": recorded_args(args),
                                                  "runs": results, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(table + "\n")
