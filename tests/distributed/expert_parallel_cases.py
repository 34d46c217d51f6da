"""The layers, batches and losses of the expert-parallel checks, shared by the rank worker
(expert_parallel_worker.py) and the single-process references in test_expert_parallel.py: the same seeds
give the same experts, tokens and routing samples in both."""

from typing import List, Optional, Tuple

import torch

from reinmax import SPARSE_ROUTERS, RoutedFeedForward

D, H, EXPERTS = 6, 8, 4
#: every sparse router, without a capacity (the variable-size exchange) and with one that drops tokens
CASES: List[Tuple[str, Optional[float]]] = [(r, c) for r in SPARSE_ROUTERS for c in (None, 0.5)]
BALANCE_WEIGHT = 0.1


def layer(router: str, capacity_factor: Optional[float], group=None, experts: int = EXPERTS) -> RoutedFeedForward:
    """Seed 0, float64, tau 1.3: the same experts in one process and on every rank of a group."""
    torch.manual_seed(0)
    return RoutedFeedForward(D, H, experts, router=router, tau=1.3, capacity_factor=capacity_factor,
                             expert_parallel_group=group).double()


def tokens_per_rank(world: int) -> List[int]:
    """Uneven on purpose: the exchanges must not assume equal token counts (rank r has 5 + 2r tokens)."""
    return [5 + 2 * r for r in range(world)]


def rank_batch(world: int, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s tokens ``(n, D)`` (its part of the global batch) and its loss weights."""
    g = torch.Generator().manual_seed(7)
    sizes = tokens_per_rank(world)
    x = torch.randn(sum(sizes), D, dtype=torch.float64, generator=g) * 2
    w = torch.randn(sum(sizes), D, dtype=torch.float64, generator=g)
    return x.split(sizes)[rank].clone(), w.split(sizes)[rank].clone()


def generator(rank: int) -> torch.Generator:
    """The routing samples of rank ``rank``'s tokens."""
    return torch.Generator().manual_seed(1000 + rank)


def run(moe: RoutedFeedForward, world: int, rank: int) -> dict:
    """Forward and backward of rank ``rank``'s loss ``sum(w * y) + BALANCE_WEIGHT * balance``; what is compared."""
    x, w = rank_batch(world, rank)
    x.requires_grad_(True)
    y = moe(x, generator=generator(rank))
    ((w * y).sum() + BALANCE_WEIGHT * moe.stats.balance_loss).backward()
    stats = moe.stats
    return {"out": y.detach(), "x_grad": x.grad, "router_grad": moe.router.weight.grad.clone(),
            "experts": list(moe.expert_range()),
            "expert_grads": {n: p.grad.clone() for n, p in moe.named_parameters() if n.startswith("fc")},
            "balance_loss": stats.balance_loss.detach(), "load": stats.load, "dropped": stats.dropped,
            "index": stats.index}


class Model(torch.nn.Module):
    """A projection (data parallel), an expert-parallel MoE in a residual, a head (data parallel)."""

    def __init__(self, group=None, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = torch.nn.Linear(D, D)
        self.moe = RoutedFeedForward(D, H, EXPERTS, router="sparsemixer", capacity_factor=1.0,
                                     expert_parallel_group=group)
        self.head = torch.nn.Linear(D, 1)
        self.double()

    def forward(self, x, generator=None):
        h = self.proj(x)
        return self.head(h + self.moe(h, generator=generator))


def step_batch(world: int, rank: int, step: int):
    """Rank ``rank``'s tokens, loss weights and routing generator at training step ``step``."""
    x, w = rank_batch(world, rank)
    g = torch.Generator().manual_seed(50 + step)
    shift = torch.randn(x.shape, dtype=x.dtype, generator=g)
    return x + shift, w[:, :1], torch.Generator().manual_seed(2000 + 10 * step + rank)


def model_loss(model, moe, world: int, rank: int, step: int) -> torch.Tensor:
    x, w, g = step_batch(world, rank, step)
    return (w * model(x, generator=g)).sum() + BALANCE_WEIGHT * moe.stats.balance_loss


OPTIMIZERS = ("AdamW", "AddSign", "PowerSign")


def optimizer(name: str, params):
    from sign_optim import AddSign, PowerSign

    return {"AdamW": lambda: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
            "AddSign": lambda: AddSign(params, lr=1e-2), "PowerSign": lambda: PowerSign(params, lr=1e-2)}[name]()
