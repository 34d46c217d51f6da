#!/usr/bin/env python
"""Train the latent-tree ListOps model with fairseq-train (task ``listops``, model ``listops_tree``).

Defaults follow the ReinMax paper's ListOps setup (batch 16, lr 7e-4, tau 1.1, clip 5, RAdam
replaced by fairseq's Adam) except the sizes, which are smaller for a CPU. Extra arguments after
``--`` go to fairseq-train unchanged.

Example::

    python recipes/listops/train.py --data /tmp/listops --save-dir /tmp/ck_reinmax \\
        --estimator reinmax --tau 1.1 --max-update 600 -- --seed 2
"""

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build_command(args, extra):
    return [str(Path(sys.executable).parent / "fairseq-train"), args.data,
            "--user-dir", str(REPO / "fairseq_plugins"), "--task", "listops", "--arch", "listops_tree",
            "--criterion", "listops_cross_entropy",
            "--estimator", args.estimator, "--tau", str(args.tau),
            "--embed-dim", str(args.hidden_dim), "--hidden-dim", str(args.hidden_dim),
            "--mlp-dim", str(args.hidden_dim), "--dropout", str(args.dropout),
            "--optimizer", "adam", "--lr", str(args.lr), "--clip-norm", "5",
            "--batch-size", str(args.batch_size), "--max-train-length", str(args.max_length),
            "--max-update", str(args.max_update), "--max-epoch", str(args.max_epoch),
            "--save-dir", args.save_dir, *(["--cpu"] if args.device == "cpu" else []), "--num-workers", "0",
            "--no-progress-bar", "--log-format", "simple", "--log-interval", "50",
            "--best-checkpoint-metric", "accuracy", "--maximize-best-checkpoint-metric",
            "--no-epoch-checkpoints", "--seed", str(args.seed)] + list(extra)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="directory made by prepare.py")
    p.add_argument("--save-dir", required=True)
    p.add_argument("--estimator", default="reinmax",
                   choices=["reinmax", "straight_through", "gumbel_softmax", "gapped_straight_through", "gumbel_rao"])
    p.add_argument("--tau", type=float, default=1.1)
    p.add_argument("--hidden-dim", type=int, default=128, help="embedding, Tree-LSTM and MLP size (paper 300)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=100, help="drop longer training sentences (tokens)")
    p.add_argument("--max-update", type=int, default=0, help="stop after this many updates (0: no limit)")
    p.add_argument("--max-epoch", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dry-run", action="store_true", help="print the fairseq-train command only")
    args = p.parse_args(argv)
    cmd = build_command(args, extra)
    print(" ".join(cmd), flush=True)
    if not args.dry_run:
        sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
