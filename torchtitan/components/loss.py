"""Training loss: token-mean cross-entropy computed in fp32.

Logits may come in bf16 (autocast or FSDP mixed precision) and may be a vocab-sharded DTensor
under loss parallel; ``.float()`` and ``F.cross_entropy`` handle both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_loss(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1))


def build_loss_fn(compile_loss: bool = False, backend: str = "inductor"):
    if compile_loss:
        return torch.compile(cross_entropy_loss, backend=backend)
    return cross_entropy_loss
