"""Stability of deep Post-LN training on real data: Post-LN, Pre-LN, Admin O(logn), DeepNorm.

Multi30k En-De (``<repo>/../shared/data/multi30k``, raw .gz), a joint sentencepiece model
(sentencepiece Python API), a deep narrow transformer (default 18L-18L, width 64) trained with the
real fairseq-train at a learning rate where plain Post-LN fails, four variants side by side:

* ``post_ln``  stock ``transformer`` (Post-LN)
* ``pre_ln``   stock ``transformer`` with ``--encoder-normalize-before --decoder-normalize-before``
* ``admin``    ``transformer_admin`` ``--admin-init admin --admin-output-change-scale O(logn)``
* ``deepnorm`` ``transformer_admin`` ``--admin-init deepnorm``

Reports the final validation loss, BLEU on test_2016_flickr (fairseq-generate + sacrebleu on
detokenized output against the raw references) and a PNG of the training curves.

The machine is a small shared CPU, so the experiment is scaled to a fixed budget (a few hundred
updates on a subset of the training data, the four runs in parallel, one thread each); the budget
is printed and written with the results. Example::

    python benchmarks/admin_multi30k_stability.py             # the full budget
    python benchmarks/admin_multi30k_stability.py --quick     # a smoke run (minutes)
"""

import argparse
import gzip
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

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


def train_cmd(bin_dir, save_dir, variant, a):
    return [BIN / "fairseq-train", bin_dir, "--user-dir", REPO / "fairseq_plugins", *VARIANTS[variant],
            "--encoder-layers", a.layers, "--decoder-layers", a.layers,
            "--encoder-embed-dim", a.dim, "--decoder-embed-dim", a.dim,
            "--encoder-ffn-embed-dim", 4 * a.dim, "--decoder-ffn-embed-dim", 4 * a.dim,
            "--encoder-attention-heads", 4, "--decoder-attention-heads", 4, "--share-all-embeddings",
            "--dropout", 0.1, "--attention-dropout", 0.1, "--activation-dropout", 0.1,
            "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", a.lr,
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", a.warmup, "--warmup-init-lr", 1e-7,
            "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", 0.1,
            "--max-tokens", a.max_tokens, "--max-update", a.updates, "--seed", 1, "--cpu", "--num-workers", 0,
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
            "--gen-subset", "test", "--beam", a.beam, "--lenpen", 0.6, "--batch-size", 128, "--cpu",
            "--num-workers", 0, "--remove-bpe", "sentencepiece", "--max-len-a", 1.2, "--max-len-b", 10]


