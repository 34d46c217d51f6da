"""The spike benchmark: tiny LMs with reproducible instabilities and their clean twins, judged side by side.

Each run trains a small causal transformer LM (2 Pre-LN layers, width 64, vocabulary 32, context 32) on a
synthetic Markov source (every token has a few likely successors: a loss floor well below uniform) with AdamW,
a linear warm-up and a cosine decay, for ``--steps`` updates. Every batch is a pure function of (seed, data
index), so a run and its *clean twin* see the same data except where an instability is injected (at 60% of the
run, near the peak of the decaying learning rate):

* ``repeat``: a burst of 8 batches made of one repeated token, their loss weighted x20 (a corrupted shard);
* ``noise``: a burst of 8 batches with uniform label noise, their loss weighted x50 (a data-loader bug that
  hands unnormalized sums);
* ``lr_spike``: the learning rate x100 for 4 data indices (a schedule glitch);
* ``clean``: nothing injected (the false-alarm check: any intervention there is a false one).

Methods: ``none``; ``guard`` (`stability_toolbox.StabilityGuard`, default settings); ``olmo_skip``
(OLMo-core's ``SkipStepAdamW`` rule, reimplemented here from its description: skip an update whose loss or
gradient norm is more than 6 standard deviations off the mean of its last 128 values, once 64 are recorded);
``metaseq_ewm`` (metaseq's ``ewm_ratio_to_skip_batch``, reimplemented: skip when loss / EWM(span 9) > 1.5 and
multiply the learning rate by 1.5^-4); ``lightning_spike`` (the real ``lightning_fabric`` ``SpikeDetection``:
on a spike it raises and records the batches to skip; the run is resumed from its last checkpoint, every 100
updates, with those batches filtered, as its documentation prescribes).

Per run: the final held-out loss and its ratio to the clean twin's, interventions, updates lost (skipped or
undone by a rewind/resume), wall time. ``results/guard/spike_benchmark.json`` (resumable: finished runs are
kept) and ``results/guard/spike_benchmark.md`` (the table).

    nice -n 10 python -m benchmarks.spike_benchmark results/guard --seeds 3
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from toolbox_core.files import atomic_write

VOCAB, CONTEXT, BATCH, WIDTH = 32, 32, 16, 64
MECHANISMS = ("clean", "repeat", "noise", "lr_spike")
METHODS = ("none", "guard", "olmo_skip", "metaseq_ewm", "lightning_spike")
PEAK_LR = 3e-3
WARMUP = 40


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(torch.randn(CONTEXT, WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 4 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(WIDTH, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT), persistent=False)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.out(self.body(h, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True))


def transitions(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    logits = torch.randn(VOCAB, VOCAB, generator=g) * 3.0
    return logits.softmax(-1)


def markov_batch(probs: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    x = torch.empty(BATCH, CONTEXT + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (BATCH,), generator=g)
    for t in range(CONTEXT):
        x[:, t + 1] = torch.multinomial(probs[x[:, t]], 1, generator=g).squeeze(1)
    return x


class Task:
    """The data and the schedule of one (mechanism, seed): batch(i) and lr(i) are pure functions of the index."""

    def __init__(self, mechanism: str, seed: int, steps: int):
        self.mechanism, self.seed, self.steps = mechanism, seed, steps
        self.probs = transitions(seed)
        start = (3 * steps) // 5
        span = 4 if mechanism == "lr_spike" else 8
        self.bad = set(range(start, start + span)) if mechanism in ("repeat", "noise", "lr_spike") else set()
        self.cache: Dict[int, tuple] = {}

    def batch(self, i: int):
        if i >= self.steps:
            return None
        if i not in self.cache:
            x = markov_batch(self.probs, self.seed, i)
            weight = 1.0
            if i in self.bad and self.mechanism == "repeat":
                x = torch.full_like(x, (self.seed + i) % VOCAB)
                weight = 20.0
            elif i in self.bad and self.mechanism == "noise":
                g = torch.Generator().manual_seed(7 + i)
                x = x.clone()
                x[:, 1:] = torch.randint(0, VOCAB, x[:, 1:].shape, generator=g)
                weight = 50.0
            self.cache[i] = (x, weight)
        return self.cache[i]

    def lr(self, i: int) -> float:
        base = PEAK_LR * min(1.0, (i + 1) / WARMUP) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, self.steps) / self.steps)))
        return base * 100.0 if (self.mechanism == "lr_spike" and i in self.bad) else base


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    x, weight = batch
    logits = model(x[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1)) * weight


@torch.no_grad()
def evaluate(model: nn.Module, seed: int) -> float:
    probs = transitions(seed)
    model.eval()
    losses = [loss_of(model, (markov_batch(probs, seed + 500, 10_000_000 + k), 1.0)).item() for k in range(8)]
    model.train()
    return sum(losses) / len(losses)


def fresh(seed: int):
    torch.manual_seed(seed)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)
    return model, opt


def grad_norm(model: nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])))


def run_none(task: Task) -> Dict[str, Any]:
    model, opt = fresh(task.seed)
    for i in range(task.steps):
        for g in opt.param_groups:
            g["lr"] = task.lr(i)
        loss_of(model, task.batch(i)).backward()
        opt.step()
        opt.zero_grad()
    return {"model": model, "interventions": 0, "updates_lost": 0}


def run_guard(task: Task) -> Dict[str, Any]:
    from stability_toolbox import StabilityGuard

    model, opt = fresh(task.seed)
    guard = StabilityGuard(model, opt)
    for i, batch in guard.batches(task.batch):
        for g in opt.param_groups:
            g["lr"] = task.lr(i)
        loss = loss_of(model, batch)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    s = guard.summary()
    guard.detach()
    lost = s["skipped_updates"] + s["undone_updates"] + len(guard._skip_indices)
    return {"model": model, "interventions": s["events"], "updates_lost": lost, "stopped": s["stopped"]}


def run_olmo_skip(task: Task, sigma: float = 6.0, window: int = 128) -> Dict[str, Any]:
    model, opt = fresh(task.seed)
    losses: List[float] = []
    norms: List[float] = []
    skips = 0

    def z(series, v):
        mean = statistics.fmean(series)
        std = statistics.pstdev(series)
        return abs(v - mean) / std if std > 0 else 0.0

    for i in range(task.steps):
        for g in opt.param_groups:
            g["lr"] = task.lr(i)
        loss = loss_of(model, task.batch(i))
        loss.backward()
        lv, gn = float(loss.detach()), grad_norm(model)
        skip = not (math.isfinite(lv) and math.isfinite(gn)) or (
            len(losses) >= window // 2 and (z(losses[-window:], lv) > sigma or z(norms[-window:], gn) > sigma))
        if skip:
            skips += 1
        else:
            opt.step()
        losses.append(lv)
        norms.append(gn)
        opt.zero_grad()
    return {"model": model, "interventions": skips, "updates_lost": skips}


def run_metaseq_ewm(task: Task, ratio: float = 1.5, span: int = 9) -> Dict[str, Any]:
    model, opt = fresh(task.seed)
    alpha = 2.0 / (span + 1)
    ewm: Optional[float] = None
    scale, skips = 1.0, 0
    for i in range(task.steps):
        for g in opt.param_groups:
            g["lr"] = task.lr(i) * scale
        loss = loss_of(model, task.batch(i))
        loss.backward()
        lv = float(loss)
        if ewm is not None and (not math.isfinite(lv) or lv / ewm > ratio):
            skips += 1
            scale *= ratio ** -4
        else:
            opt.step()
            ewm = lv if ewm is None else alpha * lv + (1 - alpha) * ewm
        opt.zero_grad()
    return {"model": model, "interventions": skips, "updates_lost": skips}


class _FakeStrategy:
    root_device = torch.device("cpu")

    def barrier(self):
        pass

    def reduce_boolean_decision(self, decision, all=True):
        return decision


class _FakeFabric:
    strategy = _FakeStrategy()
    global_rank = 0


def run_lightning_spike(task: Task, checkpoint_every: int = 100, max_restarts: int = 10) -> Dict[str, Any]:
    import copy
    import tempfile

    from lightning_fabric.utilities.spike import SpikeDetection, TrainingSpikeException

    model, opt = fresh(task.seed)
    excluded: set = set()
    checkpoint = (0, copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    restarts, lost = 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        while True:
            start, msd, osd = checkpoint
            model.load_state_dict(msd)
            opt.load_state_dict(copy.deepcopy(osd))
            detector = SpikeDetection(exclude_batches_path=tmp)  # a resumed run starts a new detector
            try:
                for i in range(start, task.steps):
                    if i % checkpoint_every == 0 and i > start:
                        checkpoint = (i, copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
                    if i in excluded:
                        lost += 1
                        continue
                    for g in opt.param_groups:
                        g["lr"] = task.lr(i)
                    loss = loss_of(model, task.batch(i))
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    detector.on_train_batch_end(_FakeFabric(), loss.detach(), None, i)
                break
            except TrainingSpikeException:
                opt.zero_grad()
                restarts += 1
                excluded.update(b for b in detector.bad_batches if b >= 0)
                lost += i + 1 - checkpoint[0]
                if restarts > max_restarts:
                    break
    return {"model": model, "interventions": restarts, "updates_lost": lost}


RUNNERS: Dict[str, Callable[[Task], Dict[str, Any]]] = {
    "none": run_none, "guard": run_guard, "olmo_skip": run_olmo_skip, "metaseq_ewm": run_metaseq_ewm,
    "lightning_spike": run_lightning_spike,
}


def run_one(mechanism: str, method: str, seed: int, steps: int) -> Dict[str, Any]:
    task = Task(mechanism, seed, steps)
    start = time.perf_counter()
    out = RUNNERS[method](task)
    wall = time.perf_counter() - start
    final = evaluate(out.pop("model"), seed)
    return {"mechanism": mechanism, "method": method, "seed": seed, "final_loss": final, "wall_s": wall, **out}


def overhead(reps: int = 200, seed: int = 0) -> Dict[str, Any]:
    """The guard's cost per training step at default settings: a guarded and an unguarded TinyLM stepped
    alternately on the same clean batches in one process (so machine load hits both alike). Reports the paired
    step-time ratio and, less noisy, the guard's own time per step (its call minus the optimizer step inside it)."""
    from stability_toolbox import StabilityGuard

    task = Task("clean", seed, reps + 20)
    plain, plain_opt = fresh(seed)
    guarded, guarded_opt = fresh(seed)
    guard = StabilityGuard(guarded, guarded_opt)
    inner: List[float] = []
    original = guard._original_step

    def timed_original(**kwargs):  # the optimizer's own step inside the guarded one: what is not overhead
        start = time.perf_counter()
        original(**kwargs)
        inner.append(time.perf_counter() - start)

    guard._original_step = timed_original
    times: Dict[str, List[float]] = {"none": [], "guard": [], "guard_call": []}
    for i in range(reps + 20):
        batch = task.batch(i)
        order = [("none", plain, plain_opt), ("guard", guarded, guarded_opt)]
        if i % 2:
            order.reverse()
        for name, model, opt in order:
            start = time.perf_counter()
            loss = loss_of(model, batch)
            loss.backward()
            if name == "guard":
                call = time.perf_counter()
                guard.step(loss)
                call = time.perf_counter() - call
            else:
                opt.step()
            opt.zero_grad()
            if i >= 20:  # after a warm-up
                times[name].append(time.perf_counter() - start)
                if name == "guard":
                    times["guard_call"].append(call - inner[-1])
    ratios = sorted(g / n for g, n in zip(times["guard"], times["none"]))
    q = statistics.quantiles(ratios, n=4)
    own = times["guard_call"]
    own_q = statistics.quantiles(own, n=4)
    return {"guard_own_median_ms": 1e3 * statistics.median(own), "guard_own_iqr_ms": [1e3 * own_q[0], 1e3 * own_q[2]],
            "guard_own_pct_of_step": 100 * statistics.median(own) / statistics.median(times["none"]),
            "none_median_ms": 1e3 * statistics.median(times["none"]),
            "guard_median_ms": 1e3 * statistics.median(times["guard"]),
            "overhead_median_pct": 100 * (statistics.median(ratios) - 1),
            "overhead_iqr_pct": [100 * (q[0] - 1), 100 * (q[2] - 1)], "steps": reps,
            "events": len(guard.events)}


