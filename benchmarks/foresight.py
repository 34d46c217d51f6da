"""Foresight: do the monitor's signals warn before a run fails, on every mechanism, and ahead of the peers?

Tiny decoder-only LMs (d=64, 4 heads, seq 32, batch 16, AdamW (0.9, 0.95), eps 1e-8, no weight decay,
linear warm-up then cosine decay to 10%) on the English side of Multi30k (word level, 2,000 words),
one thread, niced; the reference stacks of ``admin_torch`` and, for models the rules were *not*
calibrated on, ``torch.nn.TransformerEncoder`` LMs. Every update records the scalars of
`stability_toolbox.leading_signals` (loss, gradient norm, gradient RMS over Adam's eps, update/parameter
RMS, log Z, attention logits and entropy, linear output RMS, activation kurtosis, Adam's second moment),
so lead times are known to one update; the `StabilityMonitor` runs beside them (every 10 updates) so its
``DEFAULT_RULES`` can be scored too.

Subcommands::

    python -m benchmarks.foresight grid [--work DIR] [--seeds 1,3,2,4,5]   # resumable: one JSON per run
    python -m benchmarks.foresight analyze [--work DIR]                     # tables under results/monitor/

The work directory defaults to ``<system temp>/stability_foresight`` (``--work`` names another); a run
whose ``<run>.json`` exists is skipped, so a killed grid continues where it stopped.

Mechanisms (``GRID``): each *candidate* (expected to fail, with a warm-up long enough that it learns
first) has a *twin* of the same seed that trains (its remedy or a lower rate); *controls* are stable runs.
``tnn_*`` groups are ``torch.nn.TransformerEncoder`` LMs, never used to calibrate.

Onset (on the run's own trajectory, `own_onset`): the first update from which its smoothed loss
(mean of 10) stays above its running minimum by more than 5% for the next 20 updates, or from which it
improves by less than 1% over the next 50 updates while its twin improves by more than 5% (a stall).
Twin separation (`benchmarks.stability_grid.separation`) is reported beside it.
"""

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

from toolbox_core.files import atomic_write

from benchmarks import stability_grid as sg

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "monitor"
WORK = Path(tempfile.gettempdir()) / "stability_foresight"

UPDATES = 400
SEQ, BATCH, DIM, HEADS = 32, 16, 64, 4

#: calibration seeds (the rules' thresholds are set on these runs only) and evaluation seeds
CALIBRATION_SEEDS = (1,)
EVALUATION_SEEDS = (2, 3, 4, 5)

