"""Stability of deep Post-LN training on real data across learning rates: Post-LN, Pre-LN, Admin, DeepNorm.

Multi30k En-De (``<repo>/../shared/data/multi30k``, raw .gz), a joint sentencepiece model
(sentencepiece Python API), a deep narrow transformer (default 18L-18L, width 64) trained with the
real fairseq-train for every variant x learning rate (``--lrs``: the learning rate is part of the
stability claim) x seed:

* ``post_ln``  stock ``transformer`` (Post-LN)
* ``pre_ln``   stock ``transformer`` with ``--encoder-normalize-before --decoder-normalize-before``
* ``admin``    ``transformer_admin`` ``--admin-init admin --admin-output-change-scale O(logn)``
* ``deepnorm`` ``transformer_admin`` ``--admin-init deepnorm``

Reports, per variant and learning rate, the final validation loss (label-smoothed, base 2) and BLEU on
test_2016_flickr (fairseq-generate + sacrebleu on detokenized output against the raw references) as
mean +- std over the seeds, and a plot of both against the learning rate. Every run keeps its own
directory with a ``result.json``; a finished run is reused, so an interrupted sweep continues where it
stopped. Runs go ``--jobs`` at a time, one thread each.

The default budget fits a 2-core CPU in about an hour (160 updates on 8000 training pairs); the
scale options (``--layers --dim --updates --train-sentences --max-tokens``) and ``--device cuda``
give paper-size runs. Example::

    python -m benchmarks.admin_multi30k_stability                         # 4 variants x 3 lrs x 3 seeds
    python -m benchmarks.admin_multi30k_stability --quick                 # a smoke run (minutes)
    python -m benchmarks.admin_multi30k_stability --updates 20000 --dim 512 --train-sentences 0 --device cuda
"""

import argparse
import gzip
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.sweep import mean_std, parse_list, recorded_args, run_jobs, write_json

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VARIANTS = {
    "post_ln": ["--arch", "transformer"],
    "pre_ln": ["--arch", "transformer", "--encoder-normalize-before", "--decoder-normalize-before"],
    "admin": ["--arch", "transformer_admin", "--admin-init", "admin", "--admin-output-change-scale", "O(logn)"],
    "deepnorm": ["--arch", "transformer_admin", "--admin-init", "deepnorm"],
}


def read_gz(path: Path, limit=None):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    return lines[:limit] if limit else lines


def prepare(data: Path, work: Path, n_train: int, n_valid: int, vocab: int) -> Path:
    """Subset, sentencepiece (joint En+De), fairseq-preprocess; returns the binarized dir."""
    import sentencepiece as spm

    bin_dir = work / "bin"
    if (bin_dir / "dict.en.txt").exists():
        return bin_dir
    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    splits = {"train": ("train", n_train), "valid": ("val", n_valid), "test": ("test_2016_flickr", None)}
    text = {}
    for split, (name, limit) in splits.items():
        for lang in ("en", "de"):
            text[split, lang] = read_gz(data / f"{name}.{lang}.gz", limit)
            (raw / f"{split}.{lang}").write_text("\n".join(text[split, lang]) + "\n", encoding="utf-8")
    spm_input = raw / "spm_input.txt"
    spm_input.write_text("\n".join(text["train", "en"] + text["train", "de"]) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(spm_input), model_prefix=str(work / "spm"), vocab_size=vocab,
                                   model_type="unigram", character_coverage=1.0, num_threads=1,
                                   input_sentence_size=100000, shuffle_input_sentence=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(work / "spm.model"))
    tok = work / "tok"
    tok.mkdir(exist_ok=True)
    for (split, lang), lines in text.items():
        pieces = sp.encode(lines, out_type=str)
        (tok / f"{split}.{lang}").write_text("\n".join(" ".join(p) for p in pieces) + "\n", encoding="utf-8")
    run([BIN / "fairseq-preprocess", "--source-lang", "en", "--target-lang", "de", "--trainpref", tok / "train",
         "--validpref", tok / "valid", "--testpref", tok / "test", "--destdir", bin_dir, "--joined-dictionary",
         "--workers", "1"], work / "preprocess.log")
    return bin_dir


