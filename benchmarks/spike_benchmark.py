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
* ``clean``: nothing injected (the false-alarm check: any intervention there is a false one);
* ``attn_logits`` and ``high_lr``: the stability grid's candidates (`benchmarks.stability_grid.GRID`) on this
  data and schedule: its model (admin_torch's 2-layer causal Pre-LN stack, width 64) at peak learning rate 0.1
  (the attention-logit-growth candidate) and with qk-layernorm at 1.0 (the output-logit candidate, the grid's
  highest learning rate); their clean twins ``attn_logits_clean`` and ``high_lr_clean`` are the grid's controls
  of the same group (learning rates 3e-3 and 3e-2).

Methods: ``none``; ``guard`` (`stability_toolbox.StabilityGuard`, default settings); ``olmo_skip`` (the
**real** ``SkipStepAdamW`` of ai2-olmo-core 3.0.0, loaded from its wheel by `benchmarks.olmo_skip_step`: the
package cannot be installed next to this project's pinned huggingface-hub; it skips an update whose loss or
gradient norm is more than 6 standard deviations above the mean of its last 128 values, once 64 are recorded);
``zclip`` (the **real** ``zclip`` 1.0.0 ``ZClip`` at its defaults: adaptive clipping of gradient-norm outliers
against an EMA, z 2.5); ``metaseq_ewm`` (metaseq's ``ewm_ratio_to_skip_batch``, **reimplemented**: skip when
loss / EWM(span 9) > 1.5 and multiply the learning rate by 1.5^-4); ``palm_rewind`` (PaLM's manual
rewind-and-skip, arXiv 2204.02311 section 5.1, **reimplemented** and scaled to this run: on a loss > 1.2 x the
median of the last 20, restart from a checkpoint ~10 updates back and skip 30 batches from there;
`run_palm_rewind`); ``lightning_spike`` (the **real** ``lightning_fabric`` ``SpikeDetection``: on a spike it
raises and records the batches to skip; the run is resumed from its last checkpoint, every 100 updates, with
those batches filtered, as its documentation prescribes).

Per run: the final held-out loss and its ratio to the clean twin's, interventions, updates lost (skipped or
undone by a rewind/resume), wall time. ``results/guard/spike_benchmark.json`` (resumable: finished runs are
kept) and ``results/guard/spike_benchmark.md`` (the table).

    nice -n 10 python -m benchmarks.spike_benchmark results/guard --seeds 3
    nice -n 10 python -m benchmarks.spike_benchmark results/guard --seed-list 2   # one seed per process

``olmo_skip`` needs the unpacked wheel in ``work/wheels/olmo_core`` (`benchmarks.olmo_skip_step` says how).
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

REPO = Path(__file__).resolve().parents[1]
VOCAB, CONTEXT, BATCH, WIDTH = 32, 32, 16, 64
MECHANISMS = ("clean", "repeat", "noise", "lr_spike", "attn_logits", "attn_logits_clean", "high_lr", "high_lr_clean")
METHODS = ("none", "guard", "olmo_skip", "zclip", "metaseq_ewm", "palm_rewind", "lightning_spike")
#: the stability grid's candidates (benchmarks.stability_grid.GRID) on this benchmark's data and schedule:
#: (model kind, qk-layernorm, peak learning rate); their clean twins are the grid's controls of the same group
GRID_RUNS = {
    "attn_logits": ("pre_ln", False, 0.1),          # GRID["attn_logits"] candidate pre_ln_lr0.1
    "attn_logits_clean": ("pre_ln", False, 3e-3),   # its control pre_ln_lr0.003
    "high_lr": ("pre_ln", True, 1.0),               # GRID["output_logits"] candidate qk_lr1 (the grid's highest LR)
    "high_lr_clean": ("pre_ln", True, 3e-2),        # its control qk_lr0.03 (without the control's z-loss)
}
#: each mechanism's clean twin (same seed, method none)
TWIN = {"attn_logits": "attn_logits_clean", "high_lr": "high_lr_clean"}
OLMO_WHEEL = "work/wheels/olmo_core"  # the unpacked ai2-olmo-core 3.0.0 wheel (benchmarks.olmo_skip_step)
PEAK_LR = 3e-3
WARMUP = 40