# group -> [(variant, role, settings)]; role: candidate (expected to fail), twin (its trained counterpart),
# control (stable). model "stack": admin_torch.make_stack; "tnn": torch.nn.TransformerEncoder
GRID: Dict[str, list] = {
    "deep_postln": [
        ("post_ln_d12", "candidate", dict(model="stack", kind="post_ln", depth=12, lr=2e-3, warmup=100)),
        ("admin_d12", "twin", dict(model="stack", kind="admin", depth=12, lr=2e-3, warmup=100)),
        ("post_ln_d8_lr3e-3", "candidate", dict(model="stack", kind="post_ln", depth=8, lr=3e-3, warmup=100)),
        ("pre_ln_d12", "control", dict(model="stack", kind="pre_ln", depth=12, lr=2e-3, warmup=100)),
    ],
    "slow_postln": [
        ("post_ln_d12_lr3e-4", "candidate", dict(model="stack", kind="post_ln", depth=12, lr=3e-4, warmup=40)),
        ("admin_d12_lr3e-4", "twin", dict(model="stack", kind="admin", depth=12, lr=3e-4, warmup=40)),
    ],
    "attn_logits": [
        ("pre_ln_lr0.1", "candidate", dict(model="stack", kind="pre_ln", depth=2, lr=0.1, warmup=150)),
        ("pre_ln_lr0.1_qk", "twin", dict(model="stack", kind="pre_ln", depth=2, lr=0.1, qk_norm=True, warmup=150)),
        ("pre_ln_lr0.01", "control", dict(model="stack", kind="pre_ln", depth=2, lr=1e-2, warmup=150)),
    ],
    "output_logits": [
        ("qk_lr1", "candidate", dict(model="stack", kind="pre_ln", depth=2, lr=1.0, qk_norm=True, warmup=200)),
        ("qk_lr0.5", "candidate", dict(model="stack", kind="pre_ln", depth=2, lr=0.5, qk_norm=True, warmup=150)),
        ("qk_lr0.03", "twin", dict(model="stack", kind="pre_ln", depth=2, lr=3e-2, qk_norm=True, warmup=150)),
    ],
    "bad_data": [
        ("pre_ln_noise", "candidate", dict(model="stack", kind="pre_ln", depth=2, lr=3e-3, warmup=40,
                                            noise_from=200, noise_ramp=100)),
        ("pre_ln_clean", "twin", dict(model="stack", kind="pre_ln", depth=2, lr=3e-3, warmup=40)),
    ],
    # torch.nn's own TransformerEncoder LMs: never used to calibrate (generalisation)
    "tnn_postln": [
        ("post_ln_d12", "candidate", dict(model="tnn", norm_first=False, depth=12, lr=2e-3, warmup=100)),
        ("pre_ln_d12", "twin", dict(model="tnn", norm_first=True, depth=12, lr=2e-3, warmup=100)),
    ],
    "tnn_attn_logits": [
        ("pre_ln_lr0.1", "candidate", dict(model="tnn", norm_first=True, depth=2, lr=0.1, warmup=150)),
        ("pre_ln_lr0.1_qk", "twin", dict(model="tnn", norm_first=True, depth=2, lr=0.1, qk_norm=True, warmup=150)),
    ],
}
#: groups whose runs never calibrate (models the rules were not set on)
UNSEEN_GROUPS = frozenset({"tnn_postln", "tnn_attn_logits"})


# ----------------------------------------------------------------------------- models and training

def build(settings: dict, seed: int):
    """The LM of ``settings`` (embedding, stack, output head), initialised from ``seed``."""
    import torch
    from torch import nn

    from admin_torch import add_qk_norm, make_stack

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.embed = nn.Embedding(sg.VOCAB, DIM)
            nn.init.normal_(self.embed.weight, std=DIM ** -0.5)
            if settings["model"] == "stack":
                self.stack = make_stack(settings["kind"], settings["depth"], DIM, heads=HEADS, seed=seed, causal=True,
                                        qk_norm=settings.get("qk_norm", False))
                self.causal = False
            else:
                layer = nn.TransformerEncoderLayer(DIM, HEADS, 4 * DIM, dropout=0.0, batch_first=True,
                                                   norm_first=settings["norm_first"])
                self.stack = nn.TransformerEncoder(layer, settings["depth"], enable_nested_tensor=False,
                                                   norm=nn.LayerNorm(DIM) if settings["norm_first"] else None)
                if settings.get("qk_norm"):
                    add_qk_norm(self.stack)
                self.causal = True
            self.head = nn.Linear(DIM, sg.VOCAB, bias=False)

        def forward(self, tokens):
            x = self.embed(tokens)
            if self.causal:
                mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
                return self.head(self.stack(x, mask=mask, is_causal=True))
            return self.head(self.stack(x))

    return TinyLM()


def noise_fraction(step: int, settings: dict) -> float:
    """The share of a batch's rows replaced by uniformly random tokens at ``step`` (bad data injected from
    ``noise_from``, ramping up linearly over ``noise_ramp`` updates)."""
    start = settings.get("noise_from")
    if start is None or step < start:
        return 0.0
    return min(1.0, (step - start + 1) / max(1, settings.get("noise_ramp", 1)))


