"""Running the real fairseq command-line tools from tests, on tiny data made by the test.

Example::

    data = make_translation_data(tmp_path)          # raw text + binarized dir
    run_tool("train", data.bin, *TINY_TRANSFORMER_ARGS, "--max-update", "10",
             "--save-dir", tmp_path / "ck")
"""

import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from benchmarks.fairseq_data import TranslationData, write_reversal_corpus  # noqa: F401 (re-exported)

REPO_ROOT = Path(__file__).resolve().parents[1]
PLUGINS_DIR = REPO_ROOT / "fairseq_plugins"
BIN_DIR = Path(sys.executable).parent

# A 2-layer transformer small enough to train a few updates in about a second on one CPU core.
TINY_TRANSFORMER_ARGS = [
    "--arch", "transformer",
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--share-all-embeddings",
    "--optimizer", "adam", "--lr", "1e-3",
    "--max-tokens", "500", "--cpu", "--seed", "1",
    "--no-progress-bar", "--log-interval", "1", "--log-format", "simple",
    "--num-workers", "0",
]


def _ephemeral_low() -> int:
    """The first port of the OS's ephemeral range (Linux: /proc; 32768, its default, elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a distributed init method), drawn at random below the OS's
    ephemeral range. ``bind(("127.0.0.1", 0))`` hands out an ephemeral port: the range from which every outgoing
    connection takes its source port (gloo's pair connections, the other test worker's stores), so such a port
    could be taken again between this test picking it and its rank 0 binding it; a rank then reached another
    process's store and hung (seen once in make test, two xdist workers running distributed tests at once).
    Below that range only an explicit bind takes a port, and two random draws rarely meet."""
    high = _ephemeral_low()
    low = 10000 if high > 11000 else 1024
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # taken: draw again
                continue
            return port
    with socket.socket() as sock:  # a crowded range: what the OS gives
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_script_ranks(script: str, args: Sequence, world: int = 2, timeout: float = 120):
    """Run ``python script *args`` once per rank on this machine (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` /
    ``MASTER_PORT`` in the environment, a fresh port, one thread each, the repository and ``tests/`` on
    ``PYTHONPATH``): a test file that is also each rank's script. Returns ``(exit codes, outputs)``; a rank still running after
    ``timeout`` seconds (a hang) is killed, every rank then, and its exit code is None."""
    env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(script), *map(str, args)], env=dict(env, RANK=str(r)),
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    codes, outs = [], []
    try:
        for proc in procs:
            try:
                outs.append(proc.communicate(timeout=timeout)[0])
                codes.append(proc.returncode)
            except subprocess.TimeoutExpired:
                for other in procs:
                    other.kill()
                outs.append(proc.communicate()[0])
                codes.append(None)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return codes, outs