class GridLM(nn.Module):
    """The stability grid's model (admin_torch's reference stack: 2 causal layers, width 64, 4 heads) at this
    benchmark's vocabulary and context."""

    def __init__(self, kind: str, qk_norm: bool, seed: int):
        super().__init__()
        from admin_torch import make_stack

        self.embed = nn.Embedding(VOCAB, WIDTH)
        nn.init.normal_(self.embed.weight, std=WIDTH ** -0.5)
        self.stack = make_stack(kind, 2, WIDTH, heads=4, seed=seed, causal=True, qk_norm=qk_norm)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, tokens):
        return self.head(self.stack(self.embed(tokens)))


class TinyLM(nn.Module):
    """The benchmark's LM (Pre-LN, 4 heads); its defaults are the benchmark's, the overhead's realistic step is
    a wider, deeper, longer one (`OVERHEAD_SIZES`)."""

    def __init__(self, width: int = WIDTH, layers: int = 2, context: int = CONTEXT):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

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
        self.kind, self.qk_norm, self.peak = GRID_RUNS.get(mechanism, ("tiny", False, PEAK_LR))
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
        base = self.peak * min(1.0, (i + 1) / WARMUP) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, self.steps) / self.steps)))
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


def make_model(task: "Task") -> nn.Module:
    torch.manual_seed(task.seed)
    return TinyLM() if task.kind == "tiny" else GridLM(task.kind, task.qk_norm, task.seed)


def fresh(task: "Task", optimizer: Callable = torch.optim.AdamW):
    model = make_model(task)
    opt = optimizer(model.parameters(), lr=task.peak, betas=(0.9, 0.95), weight_decay=0.1)
    return model, opt


def run_none(task: Task) -> Dict[str, Any]:
    model, opt = fresh(task)
    for i in range(task.steps):
        for g in opt.param_groups:
            g["lr"] = task.lr(i)
        loss_of(model, task.batch(i)).backward()
        opt.step()
        opt.zero_grad()
    return {"model": model, "interventions": 0, "updates_lost": 0}


def run_guard(task: Task) -> Dict[str, Any]:
    from stability_toolbox import StabilityGuard

    model, opt = fresh(task)
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
    return {"model": model, "interventions": s["events"], "updates_lost": lost, "stopped": s["stopped"],
            "lr_cuts": s["lr_cuts"]}


def run_olmo_skip(task: Task, wheel: str = OLMO_WHEEL) -> Dict[str, Any]:
    """The real ``SkipStepAdamW`` of ai2-olmo-core 3.0.0 (`benchmarks.olmo_skip_step`), at its defaults (6 sigma,
    128 steps, from 64 on), fed the step's loss and global gradient norm before each step as its trainer does."""
    from benchmarks.olmo_skip_step import load

    model, opt = fresh(task, load(wheel))
    skips = 0
    for i in range(task.steps):
        for g in opt.param_groups:
            g["lr"] = task.lr(i)
        loss = loss_of(model, task.batch(i))
        loss.backward()
        opt.latest_loss = loss.detach()
        opt.latest_grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        opt.step()
        skips += int(float(opt.step_skipped) > 0)
        opt.zero_grad()
    return {"model": model, "interventions": skips, "updates_lost": skips}