def train_one(settings: dict, seed: int, data, updates: int = UPDATES, interval: int = 10,
              monitor_dir: Optional[Path] = None) -> dict:
    """One run: its per-update signals, the monitor's records, the final validation loss."""
    import torch
    import torch.nn.functional as F

    from stability_toolbox import StabilityMonitor
    from stability_toolbox.leading_signals import UpdateSignals

    torch.set_num_threads(1)
    train, valid = data
    model = build(settings, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1000 + seed)
    noise_gen = torch.Generator().manual_seed(5000 + seed)
    sig = UpdateSignals(model, opt)
    quiet = logging.getLogger("benchmarks.foresight.monitor")  # the warnings are in the records; keep the log short
    quiet.setLevel(logging.ERROR)
    quiet.propagate = False
    mon = StabilityMonitor(model, monitor_dir, every=interval, tensorboard=False, heatmaps=False, log=quiet)
    warmup = settings.get("warmup", 40)
    t0 = time.time()
    for step in range(updates):
        for g in opt.param_groups:
            g["lr"] = sg.lr_at(step, settings["lr"], warmup, updates)
        starts = torch.randint(0, train.numel() - SEQ - 1, (BATCH,), generator=gen)
        batch = torch.stack([train[s:s + SEQ + 1] for s in starts.tolist()])
        bad = int(round(noise_fraction(step, settings) * BATCH))
        if bad:  # injected bad data: rows of uniformly random words
            batch[:bad] = torch.randint(0, sg.VOCAB, (bad, SEQ + 1), generator=noise_gen)
        sig.begin_update()
        with mon.step() as s:
            logits = model(batch[:, :-1])
            mon.observe_logits(logits)
            sig.observe_logits(logits)
            loss = F.cross_entropy(logits.reshape(-1, sg.VOCAB), batch[:, 1:].reshape(-1))
            loss.backward()
            mon.capture_grads()
            sig.after_backward()
            opt.step()
            sig.after_step(loss)
            opt.zero_grad(set_to_none=True)
            s.loss = loss.detach()
    seconds = time.time() - t0
    signals = sig.read()
    sig.remove()
    mon.close()
    valid_loss = sg.validation_loss(model, valid)
    from stability_toolbox.records import _json_safe
    return {"settings": settings, "seed": seed, "updates": updates, "interval": interval,
            "valid_loss": valid_loss, "train_seconds": seconds, "signals": _json_safe(signals),
            "monitor": _json_safe(mon.history)}


def run_name(group: str, variant: str, seed: int) -> str:
    return f"{group}__{variant}__s{seed}"


def jobs(seeds, groups=None) -> list:
    """``[(run name, settings, seed, extra)]``, seed-major (an interrupted grid has whole seeds)."""
    out = []
    for seed in seeds:
        for group, variants in GRID.items():
            if groups and group not in groups:
                continue
            for variant, role, settings in variants:
                out.append((run_name(group, variant, seed), settings, seed,
                            {"group": group, "variant": variant, "role": role}))
    return out


def run_grid(job_list, work: Path, budget_min: float, updates: int = UPDATES) -> None:
    """Train every job whose ``<work>/<run>.json`` does not exist yet (within ``budget_min`` minutes)."""
    work.mkdir(parents=True, exist_ok=True)
    data = sg.load_data()
    t0 = time.time()
    for i, (name, settings, seed, extra) in enumerate(job_list):
        done = work / f"{name}.json"
        if done.exists():
            continue
        if (time.time() - t0) / 60 > budget_min:
            print(f"budget of {budget_min} min spent; {len(job_list) - i} runs left (run again to continue)",
                  flush=True)
            return
        result = train_one(settings, seed, data, updates=updates)
        result.update(extra)
        with atomic_write(done) as f:  # a killed grid never leaves half a result
            f.write(json.dumps(result))
        print(f"[{time.time() - t0:6.0f}s] {name}: valid {result['valid_loss']:.3f}, "
              f"{result['train_seconds']:.0f}s", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("grid", "analyze"))
    ap.add_argument("--work", type=Path, default=WORK, help=f"the work directory (default {WORK})")
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--groups", default="", help="only these groups (comma-separated; default all)")
    ap.add_argument("--updates", type=int, default=UPDATES)
    ap.add_argument("--budget-min", type=float, default=600.0)
    a = ap.parse_args(argv)
    if a.what == "grid":
        run_grid(jobs([int(s) for s in a.seeds.split(",")], a.groups.split(",") if a.groups else None), a.work,
                 a.budget_min, a.updates)
    else:
        from benchmarks import foresight_analysis
        foresight_analysis.analyze(a.work, OUT)


if __name__ == "__main__":
    sys.exit(main())