def table(runs: List[Dict[str, Any]], tolerance: float = 0.02) -> str:
    twin = {r["seed"]: r["final_loss"] for r in runs if r["mechanism"] == "clean" and r["method"] == "none"}
    failing = {(r["mechanism"], r["seed"]) for r in runs
               if r["method"] == "none" and r["mechanism"] != "clean" and r["seed"] in twin
               and not r["final_loss"] <= twin[r["seed"]] * (1 + tolerance)}
    lines = ["| mechanism | method | runs | within 2% of the clean twin | of the failing runs, recovered | "
             "median final / twin | median interventions | median updates lost | median wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mech in MECHANISMS:
        for method in METHODS:
            rs = [r for r in runs if r["mechanism"] == mech and r["method"] == method and r["seed"] in twin]
            if not rs:
                continue
            ok = [r for r in rs if r["final_loss"] <= twin[r["seed"]] * (1 + tolerance)]
            fail_rs = [r for r in rs if (mech, r["seed"]) in failing]
            rec = sum(r["final_loss"] <= twin[r["seed"]] * (1 + tolerance) for r in fail_rs)
            lines.append(
                f"| {mech} | {method} | {len(rs)} | {len(ok)}/{len(rs)} | "
                f"{rec}/{len(fail_rs) if mech != 'clean' else 0} | "
                f"{statistics.median(r['final_loss'] / twin[r['seed']] for r in rs):.4f} | "
                f"{statistics.median(r['interventions'] for r in rs):g} | "
                f"{statistics.median(r['updates_lost'] for r in rs):g} | "
                f"{statistics.median(r['wall_s'] for r in rs):.1f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output directory (results/guard); finished runs in it are kept")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--mechanisms", default=",".join(MECHANISMS))
    parser.add_argument("--overhead", type=int, default=0, metavar="STEPS",
                        help="only measure the guard's step-time overhead over STEPS paired steps")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 60:
        parser.error("--seeds must be >= 1 and --steps >= 60")
    methods = args.methods.split(",")
    mechanisms = args.mechanisms.split(",")
    for m in methods:
        if m not in METHODS:
            parser.error(f"--methods: unknown {m!r}; accepted: {', '.join(METHODS)}")
    for m in mechanisms:
        if m not in MECHANISMS:
            parser.error(f"--mechanisms: unknown {m!r}; accepted: {', '.join(MECHANISMS)}")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.overhead:
        result = overhead(args.overhead)
        with atomic_write(out / "overhead.json") as f:
            json.dump({"command": "python -m benchmarks.spike_benchmark " + " ".join(sys.argv[1:] if argv is None else argv),
                       "torch": torch.__version__, **result}, f, indent=1)
        print(json.dumps(result))
        return 0
    path = out / "spike_benchmark.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    done = {(r["mechanism"], r["method"], r["seed"], r.get("steps", args.steps)) for r in runs}
    for seed in range(args.seeds):
        for mech in mechanisms:
            for method in methods:
                if (mech, method, seed, args.steps) in done:
                    continue
                r = run_one(mech, method, seed, args.steps)
                r["steps"] = args.steps
                runs.append(r)
                print(json.dumps(r), flush=True)
                with atomic_write(path) as f:
                    json.dump({"command": "python -m benchmarks.spike_benchmark " + " ".join(sys.argv[1:] if argv is None else argv),
                               "torch": torch.__version__, "runs": runs}, f, indent=1)
    text = table([r for r in runs if r.get("steps") == args.steps])
    with atomic_write(out / "spike_benchmark.md") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