def run_zclip(task: Task) -> Dict[str, Any]:
    """The real ``zclip`` 1.0.0 ``ZClip`` at its defaults (z-score mode, adaptive scaling, z 2.5, EMA 0.97, 25
    warm-up steps, max norm 1.0), called between backward and step as its documentation says. Interventions:
    the steps after its warm-up whose gradient norm it judged an outlier (z > 2.5) and clipped adaptively."""
    from zclip import ZClip

    model, opt = fresh(task)
    zc = ZClip()
    clips = 0
    for i in range(task.steps):
        for g in opt.param_groups:
            g["lr"] = task.lr(i)
        loss_of(model, task.batch(i)).backward()
        ready, mean, var = zc.initialized, zc.mean, zc.var
        norm = zc.step(model)
        if ready and var > 0 and (norm - mean) / var ** 0.5 > zc.z_thresh:
            clips += 1
        opt.step()
        opt.zero_grad()
    return {"model": model, "interventions": clips, "updates_lost": 0}


def run_palm_rewind(task: Task, every: int = 10, back: int = 10, skip: int = 30, ratio: float = 1.2,
                    span: int = 20, max_restarts: int = 10) -> Dict[str, Any]:
    """PaLM's manual rewind-and-skip (arXiv 2204.02311 section 5.1), **reimplemented**: on a loss spike, restart
    from a checkpoint roughly ``back`` updates before it and skip the ``skip`` batches from that checkpoint's data
    position on (PaLM: ~100 steps back, 200-500 batches skipped, of ~255k steps; scaled /10 to this 300-update
    run). PaLM's spikes were seen by people watching the curve; here a spike is a loss more than ``ratio`` x the
    median of the last ``span`` updates' losses, or a non-finite one. Checkpoints every ``every`` updates."""
    import copy

    model, opt = fresh(task)
    checkpoints = [(0, 0, copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))]
    excluded: set = set()
    history: List[float] = []
    restarts = lost = 0
    i = update = 0
    while i < task.steps:
        if i in excluded:
            i += 1
            continue
        for g in opt.param_groups:
            g["lr"] = task.lr(i)
        loss = loss_of(model, task.batch(i))
        lv = float(loss.detach())
        spike = not math.isfinite(lv) or (len(history) >= span and lv > ratio * statistics.median(history[-span:]))
        if spike and restarts < max_restarts:
            restarts += 1
            target = [c for c in checkpoints if c[0] <= update - back] or checkpoints[:1]
            start_update, position, msd, osd = target[-1]
            model.load_state_dict(msd)
            opt.load_state_dict(copy.deepcopy(osd))
            opt.zero_grad()
            lost += update - start_update
            checkpoints = [c for c in checkpoints if c[0] <= start_update]
            history = history[: start_update]
            excluded.update(range(position, position + skip))
            lost += sum(1 for j in range(position, position + skip) if j < task.steps)
            i, update = position, start_update
            continue
        loss.backward()
        opt.step()
        opt.zero_grad()
        history.append(lv)
        i += 1
        update += 1
        if update % every == 0:
            checkpoints.append((update, i, copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())))
    return {"model": model, "interventions": restarts, "updates_lost": lost}


def run_metaseq_ewm(task: Task, ratio: float = 1.5, span: int = 9) -> Dict[str, Any]:
    model, opt = fresh(task)
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

    model, opt = fresh(task)
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
    "none": run_none, "guard": run_guard, "olmo_skip": run_olmo_skip, "zclip": run_zclip,
    "metaseq_ewm": run_metaseq_ewm, "palm_rewind": run_palm_rewind, "lightning_spike": run_lightning_spike,
}


def run_one(mechanism: str, method: str, seed: int, steps: int) -> Dict[str, Any]:
    task = Task(mechanism, seed, steps)
    start = time.perf_counter()
    out = RUNNERS[method](task)
    wall = time.perf_counter() - start
    final = evaluate(out.pop("model"), seed)
    return {"mechanism": mechanism, "method": method, "seed": seed, "final_loss": final, "wall_s": wall, **out}


