"""Allocate a (sharded) model built on meta and initialise it exactly as one process would."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

__all__ = ["materialize"]


def materialize(
    model: nn.Module,
    *,
    device: torch.device,
    init_device: torch.device | str,
    buffer_device: torch.device | None,
    seed: int,
    build_full_model: Callable[[], nn.Module],
    is_pipeline_stage: bool,
) -> None:
    """``to_empty`` on ``init_device``, then ``init_weights`` drawn from ``seed``.

    The init draws from a generator seeded with the run's seed, so every layout starts from
    the same weights. On CUDA, DTensor's offset-based RNG makes a sharded init equal to the
    full one; on CPU it has none (every shard would draw the same numbers), so there one full
    replica (``build_full_model()``, on meta) is initialised and scattered into the shards. A
    pipeline stage draws in a different order than the whole model, so on CPU it is loaded
    from a full replica too. On GPUs a pipeline stage initialises itself (a full fp32 replica
    of a large model would not fit in host memory): to start PP and non-PP layouts from
    identical weights there, start from a seed checkpoint (docs/checkpoint.md).
    """
    model.to_empty(device=init_device)
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.init_weights(buffer_device=buffer_device)
        has_dtensor = any(isinstance(p, DTensor) for p in model.parameters())
        if device.type == "cpu" and (has_dtensor or is_pipeline_stage):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            full = build_full_model()  # on meta: a CPU constructor would consume the generator
            full.to_empty(device="cpu")
            torch.manual_seed(seed)
            full.init_weights()
            set_model_state_dict(
                model, full.state_dict(), options=StateDictOptions(full_state_dict=True, strict=False)
            )
            del full
