"""The SwiGLU feed-forward every family here uses (dense blocks, MoE shared experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeedForward"]

_BASE_INIT_STD = 0.02


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``; ``w1``/``w3`` are column-, ``w2`` row-parallel
    under TP (the names the parallel plans and the checkpoint adapters use)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, init_std: float) -> None:
        """``w1`` at the base std; ``w2``/``w3`` at ``init_std`` (depth-scaled by the caller)."""
        nn.init.trunc_normal_(self.w1.weight, mean=0.0, std=_BASE_INIT_STD)
        for linear in (self.w2, self.w3):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=init_std)