def env():
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e


def run(cmd, log: Path):
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed, see {log}:\n" + log.read_text()[-3000:])


def train_cmd(bin_dir, save_dir, variant, lr, seed, a):
    return [BIN / "fairseq-train", bin_dir, "--user-dir", REPO / "fairseq_plugins", *VARIANTS[variant],
            "--encoder-layers", a.layers, "--decoder-layers", a.layers,
            "--encoder-embed-dim", a.dim, "--decoder-embed-dim", a.dim,
            "--encoder-ffn-embed-dim", 4 * a.dim, "--decoder-ffn-embed-dim", 4 * a.dim,
            "--encoder-attention-heads", 4, "--decoder-attention-heads", 4, "--share-all-embeddings",
            "--dropout", 0.1, "--attention-dropout", 0.1, "--activation-dropout", 0.1,
            "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", lr,
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", a.warmup, "--warmup-init-lr", 1e-7,
            "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", 0.1,
            "--max-tokens", a.max_tokens, "--max-update", a.updates, "--seed", seed, "--num-workers", 0,
            *(["--cpu"] if a.device == "cpu" else []),
            "--save-dir", save_dir, "--no-epoch-checkpoints", "--save-interval-updates", 0,
            "--log-format", "simple", "--log-interval", a.log_interval, "--no-progress-bar",
            "--validate-interval-updates", a.valid_every,
            *(["--stop-time-hours", a.stop_time_hours] if a.stop_time_hours else [])]


def parse_log(log: str):
    """(updates, train losses), (updates, valid losses) from a fairseq-train log."""
    train, valid = ([], []), ([], [])
    for line in log.splitlines():
        kind = re.search(r"\| (train_inner|valid) \|", line)
        loss = re.search(r"[| ]loss[= ]([^,| ]+)", line)
        upd = re.search(r"num_updates[= ](\d+)", line)
        if kind and loss and upd:
            target = train if kind.group(1) == "train_inner" else valid
            try:
                value = float(loss.group(1))
            except ValueError:
                value = math.nan
            target[0].append(int(upd.group(1)))
            target[1].append(value)
    return train, valid


def generate_cmd(bin_dir: Path, ckpt: Path, a):
    return [BIN / "fairseq-generate", bin_dir, "--user-dir", REPO / "fairseq_plugins", "--path", ckpt,
            "--gen-subset", "test", "--beam", a.beam, "--lenpen", 0.6, "--batch-size", 128,
            *(["--cpu"] if a.device == "cpu" else []), "--num-workers", 0, "--remove-bpe", "sentencepiece", "--max-len-a", 1.2, "--max-len-b", 10]


def bleu(log: Path, refs_file: Path) -> float:
    """sacrebleu of the detokenized hypotheses in a fairseq-generate log against the raw references."""
    import sacrebleu

    hyps = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        m = re.match(r"D-(\d+)\t\S+\t(.*)$", line)
        if m:
            hyps[int(m.group(1))] = m.group(2)
    refs = refs_file.read_text(encoding="utf-8").splitlines()
    out = [hyps.get(i, "") for i in range(len(refs))]
    return sacrebleu.corpus_bleu(out, [refs]).score