def run_ranks(tool_args_per_rank: Sequence[Sequence], logs: Path, timeout: float = 300,
              ddp_backend: str = "legacy_ddp"):
    """Run ``fairseq-train`` once per rank (gloo on CPU, no spawn); ``(exit codes, logs)``.

    A rank still running after ``timeout`` seconds (a hang) is killed and counts as exit code None.
    """
    port = free_port()
    world = len(tool_args_per_rank)
    procs = []
    for rank, args in enumerate(tool_args_per_rank):
        args = [*args, "--distributed-backend", "gloo", "--ddp-backend", ddp_backend,
                "--distributed-world-size", str(world), "--distributed-rank", str(rank),
                "--distributed-no-spawn", "--distributed-init-method", f"tcp://127.0.0.1:{port}"]
        log = open(logs / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([tool_path("train"), *map(str, args)], cwd=REPO_ROOT, env=tool_env(),
                                       stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            codes.append(None)
        finally:
            proc.kill()
            log.close()
    return codes, [(logs / f"rank{r}.log").read_text() for r in range(world)]


def tool_path(tool: str) -> str:
    """The ``fairseq-<tool>`` executable of the running interpreter's environment."""
    path = BIN_DIR / f"fairseq-{tool}"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is fairseq installed in {sys.prefix}?")
    return str(path)


def tool_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def run_tool(tool: str, *args, cwd=None, timeout: float = 300, check: bool = True,
             env: Optional[Dict[str, str]] = None, stdin: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run ``fairseq-<tool> *args``; output (stdout and stderr together) is in ``.stdout``.

    With ``check``, a non-zero exit fails the test and shows the end of the log.
    """
    cmd = [tool_path(tool)] + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=cwd or REPO_ROOT, env=tool_env(env), input=stdin, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    return proc


_BATCH_DRIVER = r"""
import importlib.metadata, json, logging, os, sys, tempfile, traceback
cases, results_path = json.load(open(sys.argv[1])), sys.argv[2]
mains, logging_of = {}, {}
root = logging.getLogger()
results = []
for tool, args in cases:
    if tool not in mains:  # a tool's module is imported when its first case runs, as its console script does
        # fairseq's tools configure logging when their module is imported (logging.basicConfig, a no-op where the
        # root logger has a handler already): each tool gets the configuration it makes in a fresh process
        root.handlers[:] = []
        mains[tool] = next(ep for ep in importlib.metadata.entry_points(group="console_scripts")
                           if ep.name == "fairseq-" + tool).load()
        logging_of[tool] = list(root.handlers), root.level
    main = mains[tool]
    root.handlers[:], level = list(logging_of[tool][0]), logging_of[tool][1]
    root.setLevel(level)
    with tempfile.TemporaryFile(mode="w+") as out:
        sys.stdout.flush(); sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1); os.dup2(out.fileno(), 2)
        sys.argv = ["fairseq-" + tool, *args]
        code = 0
        try:
            main()
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
            if not isinstance(exit.code, (int, type(None))):  # sys.exit("message"): printed, as the interpreter does
                print(exit.code, file=sys.stderr)
        except BaseException:  # what the interpreter does with an unhandled exception: its excepthook, status 1
            try:
                sys.excepthook(*sys.exc_info())
                code = 1
            except SystemExit as exit:  # the plugins' one-line hook sets the status this way
                code = exit.code
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2); os.close(saved[0]); os.close(saved[1])
        out.seek(0)
        results.append({"returncode": code, "stdout": out.read()})
json.dump(results, open(results_path, "w"))
"""


def run_tool_batch(tool: str, cases: Sequence[Sequence], timeout: Optional[float] = None) -> list:
    """Run ``fairseq-<tool>`` once per argument list in ``cases``, all in ONE Python process: see
    :func:`run_tools_batch`, which this is with the same tool for every case."""
    return run_tools_batch([(tool, args) for args in cases], timeout=timeout)


def run_tools_batch(cases: Sequence[Tuple[str, Sequence]], timeout: Optional[float] = None) -> list:
    """Run ``fairseq-<tool> *args`` for each ``(tool, args)`` of ``cases`` in order, all in ONE Python process
    (fairseq's start-up, 4-7 s of CPU, is paid once): each run's console entry point is called with its
    ``sys.argv``, its output (file descriptors 1 and 2) and exit status kept apart, stdin empty, the working
    directory the repository's root. Returns ``subprocess.CompletedProcess``-like objects (``returncode``,
    ``stdout``), one per case. ``timeout``: seconds for the whole batch, by default 300 per case (``run_tool``'s).

    What a batch shares is the process: the modules imported and the plugins registered by an earlier case (a
    ``--user-dir`` stays loaded). A run that must start without the plugins goes before the first case that loads
    them, or in its own process. Each fairseq tool seeds torch and NumPy from its own ``--seed`` when it starts,
    so an earlier case's use of the generators does not carry into the next."""
    import json
    import tempfile

    cases = [(tool, [str(a) for a in args]) for tool, args in cases]
    timeout = 300 * len(cases) if timeout is None else timeout
    with tempfile.TemporaryDirectory() as tmp:
        todo, done = Path(tmp) / "cases.json", Path(tmp) / "results.json"
        todo.write_text(json.dumps(cases))
        proc = subprocess.run([sys.executable, "-c", _BATCH_DRIVER, str(todo), str(done)], cwd=REPO_ROOT,
                              env=tool_env(), text=True, capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0 or not done.exists():
            raise AssertionError(f"the fairseq batch driver failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
        results = json.loads(done.read_text())
    return [subprocess.CompletedProcess(["fairseq-" + tool, *args], r["returncode"], r["stdout"])
            for (tool, args), r in zip(cases, results)]


def check_run(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``run`` (one result of a batch) when it exited 0, else an AssertionError with the end of its log."""
    if run.returncode != 0:
        raise AssertionError(f"{' '.join(run.args)} exited {run.returncode}:\n{run.stdout[-4000:]}")
    return run


def translation_data_case(root: Path, **corpus_kwargs) -> Tuple[TranslationData, Tuple[str, list]]:
    """A tiny reversal corpus written under ``root/raw``, and the fairseq-preprocess run, ``(tool, args)``, that
    binarizes it into ``root/bin`` (for a batch: ``run_tools_batch``)."""
    raw = write_reversal_corpus(root / "raw", **corpus_kwargs)
    out = root / "bin"
    return TranslationData(raw=raw, bin=out), ("preprocess", [
        "--source-lang", "src", "--target-lang", "tgt", "--trainpref", raw / "train", "--validpref", raw / "valid",
        "--testpref", raw / "test", "--destdir", out, "--joined-dictionary", "--workers", "1"])


def make_translation_data(root: Path, **corpus_kwargs) -> TranslationData:
    """A tiny reversal corpus under ``root/raw``, binarized by the real fairseq-preprocess into ``root/bin``."""
    data, (tool, args) = translation_data_case(root, **corpus_kwargs)
    run_tool(tool, *args)
    return data


def lm_data_case(root: Path, sizes: Sequence[int] = (300, 40, 40), vocab: int = 40,
                 seed: int = 0) -> Tuple[Path, Tuple[str, list]]:
    """A tiny monolingual corpus (random words with a repeated-pattern structure to learn) written under
    ``root/raw``, and the fairseq-preprocess ``--only-source`` run, ``(tool, args)``, that binarizes it into
    ``root/bin`` (for a batch: ``run_tools_batch``); ``(root/bin, that run)``."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "valid", "test"), sizes):
        with open(raw / f"{split}.txt", "w") as f:
            for _ in range(n):
                start = rng.randrange(vocab)
                f.write(" ".join(words[(start + 3 * k) % vocab] for k in range(rng.randint(4, 12))) + "\n")
    out = root / "bin"
    return out, ("preprocess", ["--only-source", "--trainpref", raw / "train.txt", "--validpref", raw / "valid.txt",
                                "--testpref", raw / "test.txt", "--destdir", out, "--workers", "1"])


def make_lm_data(root: Path, sizes: Sequence[int] = (300, 40, 40), vocab: int = 40, seed: int = 0) -> Path:
    """A tiny monolingual corpus (random words with a repeated-pattern structure to learn), binarized by
    the real ``fairseq-preprocess --only-source`` into ``root/bin``."""
    out, (tool, args) = lm_data_case(root, sizes, vocab, seed)
    run_tool(tool, *args)
    return out