def bleu(work: Path, variant: str) -> float:
    """sacrebleu of the detokenized hypotheses of generate_<variant>.log against the raw references."""
    import sacrebleu

    log = work / f"generate_{variant}.log"
    hyps = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        m = re.match(r"D-(\d+)\t\S+\t(.*)$", line)
        if m:
            hyps[int(m.group(1))] = m.group(2)
    refs = (work / "raw" / "test.de").read_text(encoding="utf-8").splitlines()
    out = [hyps.get(i, "") for i in range(len(refs))]
    return sacrebleu.corpus_bleu(out, [refs]).score


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "multi30k")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "admin_multi30k")
    p.add_argument("--quick", action="store_true", help="a smoke run: 4L-4L, 20 updates")
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--updates", type=int, default=160)
    p.add_argument("--max-tokens", type=int, default=768)
    p.add_argument("--train-sentences", type=int, default=8000)
    p.add_argument("--valid-sentences", type=int, default=200)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--beam", type=int, default=2)
    p.add_argument("--stop-time-hours", type=float, default=0, help="fairseq-train's time cap per run (0: none)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    a = p.parse_args(argv)
    if a.quick:
        a.layers, a.updates, a.warmup, a.train_sentences, a.beam = 4, 20, 10, 2000, 1
        a.out = a.out.with_name(a.out.name + "_quick")
    a.log_interval = max(1, a.updates // 40)
    a.valid_every = max(10, a.updates // 4)
    if not a.data.is_dir():
        sys.exit(f"Multi30k not found at {a.data} (expected <repo>/../shared/data/multi30k)")
    a.out.mkdir(parents=True, exist_ok=True)
    budget = (f"{a.layers}L-{a.layers}L width {a.dim} (ffn {4 * a.dim}, 4 heads), {a.updates} updates x "
              f"{a.max_tokens} tokens, {a.train_sentences} training pairs, lr {a.lr} (inverse_sqrt, warmup "
              f"{a.warmup}), vocab {a.vocab}, {len(a.variants)} runs in parallel, 1 thread each")
    print(f"budget: {budget}", flush=True)
    t0 = time.time()
    bin_dir = prepare(a.data, a.out, a.train_sentences, a.valid_sentences, a.vocab)
    print(f"data ready ({time.time() - t0:.0f}s)", flush=True)

    procs = {}
    cpu0 = os.times()
    for v in a.variants:
        save = a.out / f"ckpt_{v}"
        log = open(a.out / f"train_{v}.log", "w")
        procs[v] = (subprocess.Popen([str(c) for c in train_cmd(bin_dir, save, v, a)], stdout=log,
                                     stderr=subprocess.STDOUT, env=env(), cwd=REPO), log)
    while any(pr.poll() is None for pr, _ in procs.values()):
        time.sleep(15)
        status = []
        for v in a.variants:
            (tr, _), _ = parse_log((a.out / f"train_{v}.log").read_text())
            status.append(f"{v} {tr[-1] if tr else 0}/{a.updates}")
        print(f"[{time.time() - t0:5.0f}s] " + ", ".join(status), flush=True)
    results = {}
    for v, (pr, log) in procs.items():
        log.close()
        text = (a.out / f"train_{v}.log").read_text()
        (tu, tl), (vu, vl) = parse_log(text)
        ckpt = a.out / f"ckpt_{v}" / "checkpoint_last.pt"
        finite = bool(tl) and all(math.isfinite(x) for x in tl)
        results[v] = {"returncode": pr.returncode, "train_updates": tu, "train_loss": tl, "valid_updates": vu,
                      "valid_loss": vl, "final_valid_loss": vl[-1] if vl else None,
                      "final_train_loss": tl[-1] if tl else None,
                      "nan_or_crash": pr.returncode != 0 or not finite}
    print(f"[{time.time() - t0:5.0f}s] training done; generating test_2016_flickr (beam {a.beam})", flush=True)
    gens = {}
    for v in a.variants:
        ckpt = a.out / f"ckpt_{v}" / "checkpoint_last.pt"
        if ckpt.exists():
            log = open(a.out / f"generate_{v}.log", "w")
            gens[v] = (subprocess.Popen([str(c) for c in generate_cmd(bin_dir, ckpt, a)], stdout=log,
                                        stderr=subprocess.STDOUT, env=env(), cwd=REPO), log)
    for v in a.variants:
        results[v]["bleu"] = None
        if v in gens:
            pr, log = gens[v]
            pr.wait()
            log.close()
            results[v]["bleu"] = bleu(a.out, v) if pr.returncode == 0 else None
        print(f"{v}: BLEU {results[v]['bleu']}", flush=True)
    cpu1 = os.times()
    cpu_minutes = (cpu1.children_user + cpu1.children_system - cpu0.children_user - cpu0.children_system) / 60
    wall = time.time() - t0

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v in a.variants:
        r = results[v]
        axes[0].plot(r["train_updates"], r["train_loss"], label=v)
        axes[1].plot(r["valid_updates"], r["valid_loss"], marker="o", label=v)
    axes[0].set(title=f"train loss, Multi30k En-De {a.layers}L-{a.layers}L d={a.dim}, lr {a.lr}",
                xlabel="update", ylabel="label-smoothed loss (base 2)")
    axes[1].set(title="validation loss", xlabel="update", ylabel="loss (base 2)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.out / "training_curves.png", dpi=110)

    summary = {"budget": budget, "cpu_minutes": cpu_minutes, "wall_seconds": wall, "results": results}
    (a.out / "results.json").write_text(json.dumps(summary, indent=1))
    lines = ["| variant | final valid loss | final train loss | BLEU test_2016_flickr | NaN or crash |",
             "| --- | --- | --- | --- | --- |"]
    for v in a.variants:
        r = results[v]
        fmt = lambda x, d=3: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
        lines.append(f"| {v} | {fmt(r['final_valid_loss'])} | {fmt(r['final_train_loss'])} | {fmt(r['bleu'], 2)} | "
                     f"{r['nan_or_crash']} |")
    table = "\n".join(lines)
    (a.out / "results.md").write_text(f"budget: {budget}\n\nCPU minutes (all runs): {cpu_minutes:.1f}, wall "
                                      f"{wall / 60:.1f} min\n\n{table}\n")
    print(table)
    print(f"CPU minutes (children): {cpu_minutes:.1f}, wall {wall / 60:.1f} min; plot {a.out / 'training_curves.png'}")


if __name__ == "__main__":
    main()
