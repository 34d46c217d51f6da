#!/usr/bin/env python
"""Average the parameters of the last fairseq checkpoints (fairseq's scripts/average_checkpoints.py
is not in the pip wheel). Checkpoints load with torch's safe ``weights_only=True`` unpickler
(importing ``fairseq_plugins`` allowlists what fairseq checkpoints hold)::

    python recipes/average_checkpoints.py --inputs CKPT_DIR --num-epoch-checkpoints 10 --output avg.pt
    python recipes/average_checkpoints.py --inputs a.pt b.pt --output avg.pt
"""

import argparse
import os
import re
import sys
from typing import List, Optional


def last_checkpoints(directory: str, n: int, pattern: str = r"checkpoint(\d+)\.pt$") -> List[str]:
    """The ``n`` checkpoints of ``directory`` whose names match ``pattern`` with the highest numbers."""
    found = []
    for name in os.listdir(directory):
        m = re.match(pattern, name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    if not found:
        raise ValueError(f"no checkpoint matching {pattern} in {directory}")
    return [path for _, path in sorted(found)[-n:]]


def average_checkpoints(paths: List[str]) -> dict:
    """The first checkpoint, with its ``model`` parameters replaced by the mean over ``paths``."""
    import torch

    import fairseq_plugins  # noqa: F401  (safe loading of fairseq checkpoints)
    from fairseq import checkpoint_utils

    if not paths:
        raise ValueError("paths must name at least one checkpoint")
    sums, first = None, None
    for path in paths:
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
        model = state["model"]
        if first is None:
            first, sums = state, {k: v.double().clone() if v.is_floating_point() else v for k, v in model.items()}
        else:
            if set(model) != set(sums):
                raise ValueError(f"{path} has different parameters than {paths[0]}")
            for k, v in model.items():
                if v.is_floating_point():
                    sums[k] += v.double()
    first["model"] = {k: (v / len(paths)).to(first["model"][k].dtype) if v.is_floating_point() else v
                      for k, v in sums.items()}
    first["last_optimizer_state"] = None  # an average has no optimizer state; keeps the file small
    if first.get("cfg") is not None and not isinstance(first["cfg"], dict):
        # fairseq's loader turns cfg into an omegaconf DictConfig, which the safe loader refuses;
        # store it as plain containers, as fairseq's own save_checkpoint does
        from omegaconf import OmegaConf

        first["cfg"] = OmegaConf.to_container(first["cfg"], resolve=True, enum_to_str=True)
    return first


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--inputs", nargs="+", required=True, help="checkpoint files, or one directory")
    parser.add_argument("--output", required=True)
    parser.add_argument("--num-epoch-checkpoints", type=int, default=0,
                        help="with a directory: average its last N checkpointEPOCH.pt")
    parser.add_argument("--num-update-checkpoints", type=int, default=0,
                        help="with a directory: average its last N checkpoint_E_UPDATE.pt")
    args = parser.parse_args(argv)
    import torch

    paths = args.inputs
    if len(paths) == 1 and os.path.isdir(paths[0]):
        if args.num_epoch_checkpoints > 0:
            paths = last_checkpoints(paths[0], args.num_epoch_checkpoints)
        elif args.num_update_checkpoints > 0:
            paths = last_checkpoints(paths[0], args.num_update_checkpoints, r"checkpoint_\d+_(\d+)\.pt$")
        else:
            parser.error("with a directory, give --num-epoch-checkpoints or --num-update-checkpoints")
    print(f"averaging {len(paths)} checkpoints: {' '.join(os.path.basename(p) for p in paths)}", file=sys.stderr)
    torch.save(average_checkpoints(paths), args.output)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
