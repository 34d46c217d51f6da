"""The torch.nn example at scale: a deep Post-LN encoder made Admin by ``admin_torch.convert``, sharded with
FSDP2, trained by AddSign with a decay, checkpointed with ``torch.distributed.checkpoint`` and resumed.

Run it under torchrun, one process per GPU (or CPU rank), on one machine or several::

    # one machine, 2 processes
    torchrun --nproc-per-node 2 recipes/distributed/train_torch.py --steps 20 --save work/torch-ckpt
    # two machines ("nodes"), one process each, rendezvous at HOST:PORT (run on every node)
    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id job1 \\
        recipes/distributed/train_torch.py --steps 20 --save /shared/torch-ckpt

The batches are synthetic (a learnable copy task) and depend on the step and the rank only, so a run
killed at any point and started again with the same ``--save`` continues from its last checkpoint to
the same result. Rank 0 prints the loss; ``--save`` ends up holding the checkpoint of the last step and
``final.json`` (steps, loss, world size).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import admin_torch  # noqa: E402
from sign_optim import AddSign, CosineInternalDecay  # noqa: E402


class Model(nn.Module):
    """Token embedding, a stock Post-LN nn.TransformerEncoder (converted to Admin), an output projection."""

    def __init__(self, vocab: int, dim: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.out(self.encoder(self.embed(tokens)))


def batch(step: int, rank: int, args):
    g = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(1, args.vocab, (args.batch, 16), generator=g)
    return tokens, tokens.flip(-1)  # learn to reverse


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--save", type=Path, required=True, help="checkpoint directory (resumed from when it exists)")
    ap.add_argument("--save-every", type=int, default=5)
    args = ap.parse_args(argv)
    for flag in ("steps", "layers", "dim", "vocab", "batch", "save_every"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not args.lr > 0:
        ap.error(f"--lr must be > 0, got {args.lr}")
    if "RANK" not in os.environ:
        ap.error("run it under torchrun (see --help): RANK and WORLD_SIZE are not set")

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)  # the same initial model on every rank
    model = admin_torch.convert(Model(args.vocab, args.dim, args.layers)).to(device)  # convert, then shard
    mesh = init_device_mesh(device, (world,))
    for layer in model.encoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = AddSign(model.parameters(), lr=args.lr, sign_internal_decay=CosineInternalDecay(args.steps))

    start, ckpt, last_loss = 0, args.save / "checkpoint", float("nan")
    meta = args.save / "checkpoint.json"
    if meta.exists():  # resume: the model, the moving averages and the step counters (the decay's position)
        msd, osd = get_state_dict(model, opt)
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(ckpt))
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
        saved = json.loads(meta.read_text())
        start, last_loss = saved["step"], saved["loss"]
        if rank == 0:
            print(f"resumed from step {start}", flush=True)
    loss_fn = nn.CrossEntropyLoss()
    loss = torch.tensor(last_loss)  # the saved step's loss, if there is no step left to run
    for step in range(start, args.steps):
        tokens, target = (t.to(device) for t in batch(step, rank, args))
        loss = loss_fn(model(tokens).flatten(0, 1), target.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(ckpt))
            dist.barrier()
            if rank == 0:  # the step marker last, through a temporary name: it never names a half-written checkpoint
                tmp = meta.with_suffix(".tmp")
                tmp.write_text(json.dumps({"step": step + 1, "loss": loss.item()}))
                tmp.rename(meta)
                print(f"step {step + 1}: loss {loss.item():.4f} (saved)", flush=True)
    total = loss.detach().clone()
    dist.all_reduce(total)
    result = {"steps": args.steps, "world": world, "loss": total.item() / world}
    if rank == 0:
        (args.save / "final.json").write_text(json.dumps(result))
        print(f"done: {result}", flush=True)
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
