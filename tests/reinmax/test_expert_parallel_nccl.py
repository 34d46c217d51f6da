"""Expert parallelism over NCCL, one GPU per rank (the GPU lane: ``make gpu-check`` runs the tests marked cuda).

The ranks run ``benchmarks.bench_moe_ep equality --device cuda --worlds 2``: every sparse router, with and
without a capacity, each rank against the single-process layer on its tokens (the same check as the gloo
tests in tests/distributed/test_expert_parallel.py); skipped on a machine with fewer than 2 GPUs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="expert parallelism over NCCL needs 2 CUDA devices")]


def test_expert_parallel_over_nccl_equals_one_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_moe_ep", "equality", "--device", "cuda",
                           "--worlds", "2", "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "ep_equality.json").read_text())["rows"]
    assert len(rows) == 2 * 4 * 2 * 2  # ranks x routers x capacities x dtypes
    for row in rows:
        tol = 1e-12 if row.get("dtype") == "float64" else 1e-5  # TF32 is off for float32 matmuls by default
        for key in ("out", "x_grad", "router_grad", "expert_grad", "balance_loss", "load", "dropped"):
            assert row[key] <= tol, (row["router"], row["capacity_factor"], key, row[key])
    assert any(row["dropped_fraction"] > 0 for row in rows)
