"""AddSign and PowerSign (with and without internal decays) against SGD with momentum, Adam and Lion on
MNIST, under one tuning protocol: a 784-256-10 MLP, the same steps for every optimizer.

Protocol: the 60 000 training images are split into 50 000 for training and 10 000 for validation.
Every optimizer gets the same budget: a grid of 4 learning rates (a factor of about 3 apart, around
its family's usual value), one run each (seed 0), scored by validation accuracy; the best learning
rate is then run with ``--seeds`` fresh seeds (initialization and batch order), and only those runs
touch the 10 000 test images, once, at the end. Tables give mean +- std over the seeds.

Usage::

    python -m benchmarks.sign_optim_mnist                  # 1000 steps of batch 128, 4 lrs + 3 seeds each
    python -m benchmarks.sign_optim_mnist --quick          # 200 steps, 2 seeds
    python -m benchmarks.sign_optim_mnist --device cuda --steps 10000   # longer

Data: the four gzipped IDX files of ``<repo>/../shared/data/mnist`` (skipped with a message when
absent). Writes ``sign_optim_mnist.{json,md,png}`` under ``--out``.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import mnist
from benchmarks.sweep import recorded_args
from sign_optim import AddSign, CosineInternalDecay, LinearInternalDecay, PowerSign

DEFAULT_DATA = mnist.DEFAULT_ROOT


def load_standardized(root: Path):
    """(train images, train labels, test images, test labels), images standardized with MNIST's mean and std."""
    data = mnist.load(root)
    return ((data.train_images - 0.1307) / 0.3081, data.train_labels, (data.test_images - 0.1307) / 0.3081,
            data.test_labels)


# lr grids: 4 points, the same budget for every optimizer, around the family's usual value
SGD_LIKE = [0.01, 0.03, 0.1, 0.3]
ADAM_LRS = [1e-4, 3e-4, 1e-3, 3e-3]
LION_LRS = [3e-5, 1e-4, 3e-4, 1e-3]


def configs(steps: int):
    """name -> (lr grid, make(params, lr))."""
    from lion_pytorch import Lion

    return {
        "SGD momentum 0.9": (SGD_LIKE, lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9)),
        "Adam": (ADAM_LRS, lambda ps, lr: torch.optim.Adam(ps, lr=lr)),
        "Lion (lion-pytorch)": (LION_LRS, lambda ps, lr: Lion(ps, lr=lr)),
        "AddSign": (SGD_LIKE, lambda ps, lr: AddSign(ps, lr=lr)),
        "AddSign + linear decay": (SGD_LIKE, lambda ps, lr: AddSign(ps, lr=lr,
                                                                     sign_internal_decay=LinearInternalDecay(steps))),
        "PowerSign": (SGD_LIKE, lambda ps, lr: PowerSign(ps, lr=lr)),
        "PowerSign + cosine decay": (SGD_LIKE, lambda ps, lr: PowerSign(
            ps, lr=lr, sign_internal_decay=CosineInternalDecay(steps))),
    }


