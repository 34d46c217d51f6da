"""The models and batches of the sharded-training checks, shared by the rank worker and the single-process
references in test_sharded.py (the same seeds give the same weights in both)."""

from typing import List, Sequence

import torch
from torch import nn

#: examples per step in all (split over the ranks) and training steps
BATCH, STEPS = 8, 4


def sign_model(seed: int) -> nn.Sequential:
    """Linear -> ReLU -> Linear with sizes divisible by 2 ranks (for tensor parallelism too)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


class ProjectedEncoder(nn.Module):
    """A linear input projection (what ``fold(embedding=...)`` scales) and a stock Post-LN torch.nn encoder."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.layers = self.encoder.layers  # what FSDP2 wraps one by one

    def forward(self, x, src_key_padding_mask=None):
        return self.encoder(self.proj(x), src_key_padding_mask=src_key_padding_mask)


def encoder_stack(seed: int) -> ProjectedEncoder:
    """The model for admin_torch.convert (no dropout)."""
    torch.manual_seed(seed)
    return ProjectedEncoder()


def admin_batches(steps: int = STEPS, shape: Sequence[int] = (BATCH, 8), seed: int = 100) -> List[torch.Tensor]:
    """One whole batch per step (each rank takes its chunk of dim 0)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(steps)]


def moe_batches(steps: int = STEPS) -> List[torch.Tensor]:
    return admin_batches(steps, (BATCH, 8), seed=200)
