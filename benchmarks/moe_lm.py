"""Mixture-of-experts FFNs in a decoder-only LM: dense vs E experts with every router, several seeds.

Every run is ``recipes/lm/train.sh --model admin`` (Post-LN with Admin, English Multi30k) with
``--moe-experts E --moe-router R --criterion cross_entropy_moe`` added (dense: E = 0, the stock
criterion). All runs have the same active parameters per token (each expert has the dense FFN's
size), the same updates, tokens per update, learning rate and seeds. Reported per configuration:
the final validation loss (base 2, fairseq's, after the last update) as mean +- std over seeds,
and training words per second (fairseq's ``train_wps``). Runs go ``--jobs`` at a time (one
thread each), so words per second compare configurations within this run only.

The router's share of step time is measured in process on the same model (the ``transformer_lm_admin``
built as fairseq builds it): a training step (forward, backward) on a batch of the run's size,
and, separately, the routing alone (router projection, :func:`reinmax.route_tokens`, balance loss;
forward and backward) on that batch's tokens, summed over layers; torch.utils.benchmark, median.

Writes ``moe_lm.{json,md,png}`` under ``--out``.

Partial re-runs: ``--reuse-runs results/reinmax/moe_lm.json --rerun sparsemixer-E4,sparsemixer-E8,switch-E4@1``
trains only the listed configurations (``config`` or ``config@seed``) and takes every other run from
that JSON, refused unless its training arguments equal this call's; the table marks which runs
were re-trained. Use it when a change touches only some routers' code, and re-run one unchanged
run as a control (its loss must be identical).

    python -m benchmarks.moe_lm                                   # CPU: 4 layers, d=128, 300 updates, 3 seeds
    python -m benchmarks.moe_lm --layers 12 --dim 512 --max-update 20000 --device cuda   # larger

Expert parallelism (``ep``, `main_ep`): the same LM with the experts split over P gloo CPU ranks
(``--moe-expert-parallel-size P`` on fairseq's c10d launch, ``--tokens / P`` tokens per rank: the same global
batch per update) against one process, per seed; one run at a time under ``nice``, each finished run cached in
the work directory (a re-run of the command skips it), the table in ``--out/ep_lm.{json,md}``:

    python -m benchmarks.moe_lm ep --work work/ep_lm --parallel 2,1 --seeds 1,2 --out results/moe
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.lm_recipe_runs import prepare_english, recipe_env, run, write_table
from benchmarks.sweep import recorded_command, run_jobs, write_json

REPO = Path(__file__).resolve().parents[1]

ROUTERS = ["sparsemixer", "switch", "straight_through", "gumbel_softmax", "reinmax"]


def name(experts: int, router: str) -> str:
    return "dense" if experts == 0 else f"{router}-E{experts}"


def one(args, experts: int, router: str, seed: int, env) -> dict:
    save = args.work / "checkpoints" / f"moe-{name(experts, router)}-L{args.layers}-s{seed}"
    save.mkdir(parents=True, exist_ok=True)
    extra = [] if experts == 0 else ["--moe-experts", experts, "--moe-router", router, "--moe-tau", args.tau,
                                     "--moe-balance-weight", args.balance_weight, "--criterion", "cross_entropy_moe"]
    cmd = [REPO / "recipes/lm/train.sh", "--model", "admin", "--layers", args.layers, "--dim", args.dim,
           "--max-tokens", args.tokens, "--tokens-per-update", args.tokens, "--data", args.work, "--save", save,
           "--gpus", "1" if args.device == "cuda" else "0", "--lr", args.lr, "--warmup", args.warmup,
           "--seed", seed, "--max-update", args.max_update, "--", "--no-save", *extra]
    start = time.time()
    code = run(cmd, save / "driver_train.log", env)
    result = {"config": name(experts, router), "experts": experts, "router": router if experts else "-",
              "seed": seed, "exit": code, "seconds": round(time.time() - start, 1)}
    log = save / "train.log"
    result.update(parse_run_log(log.read_text() if log.exists() else ""))
    return result


def parse_run_log(text: str) -> dict:
    """The last ``valid_loss`` (with its per-expert ``valid_load``, if any) and ``train_wps`` of a fairseq
    ``--log-format json`` log."""
    out = {}
    for line in text.splitlines():
        if "{" not in line:
            continue
        try:
            rec = json.loads(line[line.index("{"):])
        except ValueError:
            continue
        if "valid_loss" in rec:
            out["valid_loss"] = float(rec["valid_loss"])
            for key in [k for k in rec if k.startswith("valid_moe_load")]:
                out.setdefault("valid_load", {})[key[len("valid_moe_load"):]] = float(rec[key])
        if "train_wps" in rec:
            out["wps"] = float(rec["train_wps"])
    return out


def describe(result: dict) -> str:
    return (f"{result['config']} seed {result['seed']}: valid loss {result.get('valid_loss', 'failed')}, "
            f"wps {result.get('wps', '-')}, {result['seconds']} s")


def router_share(args, experts: int, router: str) -> dict:
    """(step ms, routing ms, share) on one batch of ``--tokens`` tokens, in process, one thread."""
    import torch
    import torch.utils.benchmark as benchmark

    import reinmax
    from fairseq_plugins.models.transformer_lm_admin import TransformerLMAdmin, TransformerLMAdminConfig
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: F401  (fairseq's setup)
    from types import SimpleNamespace

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dictionary = Dictionary.load(str(args.work / "bin" / "dict.txt"))
    cfg = argparse.Namespace(**{**vars(TransformerLMAdminConfig()), "decoder_layers": int(args.layers),
                                "decoder_embed_dim": int(args.dim), "decoder_ffn_embed_dim": 4 * int(args.dim),
                                "decoder_attention_heads": 4, "decoder_input_dim": int(args.dim),
                                "decoder_output_dim": int(args.dim), "share_decoder_input_output_embed": True,
                                "dropout": 0.1, "moe_experts": experts, "moe_router": router,
                                "moe_tau": float(args.tau), "tokens_per_sample": 128, "max_target_positions": 128})
    cfg = argparse.Namespace(**{k: (v.value if hasattr(v, "value") else v) for k, v in vars(cfg).items()})
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    model = TransformerLMAdmin.build_model(cfg, task).train()
    dev = torch.device(args.device)
    model.to(dev)
    seq = 16  # Multi30k sentences are ~15 tokens: a batch of --tokens tokens
    tokens = torch.randint(4, len(dictionary), (int(args.tokens) // seq, seq), device=dev)

    def step():
        out, _ = model(tokens)
        loss = torch.nn.functional.cross_entropy(out.view(-1, out.shape[-1]), tokens.view(-1))
        moe = reinmax.moe_balance_loss(model)
        if moe is not None:
            loss = loss + 0.01 * moe
        loss.backward()
        model.zero_grad(set_to_none=True)

    layers = list(reinmax.moe_layers(model))
    x = torch.randn(tokens.numel(), int(args.dim), device=dev)

    def routing():
        total = 0
        for layer in layers:
            r = reinmax.route_tokens(layer.router(x), router, float(args.tau))
            gate = r.gate if r.gate is not None else r.weights
            total = total + gate.sum() + reinmax.balance_loss(r.probs, r.index)
        total.backward()
        for layer in layers:
            layer.router.weight.grad = None

    t_step = benchmark.Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=2).median
    t_route = benchmark.Timer("routing()", globals={"routing": routing}).blocked_autorange(min_run_time=1).median \
        if layers else 0.0
    return {"config": name(experts, router), "step_ms": t_step * 1e3, "routing_ms": t_route * 1e3,
            "share": t_route / t_step}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ep"]:
        return main_ep(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "multi30k")
    ap.add_argument("--work", type=Path, default=REPO / "work" / "lm")
    ap.add_argument("--experts", default="4,8", help="expert counts besides the dense model")
    ap.add_argument("--routers", default=",".join(ROUTERS))
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--layers", default="4")
    ap.add_argument("--dim", default="128", help="model width (FFN 4x, 4 heads)")
    ap.add_argument("--tokens", default="1024", help="tokens per update")
    ap.add_argument("--lr", default="1e-3")
    ap.add_argument("--warmup", default="100")
    ap.add_argument("--tau", default="1.0", help="--moe-tau (straight_through, gumbel_softmax, reinmax)")
    ap.add_argument("--balance-weight", default="0.01")
    ap.add_argument("--max-update", default="300", help="scale: updates per run")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--skip-train", action="store_true", help="only the router's share of step time")
    ap.add_argument("--reuse-runs", type=Path, default=None,
                    help="a moe_lm.json whose runs are kept for every configuration not in --rerun")
    ap.add_argument("--rerun", default="", help="with --reuse-runs: configs (or config@seed) to train again")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "reinmax")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        ap.error(f"--data: {args.data} not found (Multi30k raw files, e.g. ../shared/data/multi30k)")
    env = recipe_env()
    prepare_english(args.data, args.work, env)
    experts = [int(e) for e in args.experts.split(",")]
    routers = args.routers.split(",")
    configs = [(0, "-")] + [(e, r) for e in experts for r in routers]
    results = []
    reused = reused_runs(args, ap) if args.reuse_runs else {}
    if not args.skip_train:
        jobs = [(e, r, int(s)) for s in args.seeds.split(",") for e, r in configs
                if (name(e, r), int(s)) not in reused]
        print(f"{len(jobs)} runs, {args.jobs} at a time", flush=True)
        results = run_jobs(one, [(args, *j, env) for j in jobs], args.jobs, label="runs", describe=describe)
        for run_ in results:
            run_["retrained"] = True
            old = reused.get(("control", run_["config"], run_["seed"]))
            if old is not None:
                run_["previous_valid_loss"] = old.get("valid_loss")
                print(f"  control {run_['config']} seed {run_['seed']}: {run_.get('valid_loss')} now, "
                      f"{old.get('valid_loss')} before", flush=True)
        results += [v for k, v in reused.items() if k[0] != "control"]
        order = {(name(e, r), int(s)): i for i, (s, (e, r)) in
                 enumerate((s, c) for s in args.seeds.split(",") for c in configs)}
        results.sort(key=lambda x: order.get((x["config"], x["seed"]), len(order)))
    print("router share of step time ...", flush=True)
    shares = {}
    for e, r in configs:
        if e:
            shares[name(e, r)] = router_share(args, e, r)
            print(f"  {name(e, r)}: {shares[name(e, r)]}", flush=True)
    shares["dense"] = router_share(args, 0, "sparsemixer")

    rows = []
    for e, r in configs:
        runs = [x for x in results if x["config"] == name(e, r)]
        loss = [x["valid_loss"] for x in runs if "valid_loss" in x]
        wps = [x["wps"] for x in runs if "wps" in x]
        rows.append({"config": name(e, r), "experts": e, "router": r, "seeds": len(runs), "finished": len(loss),
                     "valid_loss_mean": statistics.mean(loss) if loss else float("nan"),
                     "valid_loss_std": statistics.stdev(loss) if len(loss) > 1 else 0.0, "per_seed": loss,
                     "wps_mean": statistics.mean(wps) if wps else float("nan"),
                     **{k: shares[name(e, r)][k] for k in ("step_ms", "routing_ms", "share")}})
    header = (f"Decoder-only LM (Post-LN + Admin), {args.layers} layers, d={args.dim}, FFN {4 * int(args.dim)} per "
              f"expert, English Multi30k, {args.tokens} tokens/update, lr {args.lr}, warmup {args.warmup}, "
              f"{args.max_update} updates, tau {args.tau}, balance weight {args.balance_weight}, device "
              f"{args.device}; validation loss (base 2) mean +- std over seeds {args.seeds}; words/s: fairseq's "
              f"train_wps with {args.jobs} runs in parallel (1 thread each); router share: routing forward+backward "
              f"/ training step, in process, 1 thread, median")
    lines = [header, "", "| model | seeds | valid loss (mean +- std) | per seed | words/s | step ms | routing ms | "
             "router share |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        retrained = [x for x in results if x["config"] == r["config"] and x.get("retrained")]
        if reused and retrained:
            r["config_label"] = r["config"] + (" (re-run)" if len(retrained) == r["seeds"] else
                                               f" (seed {','.join(str(x['seed']) for x in retrained)} re-run)")
        lines.append(f"| {r.get('config_label', r['config'])} | {r['finished']}/{r['seeds']} | {r['valid_loss_mean']:.3f} +- "
                     f"{r['valid_loss_std']:.3f} | {', '.join(f'{v:.3f}' for v in r['per_seed'])} | "
                     f"{r['wps_mean']:.0f} | {r['step_ms']:.1f} | {r['routing_ms']:.2f} | {100 * r['share']:.1f}% |")
    lines += ["", f"command: python -m benchmarks.moe_lm --experts {args.experts} --routers {args.routers} --seeds "
              f"{args.seeds} --layers {args.layers} --dim {args.dim} --tokens {args.tokens} --lr {args.lr} --warmup "
              f"{args.warmup} --tau {args.tau} --max-update {args.max_update} --device {args.device}"
              + (f" --reuse-runs {args.reuse_runs} --rerun {args.rerun}" if reused else "")]
    if reused:
        lines += [f"runs not marked re-run: taken from {args.reuse_runs} (same training arguments); re-trained: "
                  f"{args.rerun}"]
        controls = [x for x in results if "previous_valid_loss" in x]
        lines += ["re-trained runs against the reused file's: " + "; ".join(
            f"{x['config']} seed {x['seed']} {x.get('valid_loss')} (was {x['previous_valid_loss']})" for x in controls),
            "words/s of re-trained runs were measured on a machine shared with other jobs: compare them within the "
            "re-trained runs only"]
    write_table(args.out, "moe_lm", args, results, rows, "\n".join(lines))
    if results:
        plot(rows, experts, routers, args)
    print(f"wrote {args.out}/moe_lm.{{json,md,png}}")


TRAINING_ARGS = ("data", "experts", "routers", "seeds", "layers", "dim", "tokens", "lr", "warmup", "tau",
                 "balance_weight", "max_update", "device")


def reused_runs(args, ap) -> dict:
    """``{(config, seed): run}`` of ``--reuse-runs`` for the runs not in ``--rerun`` (plus ``("control", config,
    seed)`` entries for the re-run ones, to compare); refused when the training arguments differ."""
    import json as _json

    if not args.reuse_runs.is_file():
        ap.error(f"--reuse-runs: {args.reuse_runs} not found")
    old = _json.loads(args.reuse_runs.read_text())
    differ = [k for k in TRAINING_ARGS if str(old["args"].get(k)) != str(getattr(args, k))]
    if differ:
        ap.error(f"--reuse-runs: {args.reuse_runs} was made with other training arguments ({', '.join(differ)}); "
                 f"give the same values or re-run everything")
    wanted = [spec.split("@") for spec in args.rerun.split(",") if spec]
    known = {name(e, r) for e in [0, *map(int, args.experts.split(","))] for r in args.routers.split(",")}
    for spec in wanted:
        if spec[0] not in known or len(spec) > 2 or (len(spec) == 2 and not spec[1].isdigit()):
            ap.error(f"--rerun: {'@'.join(spec)!r} is not config or config@seed with config one of {sorted(known)}")

    def retrain(run_) -> bool:
        return any(spec[0] == run_["config"] and (len(spec) == 1 or int(spec[1]) == run_["seed"]) for spec in wanted)

    kept = {}
    for run_ in old["runs"]:
        key = (run_["config"], run_["seed"])
        if retrain(run_):
            kept[("control", *key)] = run_
        else:
            kept[key] = {**run_, "retrained": False}
    return kept


def plot(rows, experts, routers, args):
    import logging

    import matplotlib
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import set the root logger to DEBUG
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    dense = next(r for r in rows if r["experts"] == 0)
    ax.axhspan(dense["valid_loss_mean"] - dense["valid_loss_std"], dense["valid_loss_mean"] + dense["valid_loss_std"],
               color="0.85", label=f"dense ({dense['finished']} seeds)")
    ax.axhline(dense["valid_loss_mean"], color="0.5", lw=1)
    width = 0.8 / len(experts)
    for k, e in enumerate(experts):
        for i, router in enumerate(routers):
            r = next(x for x in rows if x["experts"] == e and x["router"] == router)
            xpos = i + (k - (len(experts) - 1) / 2) * width
            ax.scatter([xpos] * len(r["per_seed"]), r["per_seed"], s=10, color=f"C{k}", alpha=0.6)
            ax.errorbar([xpos], [r["valid_loss_mean"]], yerr=[r["valid_loss_std"]], fmt="o", color=f"C{k}",
                        capsize=4, label=f"E = {e}" if i == 0 else None)
    ax.set_xticks(range(len(routers)), routers, fontsize=8)
    ax.set_ylabel("validation loss (base 2)")
    ax.set_title(f"{args.layers}-layer LM, {args.max_update} updates, seeds {args.seeds}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "moe_lm.png", dpi=120)


# ------------------------------------------------------------------ expert parallelism (ep)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(cmds, logs, env, timeout: float) -> list:
    """Start one process per rank (``nice -n 10``); their exit codes. When a rank fails, or ``timeout`` seconds
    pass, the others are killed (by process id) instead of waiting for their collectives forever."""
    procs = []
    for cmd, log in zip(cmds, logs):
        with open(log, "w") as f:
            procs.append(subprocess.Popen(["nice", "-n", "10", *map(str, cmd)], stdout=f, stderr=subprocess.STDOUT,
                                          env=env, cwd=REPO, start_new_session=True))
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs):
        failed = any(p.poll() not in (None, 0) for p in procs)
        if failed or time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, 9)  # the rank's own session: train.sh and its fairseq-train
                    p.wait()
            break
        time.sleep(1)
    return [p.poll() if p.poll() is not None else -9 for p in procs]


def one_ep(args, parallel: int, seed: int, env) -> dict:
    """sparsemixer (``--router``) with ``--experts`` experts, ``parallel`` ranks (1: one process), seed ``seed``."""
    config = f"{args.router}-E{args.experts}"
    save = args.work / "checkpoints" / (f"ep-{config}-L{args.layers}-d{args.dim}-u{args.max_update}"
                                        f"-P{parallel}-s{seed}")
    cached = save / "result.json"
    if cached.is_file():
        result = json.loads(cached.read_text())
        if result.get("exit") == 0 and "valid_loss" in result:
            return result
    per_rank = int(args.tokens) // parallel
    common = [REPO / "recipes/lm/train.sh", "--model", "admin", "--layers", args.layers, "--dim", args.dim,
              "--max-tokens", per_rank, "--tokens-per-update", per_rank, "--data", args.work, "--gpus", "0",
              "--lr", args.lr, "--warmup", args.warmup, "--seed", seed, "--max-update", args.max_update]
    moe = ["--no-save", "--moe-experts", args.experts, "--moe-router", args.router, "--moe-tau", args.tau,
           "--moe-balance-weight", args.balance_weight, "--criterion", "cross_entropy_moe"]
    port = _free_port()
    cmds, logs = [], []
    for rank in range(parallel):
        rank_dir = save / f"rank{rank}"
        rank_dir.mkdir(parents=True, exist_ok=True)
        dist = [] if parallel == 1 else [
            "--moe-expert-parallel-size", parallel, "--distributed-world-size", parallel, "--distributed-rank", rank,
            "--distributed-no-spawn", "--distributed-backend", "gloo", "--ddp-backend", "c10d",
            "--distributed-init-method", f"tcp://127.0.0.1:{port}"]
        cmds.append([*common, "--save", rank_dir, "--", *moe, *dist])
        logs.append(rank_dir / "driver_train.log")
    start = time.time()
    codes = launch_ranks(cmds, logs, env, float(args.timeout))
    result = {"config": config, "parallel": parallel, "seed": seed, "tokens_per_rank": per_rank,
              "exit": max(codes, key=abs), "seconds": round(time.time() - start, 1)}
    log = save / "rank0" / "train.log"
    result.update(parse_run_log(log.read_text() if log.exists() else ""))
    write_json(cached, result)
    return result


def main_ep(argv) -> None:
    """``python -m benchmarks.moe_lm ep``: LM quality with the experts split over P ranks against one process."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.moe_lm ep", description=main_ep.__doc__)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "multi30k")
    ap.add_argument("--work", type=Path, required=True, help="prepared data, runs and their cached results")
    ap.add_argument("--parallel", default="2,1", help="expert-parallel sizes P (1: one process), in run order")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--experts", default="8")
    ap.add_argument("--router", default="sparsemixer")
    ap.add_argument("--layers", default="4")
    ap.add_argument("--dim", default="128")
    ap.add_argument("--tokens", default="1024", help="tokens per update (all ranks together)")
    ap.add_argument("--lr", default="1e-3")
    ap.add_argument("--warmup", default="100")
    ap.add_argument("--tau", default="1.0")
    ap.add_argument("--balance-weight", default="0.01")
    ap.add_argument("--max-update", default="200")
    ap.add_argument("--timeout", default="3600", help="seconds a run may take before its ranks are killed")
    ap.add_argument("--reference", type=Path, default=REPO / "results" / "reinmax" / "moe_lm.json",
                    help="the committed single-process runs, quoted in the table")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "moe")
    args = ap.parse_args(argv)
    sizes = [int(p) for p in args.parallel.split(",")]
    if any(p < 1 or int(args.experts) % p or int(args.tokens) % p for p in sizes):
        ap.error(f"--parallel: each P must be >= 1 and divide --experts {args.experts} and --tokens {args.tokens}, "
                 f"got {args.parallel}")
    if not args.data.is_dir():
        ap.error(f"--data: {args.data} not found (Multi30k raw files, e.g. ../shared/data/multi30k)")
    env = recipe_env()
    prepare_english(args.data, args.work, env)
    results = []
    for p in sizes:
        for seed in (int(s) for s in args.seeds.split(",")):
            print(f"{args.router}-E{args.experts} P={p} seed {seed} ...", flush=True)
            results.append(one_ep(args, p, seed, env))
            print(f"  {results[-1]}", flush=True)
    config = f"{args.router}-E{args.experts}"
    reference = {}
    if args.reference.is_file():
        reference = {r["seed"]: r for r in json.loads(args.reference.read_text())["runs"]
                     if r["config"] == config and "valid_loss" in r}
    rows = []
    for p in sorted(set(sizes)):
        loss = [r["valid_loss"] for r in results if r["parallel"] == p and "valid_loss" in r]
        rows.append({"parallel": p, "runs": len(loss), "valid_loss_mean": statistics.mean(loss) if loss else None,
                     "valid_loss_std": statistics.stdev(loss) if len(loss) > 1 else 0.0})
    lines = [f"Decoder-only LM (Post-LN + Admin), {args.layers} layers, d={args.dim}, {config} (sparse router, no "
             f"capacity: the variable-size exchange), English Multi30k, {args.tokens} tokens per update over all "
             f"ranks, lr {args.lr}, warmup {args.warmup}, {args.max_update} updates; P = experts split over P gloo "
             f"CPU ranks (fairseq c10d, --moe-expert-parallel-size P, {args.tokens}/P tokens per rank), P = 1: one "
             f"process; validation loss base 2 after the last update; wall: the run's seconds (nice 10, one thread "
             f"per rank, on a machine shared with other jobs); the committed single-process runs "
             f"({args.reference.name}) are quoted as they are (made on an earlier tree: compare P against the P = 1 "
             f"runs made here)", "",
             "| seed | P | valid loss | committed single-process run | wall s | words/s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        ref = reference.get(r["seed"], {}).get("valid_loss")
        loss = f"{r['valid_loss']:.3f}" if "valid_loss" in r else f"failed (exit {r['exit']})"
        lines.append(f"| {r['seed']} | {r['parallel']} | {loss} | {'-' if ref is None else f'{ref:.3f}'} | "
                     f"{r['seconds']:.0f} | {r.get('wps', '-')} |")
    lines += ["", "| P | runs | valid loss (mean +- std) |", "|---|---|---|"]
    lines += [f"| {r['parallel']} | {r['runs']} | " + ("-" if r["valid_loss_mean"] is None else
              f"{r['valid_loss_mean']:.3f} +- {r['valid_loss_std']:.3f}") + " |" for r in rows]
    if reference:
        ref = [reference[s]["valid_loss"] for s in sorted(reference)]
        lines.append(f"| committed P=1 ({args.reference.name}, seeds {','.join(map(str, sorted(reference)))}) | "
                     f"{len(ref)} | {statistics.mean(ref):.3f} +- "
                     f"{statistics.stdev(ref) if len(ref) > 1 else 0:.3f} |")
    lines += ["", "command: " + recorded_command("benchmarks.moe_lm", ["ep", *argv])]
    write_table(args.out, "ep_lm", args, results, rows, "\n".join(lines))
    print(f"wrote {args.out}/ep_lm.{{json,md}}")


if __name__ == "__main__":
    main()