def one_run(bin_dir: Path, data_dir: Path, variant: str, lr: str, seed: int, a) -> dict:
    """Train, then translate test_2016_flickr, in ``a.work/runs/<variant>-lr<lr>-s<seed>``; reuses a finished run."""
    run_dir = a.work / "runs" / f"{variant}-lr{lr}-s{seed}"
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "w") as log:
        code = subprocess.run([str(c) for c in train_cmd(bin_dir, run_dir / "ckpt", variant, lr, seed, a)],
                              stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=REPO).returncode
    (tu, tl), (vu, vl) = parse_log((run_dir / "train.log").read_text())
    result = {"variant": variant, "lr": lr, "seed": seed, "returncode": code, "train_updates": tu, "train_loss": tl,
              "valid_updates": vu, "valid_loss": vl, "final_valid_loss": vl[-1] if vl else None,
              "final_train_loss": tl[-1] if tl else None,
              "diverged": code != 0 or not tl or not all(math.isfinite(x) for x in tl), "bleu": None}
    ckpt = run_dir / "ckpt" / "checkpoint_last.pt"
    if ckpt.exists():
        with open(run_dir / "generate.log", "w") as log:
            gen = subprocess.run([str(c) for c in generate_cmd(bin_dir, ckpt, a)], stdout=log,
                                 stderr=subprocess.STDOUT, env=env(), cwd=REPO).returncode
        if gen == 0:
            result["bleu"] = bleu(run_dir / "generate.log", data_dir / "raw" / "test.de")
        ckpt.unlink()  # 18L-18L checkpoints are large and the result is all the table needs
        (run_dir / "ckpt" / "checkpoint_best.pt").unlink(missing_ok=True)
    write_json(done, result)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "multi30k")
    p.add_argument("--work", type=Path, default=REPO / "work" / "multi30k_stability",
                   help="prepared data and one directory per run (reused)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "admin", help="where the table and plot go")
    p.add_argument("--quick", action="store_true", help="a smoke run: 4L-4L, 20 updates, one seed, one lr")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--lrs", default="1e-3,2e-3,4e-3", help="comma-separated peak learning rates")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--layers", type=int, default=18, help="scale: encoder and decoder layers")
    p.add_argument("--dim", type=int, default=64, help="scale: model width (FFN 4x, 4 heads)")
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--updates", type=int, default=160, help="scale: updates per run")
    p.add_argument("--max-tokens", type=int, default=768)
    p.add_argument("--train-sentences", type=int, default=8000, help="scale: training pairs (0: all 29k)")
    p.add_argument("--valid-sentences", type=int, default=200)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--beam", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each on CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--stop-time-hours", type=float, default=0, help="fairseq-train's time cap per run (0: none)")
    a = p.parse_args(argv)
    variants = a.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; accepted: {', '.join(VARIANTS)}")
    lrs = [f"{x:g}" for x in parse_list(p, "--lrs", a.lrs)]
    seeds = parse_list(p, "--seeds", a.seeds, int, positive=False)
    if a.quick:
        a.layers, a.updates, a.warmup, a.train_sentences, a.beam = 4, 20, 10, 2000, 1
        lrs, seeds = lrs[:1], seeds[:1]
        a.work, a.out = a.work.with_name(a.work.name + "_quick"), a.work.with_name(a.work.name + "_quick")
    a.log_interval = max(1, a.updates // 40)
    a.valid_every = max(10, a.updates // 4)
    if not a.data.is_dir():
        p.error(f"--data: Multi30k not found at {a.data} (expected <repo>/../shared/data/multi30k)")
    budget = (f"{a.layers}L-{a.layers}L width {a.dim} (ffn {4 * a.dim}, 4 heads), {a.updates} updates x "
              f"{a.max_tokens} tokens, {a.train_sentences or 'all'} training pairs, inverse_sqrt (warmup {a.warmup}), "
              f"vocab {a.vocab}, beam {a.beam}, device {a.device}")
    jobs = [(v, lr, s) for s in seeds for lr in lrs for v in variants]
    print(f"budget: {budget}\n{len(jobs)} runs, {a.jobs} at a time", flush=True)
    t0 = time.time()
    data_dir = a.work / f"data-{a.train_sentences}-{a.vocab}"
    bin_dir = prepare(a.data, data_dir, a.train_sentences or None, a.valid_sentences, a.vocab)
    results = run_jobs(one_run, [(bin_dir, data_dir, *j, a) for j in jobs], a.jobs, label="runs",
                       describe=lambda r: f"{r['variant']} lr {r['lr']} seed {r['seed']}: valid loss "
                                          f"{r['final_valid_loss']}, BLEU {r['bleu']}")
    wall = time.time() - t0

    rows = []
    for v in variants:
        for lr in lrs:
            runs = [r for r in results if r["variant"] == v and r["lr"] == lr]
            loss, loss_sd = mean_std([r["final_valid_loss"] for r in runs])
            b, b_sd = mean_std([r["bleu"] for r in runs])
            first, _ = mean_std([r["valid_loss"][0] if r["valid_loss"] else None for r in runs])
            rows.append({"variant": v, "lr": lr, "seeds": len(runs), "diverged": sum(r["diverged"] for r in runs),
                         "valid_loss": loss, "valid_loss_std": loss_sd, "first_valid_loss": first, "bleu": b, "bleu_std": b_sd,
                         "per_seed_loss": [r["final_valid_loss"] for r in runs],
                         "per_seed_bleu": [r["bleu"] for r in runs]})
    fmt = lambda x, sd, d: "-" if x is None else f"{x:.{d}f} +- {sd:.{d}f}"  # noqa: E731
    lines = [f"Multi30k En-De, {budget}; seeds {','.join(map(str, seeds))}; validation loss (label-smoothed, "
             f"base 2) after the last update and BLEU (sacrebleu) on test_2016_flickr, mean +- std over seeds", "",
             f"| variant | lr | valid loss at update {a.valid_every} (mean) | valid loss at the end | BLEU | NaN or crash |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        first = "-" if r["first_valid_loss"] is None else f"{r['first_valid_loss']:.3f}"
        lines.append(f"| {r['variant']} | {r['lr']} | {first} | {fmt(r['valid_loss'], r['valid_loss_std'], 3)} | "
                     f"{fmt(r['bleu'], r['bleu_std'], 2)} | {r['diverged']}/{r['seeds']} |")
    lines += ["", f"command: python -m benchmarks.admin_multi30k_stability --variants {a.variants} --lrs {','.join(lrs)} "
              f"--seeds {','.join(map(str, seeds))} --layers {a.layers} --dim {a.dim} --updates {a.updates} --max-tokens {a.max_tokens} "
              f"--train-sentences {a.train_sentences} --device {a.device}",
              f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; wall {wall / 60:.0f} min "
              "(reused runs cost nothing)"]
    table = "\n".join(lines)
    print(table, flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "multi30k_stability.json").write_text(json.dumps({"budget": budget, "args": recorded_args(a), "rows": rows, "runs": results}))
    (a.out / "multi30k_stability.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, v in enumerate(variants):
        mine = [r for r in rows if r["variant"] == v]
        xs = [float(r["lr"]) for r in mine]
        for ax, key in zip(axes, ("valid_loss", "bleu")):
            for r in mine:
                ys = [y for y in r[f"per_seed_{'loss' if key == 'valid_loss' else 'bleu'}"] if y is not None]
                ax.scatter([float(r["lr"])] * len(ys), ys, s=8, color=f"C{i}", alpha=0.5)
            ok = [(x, r[key], r[f"{key}_std"]) for x, r in zip(xs, mine) if r[key] is not None]
            if ok:
                ax.errorbar(*zip(*[(x, y) for x, y, _ in ok]), yerr=[s for *_, s in ok], fmt="o-", capsize=4,
                            color=f"C{i}", label=v)
    axes[0].set(xscale="log", xlabel="peak learning rate", ylabel="validation loss (base 2)",
                title=f"Multi30k En-De {a.layers}L-{a.layers}L, {a.updates} updates, {len(seeds)} seeds")
    axes[1].set(xscale="log", xlabel="peak learning rate", ylabel="BLEU test_2016_flickr")
    for ax in axes:
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out / "multi30k_stability.png", dpi=120)
    print(f"wrote {a.out}/multi30k_stability.{{json,md,png}}")


if __name__ == "__main__":
    main()
