"""AddSign and PowerSign (with and without internal decays) against SGD with momentum and Adam on
MNIST: a 784-256-10 MLP, the same batches for every optimizer, the same number of steps.

Usage::

    python benchmarks/sign_optim_mnist.py            # 1000 steps of batch 128 per optimizer (~3 CPU-minutes, 1 thread)
    python benchmarks/sign_optim_mnist.py --quick    # 200 steps
    python benchmarks/sign_optim_mnist.py --data /path/to/mnist

Data: the four gzipped IDX files of ``<repo>/../shared/data/mnist`` (skipped with a message when
absent). Learning rates are common defaults, not tuned: SGD 0.05 with momentum 0.9, Adam 1e-3,
AddSign / PowerSign 0.05 (their factors scale the raw gradient like SGD's). Decays run over all
the steps. Writes ``sign_optim_mnist.{json,md,png}`` under ``benchmarks/results`` (or ``--out``).
"""

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sign_optim import AddSign, CosineInternalDecay, LinearInternalDecay, PowerSign, RestartCosineInternalDecay  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(magic & 0xFF)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def load_mnist(root: Path):
    def images(name):
        x = torch.from_numpy(read_idx(root / name).astype(np.float32) / 255.0).view(-1, 784)
        return (x - 0.1307) / 0.3081

    def labels(name):
        return torch.from_numpy(read_idx(root / name).astype(np.int64))

    return (images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz"),
            images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz"))


def configs(steps: int):
    return {
        "SGD momentum 0.9 (lr 0.05)": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        "Adam (lr 1e-3)": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        "AddSign": lambda ps: AddSign(ps, lr=0.05),
        "AddSign + linear decay": lambda ps: AddSign(ps, lr=0.05, sign_internal_decay=LinearInternalDecay(steps)),
        "AddSign + restart decay (4 periods)": lambda ps: AddSign(
            ps, lr=0.05, sign_internal_decay=RestartCosineInternalDecay(steps, num_periods=4)),
        "PowerSign": lambda ps: PowerSign(ps, lr=0.05),
        "PowerSign + cosine decay": lambda ps: PowerSign(ps, lr=0.05, sign_internal_decay=CosineInternalDecay(steps)),
        "PowerSign + linear decay": lambda ps: PowerSign(ps, lr=0.05, sign_internal_decay=LinearInternalDecay(steps)),
    }


def evaluate(model, x, y):
    with torch.no_grad():
        logits = model(x)
        return torch.nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="200 steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every = 200, 50
    if not all((args.data / f).exists() for f in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")):
        print(f"MNIST not found at {args.data} (the gzipped IDX files): skipping. Pass --data DIR.")
        return 0
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_mnist(args.data)
    gen = torch.Generator().manual_seed(args.seed)
    batches = torch.randint(0, len(x_train), (args.steps, args.batch), generator=gen)  # same batches for all
    probe = torch.randperm(len(x_test), generator=gen)[:2000]  # test subset for the curves
    print(f"MNIST {len(x_train)} train / {len(x_test)} test; {args.steps} steps of {args.batch}; MLP 784-256-10; 1 thread",
          flush=True)

    results = {}
    started = time.perf_counter()
    for name, make in configs(args.steps).items():
        torch.manual_seed(args.seed)
        model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
        opt = make(model.parameters())
        curve = {"step": [], "train_loss": [], "test_loss": [], "test_acc": []}
        smooth = None
        t0 = time.perf_counter()
        for step in range(1, args.steps + 1):
            idx = batches[step - 1]
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
            if step % args.eval_every == 0 or step == args.steps:
                test_loss, test_acc = evaluate(model, x_test[probe], y_test[probe])
                for k, v in zip(curve, (step, smooth, test_loss, test_acc)):
                    curve[k].append(v)
        final_loss, final_acc = evaluate(model, x_test, y_test)
        results[name] = {"curve": curve, "final_test_loss": final_loss, "final_test_acc": final_acc,
                         "final_train_loss_ema": smooth, "seconds": time.perf_counter() - t0}
        print(f"  {name:38s} test acc {final_acc * 100:6.2f}%  test loss {final_loss:.4f}  "
              f"train loss (EMA) {smooth:.4f}  [{time.perf_counter() - t0:.1f} s]", flush=True)
    total = time.perf_counter() - started

    lines = [f"MNIST, MLP 784-256-10, {args.steps} steps of batch {args.batch}, seed {args.seed} ({total:.0f} s in all)", "",
             "| optimizer | test accuracy (10k) | test loss | train loss (EMA) |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['final_test_acc'] * 100:.2f}% | {r['final_test_loss']:.4f} | {r['final_train_loss_ema']:.4f} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sign_optim_mnist.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                                "results": results}, indent=1))
    (args.out / "sign_optim_mnist.md").write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for name, r in results.items():
            style = "--" if "SGD" in name or "Adam" in name else "-"
            axes[0].plot(r["curve"]["step"], r["curve"]["train_loss"], style, label=name)
            axes[1].plot(r["curve"]["step"], [100 * a for a in r["curve"]["test_acc"]], style, label=name)
        axes[0].set(xlabel="step", ylabel="train loss (EMA 0.95)", yscale="log", title="training loss")
        axes[1].set(xlabel="step", ylabel="test accuracy % (2000 images)", title="test accuracy")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out / "sign_optim_mnist.png", dpi=120)
        print(f"wrote {args.out / 'sign_optim_mnist.png'}")
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"wrote {args.out / 'sign_optim_mnist.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
