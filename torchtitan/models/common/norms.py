"""Normalization layers shared by the models.

``torch.nn.RMSNorm`` is used as is, so tensor parallelism's ``SequenceParallel`` style and
FSDP treat it as an ordinary module with one ``weight`` parameter.
"""

from __future__ import annotations

from torch import nn

__all__ = ["build_norm"]


def build_norm(norm_type: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """A normalization layer over the last dimension ``dim``; ``norm_type`` is "rmsnorm"."""
    if norm_type == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm_type {norm_type!r}: use 'rmsnorm'")