def evaluate(model, x, y):
    with torch.no_grad():
        logits = model(x)
        return torch.nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train(make, lr, seed, data, args, test: bool):
    """One run; returns validation (and, with ``test``, test) loss/accuracy and the curve."""
    x_train, y_train, x_valid, y_valid, x_test, y_test = data
    gen = torch.Generator().manual_seed(seed)
    batches = torch.randint(0, len(x_train), (args.steps, args.batch), generator=gen)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(args.device)
    opt = make(model.parameters(), lr)
    curve, smooth = {"step": [], "train_loss": [], "valid_acc": []}, None
    for step in range(1, args.steps + 1):
        idx = batches[step - 1]
        loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            value = loss.item()
            smooth = value if smooth is None else 0.8 * smooth + 0.2 * value
            curve["step"].append(step), curve["train_loss"].append(smooth)
            curve["valid_acc"].append(evaluate(model, x_valid, y_valid)[1])
    out = {"lr": lr, "seed": seed, "valid_loss": None, "valid_acc": curve["valid_acc"][-1], "curve": curve}
    out["valid_loss"] = evaluate(model, x_valid, y_valid)[0]
    if not math.isfinite(out["valid_loss"]):
        out["valid_acc"] = 0.0
    if test:
        out["test_loss"], out["test_acc"] = evaluate(model, x_test, y_test)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3, help="runs at the chosen lr (seeds 1..N)")
    parser.add_argument("--quick", action="store_true", help="200 steps, 2 seeds")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "sign_optim")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds = 200, 2
    reason = mnist.missing(args.data)
    if reason is not None:
        print(f"{reason}: skipping. Pass --data DIR.")
        return 0
    torch.set_num_threads(args.threads)
    x_all, y_all, x_test, y_test = (t.to(args.device) for t in load_standardized(args.data))
    data = (x_all[:50000], y_all[:50000], x_all[50000:], y_all[50000:], x_test, y_test)
    print(f"MNIST 50000 train / 10000 validation / 10000 test; {args.steps} steps of {args.batch}; MLP 784-256-10; "
          f"{args.threads} thread(s), {args.device}", flush=True)

    results, started = {}, time.perf_counter()
    for name, (grid, make) in configs(args.steps).items():
        tuning = [train(make, lr, 0, data, args, test=False) for lr in grid]
        best = max(tuning, key=lambda r: r["valid_acc"])
        finals = [train(make, best["lr"], seed, data, args, test=True) for seed in range(1, args.seeds + 1)]
        acc = [100 * r["test_acc"] for r in finals]
        results[name] = {"grid": grid, "tuning": [{k: r[k] for k in ("lr", "valid_acc", "valid_loss")} for r in tuning],
                         "lr": best["lr"], "finals": finals, "test_acc_mean": statistics.mean(acc),
                         "test_acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                         "test_loss_mean": statistics.mean(r["test_loss"] for r in finals)}
        print(f"  {name:28s} lr {best['lr']:g} (valid acc " +
              ", ".join(f"{r['lr']:g}: {100 * r['valid_acc']:.2f}" for r in tuning) +
              f")  test acc {results[name]['test_acc_mean']:.2f} +- {results[name]['test_acc_std']:.2f}  "
              f"[{time.perf_counter() - started:.0f} s]", flush=True)

    lines = [f"MNIST, MLP 784-256-10, {args.steps} steps of batch {args.batch}; lr chosen on 10k validation images "
             f"from a 4-point grid per optimizer (seed 0), then {args.seeds} seeds at that lr; test accuracy on the 10k "
             f"test images, mean +- std over the seeds; {args.device}, {args.threads} thread(s)", "",
             "| optimizer | lr grid | chosen lr | validation acc at each lr | test accuracy | test loss |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        grid_accs = ", ".join(f"{100 * t['valid_acc']:.2f}" for t in r["tuning"])
        edge = " (grid edge)" if r["lr"] in (r["grid"][0], r["grid"][-1]) else ""
        lines.append(f"| {name} | {', '.join(f'{v:g}' for v in r['grid'])} | {r['lr']:g}{edge} | {grid_accs} | "
                     f"{r['test_acc_mean']:.2f} +- {r['test_acc_std']:.2f}% | {r['test_loss_mean']:.4f} |")
    lines += ["", f"command: python -m benchmarks.sign_optim_mnist --steps {args.steps} --batch {args.batch} "
              f"--seeds {args.seeds} --device {args.device}"]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sign_optim_mnist.json").write_text(json.dumps({"args": recorded_args(args),
                                                                "results": results}, indent=1))
    (args.out / "sign_optim_mnist.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (name, r) in enumerate(results.items()):
        style = "--" if name.split()[0] in ("SGD", "Adam", "Lion") else "-"
        rel = [t["lr"] / r["lr"] for t in r["tuning"]]
        axes[0].plot(rel, [100 * t["valid_acc"] for t in r["tuning"]], style + "o", color=f"C{i}", label=name)
        axes[1].errorbar([i], [r["test_acc_mean"]], yerr=[r["test_acc_std"]], fmt="o", color=f"C{i}", capsize=5)
    axes[0].set(xscale="log", xlabel="lr / chosen lr", ylabel="validation accuracy % (seed 0)",
                title="tuning: validation accuracy across the lr grid")
    axes[0].legend(fontsize=7)
    axes[1].set_xticks(range(len(results)), [n.replace(" + ", "\n+ ") for n in results], fontsize=7)
    axes[1].set(ylabel="test accuracy %", title=f"at the chosen lr, mean +- std over {args.seeds} seeds")
    fig.tight_layout()
    fig.savefig(args.out / "sign_optim_mnist.png", dpi=120)
    print(f"wrote {args.out}/sign_optim_mnist.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