#: the overhead's model sizes: (width, layers, batch, context); ``toy`` is the benchmark's LM and batch (512
#: tokens, ~0.1M parameters), ``realistic`` a 6-layer width-256 LM (~4.8M parameters, 512 tokens), a step of
#: ~0.2-0.3 s on one CPU thread; ``realistic_2k`` the same LM on 4x the tokens (2,048 a step, ~0.7 s)
OVERHEAD_SIZES = {"toy": (WIDTH, 2, BATCH, CONTEXT), "realistic": (256, 6, 4, 128), "realistic_2k": (256, 6, 16, 128)}


def overhead(reps: int = 200, seed: int = 0, skip: int = 40, size: str = "toy") -> Dict[str, Any]:
    """The guard's cost per training step at default settings: a guarded and an unguarded LM of ``size``
    (`OVERHEAD_SIZES`) stepped alternately (the order swapped every step) on the same clean batches in one
    process, so machine load hits both alike; the first ``skip`` steps (the detector's warm-up, 2 x 16 updates of
    exact statistics) left out. A third copy is guarded with the global gradient norm handed to it
    (``guard.step(loss, grad_norm=clip_grad_norm_(...))``, no clipping: max_norm inf), its own time measured
    without the clipping, which the loop pays anyway. Measures, medians with their interquartile range:

    * ``own``: the guarded call minus the optimizer step inside it (the guard's own work; it also pays the cache
      misses of the first work after the backward, which the optimizer step pays in the unguarded run);
    * ``around_step``: the guarded call minus the unguarded run's ``opt.step()`` of the same iteration (both
      timed from the end of the backward: the guard's incremental cost, with the optimizer's noise in it);
    * ``step``: the whole-step ratio (forward, backward, step; the noisiest);
    * ``own_given_norm``: ``own`` of the copy handed the gradient norm;
    * ``step_paired``: what a user's step costs more, the median over the iterations of the whole-step
      difference (guarded minus unguarded, same batch, adjacent in time) over the unguarded median step, with
      its 5-95% bootstrap interval, by wall clock and by the thread's CPU time (``given``: the copy handed the
      norm, its clipping call included). The allocator is held still first (`benchmarks.harness.stable_allocator`:
      glibc would otherwise unmap and map again the optimizer's large blocks at every step, page faults that
      land on one arm or the other)."""
    from stability_toolbox import StabilityGuard

    from benchmarks.harness import median_with_interval, stable_allocator

    stable_allocator()

    width, layers, batch_size, context = OVERHEAD_SIZES[size]
    task = Task("clean", seed, reps + skip)

    def model_and_opt():
        torch.manual_seed(seed)
        model = TinyLM(width, layers, context)
        return model, torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)

    def batch_of(i):
        if size == "toy":
            return task.batch(i)
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)  # the toy's Markov source at this context
        x = torch.empty(batch_size, context + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, VOCAB, (batch_size,), generator=g)
        for t in range(context):
            x[:, t + 1] = torch.multinomial(task.probs[x[:, t]], 1, generator=g).squeeze(1)
        return x, 1.0

    arms = {name: model_and_opt() for name in ("none", "guard", "given")}
    guards = {name: StabilityGuard(*arms[name]) for name in ("guard", "given")}
    inner: Dict[str, List[float]] = {"guard": [], "given": []}
    for name, guard in guards.items():
        original = guard._original_step

        def timed_original(original=original, name=name, **kwargs):  # the optimizer's own step: not overhead
            start = time.perf_counter()
            original(**kwargs)
            inner[name].append(time.perf_counter() - start)

        guard._original_step = timed_original
    times: Dict[str, List[float]] = {"none": [], "guard": [], "given": [], "own": [], "around_step": [],
                                     "own_given_norm": []}
    cpu: Dict[str, List[float]] = {"none": [], "guard": [], "given": []}  # the thread's CPU time of each step
    for i in range(reps + skip):
        batch = batch_of(i)
        order = ["none", "guard", "given"]
        order = order[i % 3:] + order[:i % 3]  # rotated every step
        calls = {}
        for name in order:
            model, opt = arms[name]
            start, start_cpu = time.perf_counter(), time.thread_time()
            loss = loss_of(model, batch)
            loss.backward()
            if name == "given":
                norm = nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            call = time.perf_counter()
            if name == "none":
                opt.step()
            elif name == "guard":
                guards[name].step(loss)
            else:
                guards[name].step(loss, grad_norm=norm)
            calls[name] = time.perf_counter() - call
            opt.zero_grad()
            if i >= skip:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.thread_time() - start_cpu)
        if i >= skip:
            times["own"].append(calls["guard"] - inner["guard"][-1])
            times["own_given_norm"].append(calls["given"] - inner["given"][-1])
            times["around_step"].append(calls["guard"] - calls["none"])
    base = statistics.median(times["none"])

    def summary(xs: List[float], scale: float) -> Dict[str, Any]:
        q = statistics.quantiles(xs, n=4)
        return {"median": scale * statistics.median(xs), "iqr": [scale * q[0], scale * q[2]]}

    ratios = [g / n - 1 for g, n in zip(times["guard"], times["none"])]

    def paired(clock: Dict[str, List[float]], arm: str) -> Dict[str, float]:
        scale = 100 / statistics.median(clock["none"])
        med, lo, hi = median_with_interval([a - b for a, b in zip(clock[arm], clock["none"])], seed=seed)
        return {"median": scale * med, "interval_5_95": [scale * lo, scale * hi]}

    return {"none_step_median_ms": 1e3 * base, "guard_step_median_ms": 1e3 * statistics.median(times["guard"]),
            "own_ms": summary(times["own"], 1e3), "own_pct_of_step": summary(times["own"], 100 / base),
            "around_step_ms": summary(times["around_step"], 1e3),
            "around_step_pct_of_step": summary(times["around_step"], 100 / base),
            "step_ratio_pct": summary(ratios, 100),
            "own_given_norm_ms": summary(times["own_given_norm"], 1e3),
            "own_given_norm_pct_of_step": summary(times["own_given_norm"], 100 / base),
            "step_paired_pct": {arm: {"wall": paired(times, arm), "cpu": paired(cpu, arm)}
                                for arm in ("guard", "given")},
            "steps_s": {"wall": {arm: times[arm] for arm in ("none", "guard", "given")}, "cpu": cpu},
            "model": {"width": width, "layers": layers, "tokens_per_step": batch_size * context,
                      "parameters": sum(p.numel() for p in arms["none"][0].parameters())},
            "steps": reps, "warmup_steps_left_out": skip, "events": sum(len(g.events) for g in guards.values())}


