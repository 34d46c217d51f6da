"""``make gpu-check``: the GPU lane, the CUDA speed tables and a paper-budget run in one command.

Made for a GPU lent for minutes to a machine with its own Python and torch and no package registry:
it needs nothing but a Python with torch (``make gpu-check PYTHON=python3``), no network and no
install. It runs, in order, each part in its own process with a time limit, so that a part that fails
or hangs is reported and the rest still run (a benchmark as ``python -m benchmarks.<name>``, from the
checkout's root, which is also put on ``PYTHONPATH``):

    build      the C kernel of sign_optim, in place (setuptools, or the C compiler directly)
    tests      the tests marked ``cuda`` (pytest -m cuda; the files that hold them, so no fairseq is needed),
               expert parallelism over NCCL among them (tests/reinmax/test_expert_parallel_nccl.py: 2 GPUs)
    reinmax    bench_reinmax_speed: reinmax vs torch gumbel_softmax + softmax, float32 and bfloat16, compiled
    sign_optim bench_sign_optim: AddSign/PowerSign (Triton) vs Adam(fused=True), as a fraction of the copy bandwidth
    admin      bench_admin_layers: the Admin drop-in layers vs stock, float32 and autocast bfloat16/float16
    moe        bench_moe_layer: the MoE layer with a capacity, eager and compiled, tokens per second
    vae        reinmax_vae_paper: the categorical VAE at the paper's settings per estimator and 160 epochs,
               8x4 and 8x16, 4 seeds, all runs batched in one process, in the time that is left

Budget on one H200 (seconds, the whole check must fit 9 minutes = 540 s): build 20, tests 120,
reinmax 90, sign_optim 45, admin 30, moe 75, vae what is left (about 150; it reports the epochs it
reached if 160 do not fit). Without CUDA the same pipeline runs on the CPU at smoke scale (seconds
per part) and says so in its first line; ``make test`` runs it that way.

Everything goes under ``--out`` (default ``gpu-check-output/``): one folder and one log per part,
``SUMMARY.md`` with the machine and each part's status and wall time, ``summary.json``. A relative ``--out``
(``OUT=``) or ``--data`` is taken from the directory the command runs in; an ``--out`` that is a file is refused
in one line (exit 2, the file left as it is).
MNIST for the VAE: ``--data``, else ``shared/data/mnist`` in the checkout (copy it there before
sending the tree to a GPU machine: ``shared/`` travels and is ignored by git), else ``../shared/data/mnist``.

    make gpu-check PYTHON=python3 OUT=results/gpu/h200
    python tools/gpu_check.py --out /tmp/check --only tests,sign_optim
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

REPO = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 540


class Part(NamedTuple):
    name: str
    budget_s: float  # planned seconds on one H200
    command: Callable[[argparse.Namespace, bool, Path], Optional[List[str]]]  # (args, cuda, part dir) -> argv


def _bench(module: str, cuda_args: List[str], cpu_args: List[str]):
    """``python -m benchmarks.<module>``: run from the checkout's root (``run_logged``'s cwd, and on PYTHONPATH)."""
    def command(args, cuda, out):
        return [sys.executable, "-m", f"benchmarks.{module}", "--out", str(out),
                *(["--device", "cuda", *cuda_args] if cuda else cpu_args)]
    return command


def _tests(args, cuda, out):
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                   if "mark.cuda" in p.read_text(encoding="utf-8"))
    return [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
            f"--junitxml={out / 'junit.xml'}", *files]


def _build(args, cuda, out):
    return [sys.executable, str(Path(__file__).resolve()), "--build-only"]


def _vae(args, cuda, out):
    data = args.data or next((p for p in (REPO / "shared" / "data" / "mnist", REPO.parent / "shared" / "data" / "mnist")
                              if p.is_dir()), REPO / "shared" / "data" / "mnist")
    common = [sys.executable, "-m", "benchmarks.reinmax_vae_paper", "--out", str(out), "--data", str(data)]
    if cuda:
        return common + ["--device", "cuda", "--configs", "8x4,8x16", "--seeds", "1,2,3,4",
                         "--time-budget", str(max(30, args.remaining - 25))]
    return common + ["--configs", "8x4", "--seeds", "1", "--estimators", "reinmax,straight_through",
                     "--steps", "5", "--eval-images", "500"]


PARTS = [
    Part("build", 20, _build),
    Part("tests", 120, _tests),
    Part("reinmax", 90, _bench("bench_reinmax_speed", ["--repeats", "10", "--shapes", "8192x512,65536x16"],
                               ["--repeats", "3", "--shapes", "256x64", "--no-compile"])),
    Part("sign_optim", 45, _bench("bench_sign_optim", ["--reps", "5", "--steps", "5", "--threads", "1"],
                                  ["--quick", "--layers", "1", "--dim", "64", "--ffn", "128", "--vocab", "500",
                                   "--threads", "1", "--sets", "transformer"])),
    Part("admin", 30, _bench("bench_admin_layers", ["--autocast", "none,bfloat16,float16", "--dim", "512",
                                                       "--batch", "32", "--length", "128", "--reps", "10"],
                             ["--autocast", "none,bfloat16", "--dim", "32", "--layers", "2", "--batch", "2",
                              "--length", "8", "--reps", "3"])),
    Part("moe", 75, _bench("bench_moe_layer", ["--reps", "10"],
                           ["--tokens", "256", "--dim", "32", "--reps", "3", "--no-compile"])),
    Part("vae", 150, _vae),
]


def build_kernel() -> int:
    """Build sign_optim's native operators in place (setup.py build_ext beside this Python's torch); without
    setuptools or a C++ compiler the CPU steps take the foreach path, which the report says."""
    try:
        import setuptools  # noqa: F401
    except ImportError:
        print("no setuptools: the native operators are not built (CPU steps use the foreach path)", flush=True)
        return _report_kernel()
    run = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=REPO)
    if run.returncode != 0:
        print("setup.py build_ext failed: the native operators are not built (CPU steps use the foreach path)",
              flush=True)
    return _report_kernel()


def _report_kernel() -> int:
    code = ("import torch; from sign_optim import fused; "
            "why = fused.unavailable_reason(torch.device('cpu')); "
            "print('fused CPU kernel: ' + ('loaded' if why is None else 'unavailable: ' + why))")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode


def run_logged(cmd: List[str], env: Dict[str, str], log, limit: float) -> str:
    """Run ``cmd``, showing its output as it comes (progress) and keeping it in ``log``; killed after ``limit`` s."""
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as err:
        return f"failed to start: {err}"

    def copy():
        for line in proc.stdout:
            sys.stdout.write(f"  {line}")
            sys.stdout.flush()
            log.write(line)

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        reader.join(timeout=5)
        return f"timed out after {limit:.0f} s"
    reader.join(timeout=5)
    return "ok" if rc == 0 else f"failed (exit {rc})"


def describe_machine(cuda: bool) -> str:
    import torch

    text = f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"Python {platform.python_version()}, torch {torch.__version__}"
    if cuda:
        props = torch.cuda.get_device_properties(0)
        text += f", {props.name} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    return text


def _refuse(message: str) -> int:
    """A bad command line: one line on stderr, exit status 2 (like argparse, without the usage block)."""
    print(f"gpu_check: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "gpu-check-output")
    ap.add_argument("--only", default=",".join(p.name for p in PARTS), help="comma-separated parts to run")
    ap.add_argument("--data", type=Path, default=None, help="MNIST folder for the VAE part")
    ap.add_argument("--cpu", action="store_true", help="the CPU smoke pipeline even when CUDA is available")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build_only:
        return build_kernel()
    names = args.only.split(",")
    unknown = sorted(set(names) - {p.name for p in PARTS})
    if unknown:
        return _refuse(f"--only: unknown part(s) {unknown}; choose from {', '.join(p.name for p in PARTS)}")
    # the parts run from the checkout's root: a relative --out / --data is the caller's, so make it absolute
    args.out = args.out.expanduser().absolute()
    if args.data is not None:
        args.data = args.data.expanduser().absolute()
    if args.out.exists() and not args.out.is_dir():
        return _refuse(f"--out {args.out} (OUT=) is a file, not a directory; give a directory for the reports "
                       "(the file is left as it is)")
    blocked = next((p for p in args.out.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        return _refuse(f"--out {args.out} (OUT=): {blocked} is a file, so the directory cannot be made")
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    mode = ("CUDA: the full GPU check" if cuda else
            "no CUDA device: running the same pipeline on the CPU at smoke scale (seconds per part), not a GPU check")
    print(f"gpu-check: {mode}", flush=True)
    machine = describe_machine(cuda)
    print(f"machine: {machine}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    results: Dict[str, dict] = {}
    for part in (p for p in PARTS if p.name in names):
        args.remaining = TOTAL_BUDGET_S - (time.time() - start)
        out = args.out / part.name
        out.mkdir(parents=True, exist_ok=True)
        cmd = part.command(args, cuda, out)
        # a hung part may overrun its plan by half, never the whole check's budget; CPU smoke parts get minutes
        limit = max(30.0, min(1.5 * part.budget_s, args.remaining)) if cuda else 600.0
        if part.name == "vae" and cuda:
            limit = max(60.0, args.remaining + 30)
        print(f"== {part.name} (planned {part.budget_s:g} s on an H200, limit {limit:.0f} s): "
              + " ".join(str(c) for c in cmd), flush=True)
        t0 = time.time()
        with open(args.out / f"{part.name}.log", "w") as log:
            status = run_logged(cmd, env, log, limit)
        wall = time.time() - t0
        log_text = (args.out / f"{part.name}.log").read_text()
        if status == "ok" and "skipped:" in log_text:
            status = "skipped: " + log_text.split("skipped:", 1)[1].strip().splitlines()[0]
        results[part.name] = {"status": status, "wall_s": round(wall, 1), "planned_h200_s": part.budget_s,
                              "command": [str(c) for c in cmd]}
        print(f"== {part.name}: {status} in {wall:.1f} s", flush=True)
    total = time.time() - start
    lines = [f"# gpu-check ({'CUDA' if cuda else 'CPU smoke scale, no CUDA device'})", "",
             f"machine: {machine}", f"total wall: {total:.0f} s (budget on an H200: {TOTAL_BUDGET_S} s)", "",
             "| part | status | wall s | planned on an H200, s |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['status']} | {r['wall_s']} | {r['planned_h200_s']:g} |" for name, r in results.items()]
    lines += ["", "each part's log: <part>.log; its tables: <part>/", "",
              "command: make gpu-check PYTHON=" + ("python3" if cuda else sys.executable) + f" OUT={args.out}"]
    (args.out / "SUMMARY.md").write_text("\n".join(lines) + "\n")
    (args.out / "summary.json").write_text(json.dumps({"cuda": cuda, "machine": machine, "total_s": round(total, 1),
                                                       "parts": results}, indent=1))
    print("\n".join(lines), flush=True)
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
