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
#: the max_norm of the clipping check (small: the clipping is active)
CLIP = 0.05


def optimizer(name: str, params):
    from sign_optim import AddSign, PowerSign

    return {"AdamW": lambda: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
            "AddSign": lambda: AddSign(params, lr=1e-2), "PowerSign": lambda: PowerSign(params, lr=1e-2)}[name]()


# ------------------------------------------------------------------ edge cases (P = 2: each pair of ranks)

#: name -> how the pair runs it: router, capacity_factor, tokens per rank (``sizes``), all tokens on expert 0
#: (``skew``), an input without gradient, eval + no_grad, a non-contiguous 3-D input, a double backward, a dtype
EDGES = {
    "empty-rank-sorting": dict(router="switch", capacity=None, sizes=(0, 5)),
    "empty-rank-capacity": dict(router="sparsemixer", capacity=1.0, sizes=(0, 5)),
    "one-expert-no-input-grad-sorting": dict(router="switch", capacity=None, skew=True, input_grad=False),
    "one-expert-no-input-grad-capacity": dict(router="switch", capacity=0.5, skew=True, input_grad=False),
    "capacity-tiny": dict(router="straight_through", capacity=1e-9),
    "capacity-huge": dict(router="gumbel_softmax", capacity=1e308),
    "eval-no-grad-sorting": dict(router="sparsemixer", capacity=None, mode="eval"),
    "eval-no-grad-capacity": dict(router="sparsemixer", capacity=0.5, mode="eval"),
    "3d-non-contiguous": dict(router="straight_through", capacity=0.5, shape="3d"),
    "double-backward-sorting": dict(router="switch", capacity=None, double=True),
    "double-backward-capacity": dict(router="switch", capacity=0.5, double=True),
    "bfloat16": dict(router="sparsemixer", capacity=0.5, dtype=torch.bfloat16),
}


def edge_layer(spec: dict, group=None) -> RoutedFeedForward:
    moe = layer(spec["router"], spec["capacity"], group).to(spec.get("dtype", torch.float64))
    if spec.get("skew"):  # every token's largest logit is expert 0's (the inputs are positive)
        with torch.no_grad():
            moe.router.weight.zero_()
            moe.router.weight[0] = 1.0
    return moe


def edge_batch(rank: int, spec: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    sizes = spec.get("sizes", (6, 8))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(sum(sizes), D, dtype=torch.float64, generator=g) * 2
    w = torch.randn(sum(sizes), D, dtype=torch.float64, generator=g)
    dtype = spec.get("dtype", torch.float64)
    x, w = x.split(sizes)[rank].to(dtype).clone(), w.split(sizes)[rank].to(dtype)
    if spec.get("skew"):
        x = x.abs() + 0.1
    if spec.get("shape") == "3d":  # (n/2, 2, D), not contiguous
        x, w = (t.reshape(2, -1, D).clone().transpose(0, 1) for t in (x, w))
        assert not x.is_contiguous()
    return x, w


def run_edge(moe: RoutedFeedForward, rank: int, spec: dict) -> dict:
    """Rank ``rank``'s forward (and backward) of edge case ``spec``; what the test compares."""
    x, w = edge_batch(rank, spec)
    if spec.get("mode") == "eval":
        moe.eval()
        with torch.no_grad():
            y = moe(x, generator=generator(rank))
        return {"out": y, "index": moe.stats.index, "dropped": moe.stats.dropped}
    x.requires_grad_(spec.get("input_grad", True))
    y = moe(x, generator=generator(rank))
    loss = (w * y).sum() + BALANCE_WEIGHT * moe.stats.balance_loss
    if spec.get("double"):  # a gradient penalty: the backward of the backward
        (g,) = torch.autograd.grad((w * y).sum(), x, create_graph=True)
        loss = g.pow(2).sum()
    loss.backward()
    return {"out": y.detach(), "index": moe.stats.index, "dropped": moe.stats.dropped.detach(),
            "x_grad": x.grad, "router_grad": moe.router.weight.grad,
            "expert_grads": {n: p.grad for n, p in moe.named_parameters() if n.startswith("fc")}}