def is_clean(mechanism: str) -> bool:
    return mechanism == "clean" or mechanism.endswith("_clean")


def twin_of(mechanism: str) -> str:
    return mechanism if is_clean(mechanism) else TWIN.get(mechanism, "clean")


def table(runs: List[Dict[str, Any]], tolerance: float = 0.02) -> str:
    twin = {(r["mechanism"], r["seed"]): r["final_loss"] for r in runs if is_clean(r["mechanism"]) and r["method"] == "none"}

    def ok(r):
        ref = twin[(twin_of(r["mechanism"]), r["seed"])]
        return r["final_loss"] <= ref * (1 + tolerance)

    runs = [r for r in runs if (twin_of(r["mechanism"]), r["seed"]) in twin]
    failing = {(r["mechanism"], r["seed"]) for r in runs
               if r["method"] == "none" and not is_clean(r["mechanism"]) and not ok(r)}
    lines = ["| mechanism | method | runs | within 2% of the clean twin | of the failing runs, recovered | "
             "median final / twin | median interventions | interventions, all runs | median updates lost | "
             "median wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for mech in MECHANISMS:
        for method in METHODS:
            rs = [r for r in runs if r["mechanism"] == mech and r["method"] == method]
            if not rs:
                continue
            fail_rs = [r for r in rs if (mech, r["seed"]) in failing]
            lines.append(
                f"| {mech} | {method} | {len(rs)} | {sum(map(ok, rs))}/{len(rs)} | "
                f"{sum(map(ok, fail_rs))}/{len(fail_rs)} | "
                f"{statistics.median(r['final_loss'] / twin[(twin_of(mech), r['seed'])] for r in rs):.4f} | "
                f"{statistics.median(r['interventions'] for r in rs):g} | "
                f"{sum(r['interventions'] for r in rs)} | "
                f"{statistics.median(r['updates_lost'] for r in rs):g} | "
                f"{statistics.median(r['wall_s'] for r in rs):.1f} |")
    return "\n".join(lines)


def _relative(path: str) -> str:
    """``path`` relative to the repository when it lies inside it, else as given."""
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return path


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output directory (results/guard); finished runs in it are kept")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-list", default=None, help="run these seeds only (comma-separated; e.g. one per process)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--mechanisms", default=",".join(MECHANISMS))
    parser.add_argument("--rerun", action="store_true",
                        help="run the selected (mechanism, method, seed) cells again, replacing their stored runs "
                             "(e.g. after a change of the guard)")
    parser.add_argument("--overhead", type=int, default=0, metavar="STEPS",
                        help="only measure the guard's step-time overhead: STEPS paired steps of the toy LM, "
                             "then STEPS // 3 of each larger size (OVERHEAD_SIZES), in this one process")
    parser.add_argument("--overhead-sizes", default="toy,realistic",
                        help="the sizes --overhead measures (comma-separated; "
                             f"{', '.join(OVERHEAD_SIZES)}); the others already in overhead.json are kept")
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
    sizes = args.overhead_sizes.split(",")
    for size in sizes:
        if size not in OVERHEAD_SIZES:
            parser.error(f"--overhead-sizes: unknown {size!r}; accepted: {', '.join(OVERHEAD_SIZES)}")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    given = list(sys.argv[1:] if argv is None else argv)
    # the command as recorded in the JSON: an output directory inside the repository by its relative path (no
    # path of this machine in a committed result)
    command = "python -m benchmarks.spike_benchmark " + " ".join(_relative(a) if a == args.out else a for a in given)
    if args.overhead:
        result = {size: {**overhead(args.overhead if size == "toy" else max(args.overhead // 3, 20), size=size),
                         "command": command} for size in sizes}
        path = out / "overhead.json"
        kept = json.loads(path.read_text()) if path.exists() else {}  # the sizes not measured now stay
        with atomic_write(path) as f:
            json.dump({**kept, "command": command, "torch": torch.__version__, **result}, f, indent=1)
        print(json.dumps(result))
        return 0
    path = out / "spike_benchmark.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    seeds = range(args.seeds) if args.seed_list is None else [int(x) for x in args.seed_list.split(",")]
    if args.rerun:  # the selected cells are replaced as each is run again (an interrupted rerun keeps the rest)
        redo = {(mech, method, seed, args.steps) for seed in seeds for mech in mechanisms for method in methods}
    else:
        redo = set()
    done = {(r["mechanism"], r["method"], r["seed"], r.get("steps", args.steps)) for r in runs} - redo
    for seed in seeds:
        for mech in mechanisms:
            for method in methods:
                if (mech, method, seed, args.steps) in done:
                    continue
                r = run_one(mech, method, seed, args.steps)
                r["steps"] = args.steps
                runs = [x for x in runs if (x["mechanism"], x["method"], x["seed"], x.get("steps", args.steps)) !=
                        (mech, method, seed, args.steps)]
                runs.append(r)
                print(json.dumps(r), flush=True)
                with atomic_write(path) as f:
                    json.dump({"command": command,
                               "torch": torch.__version__, "runs": runs}, f, indent=1)
    text = table([r for r in runs if r.get("steps") == args.steps])
    with atomic_write(out / "spike_benchmark.md") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
