"""Data parallelism applied from outside the model: FSDP2 (and HSDP) or DDP.

FSDP wraps each transformer block as one communication unit (one all-gather before its
forward, one reduce-scatter after its backward), the embedding as another, and the final
norm with the output projection as a third, then the root. Blocks are found by the module
names of docs/architecture.md (``tok_embeddings``, ``layers``, ``norm``, ``output``); any of
them may be None on a pipeline stage.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from torchtitan.config import ConfigError

__all__ = ["apply_fsdp", "apply_ddp", "RESHARD_POLICIES"]

RESHARD_POLICIES = ("default", "always", "never")


def _reshard_after_forward(policy: str, pp_enabled: bool, is_last_block: bool) -> bool:
    """Whether a block frees its gathered parameters after forward.

    "default": yes, except the last block (backward starts with it, so re-gathering would be
    wasted) and except under pipeline parallelism (a stage runs several microbatches'
    forwards before their backwards; re-gathering per microbatch would multiply traffic).
    """
    if policy == "always":
        return True
    if policy == "never":
        return False
    return not pp_enabled and not is_last_block


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    pp_enabled: bool,
    cpu_offload: bool = False,
    reshard_after_forward_policy: str = "default",
) -> nn.Module:
    """Shard ``model`` with FSDP2 over ``dp_mesh``; a 2-D mesh (replicate, shard) gives HSDP.

    ``param_dtype`` is the compute dtype of gathered parameters; gradients are reduced in
    ``reduce_dtype``; sharded parameters and optimizer state stay in their own dtype (fp32).
    """
    if reshard_after_forward_policy not in RESHARD_POLICIES:
        raise ConfigError(
            f"parallelism.fsdp_reshard_after_forward {reshard_after_forward_policy!r} is not one of "
            f"{RESHARD_POLICIES}"
        )
    config: dict = {
        "mesh": dp_mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
    }
    if cpu_offload:
        config["offload_policy"] = CPUOffloadPolicy()

    tok_embeddings = getattr(model, "tok_embeddings", None)
    if tok_embeddings is not None:
        fully_shard(
            tok_embeddings,
            reshard_after_forward=_reshard_after_forward(reshard_after_forward_policy, pp_enabled, False),
            **config,
        )
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        fully_shard(
            block,
            reshard_after_forward=_reshard_after_forward(
                reshard_after_forward_policy, pp_enabled, i == len(blocks) - 1
            ),
            **config,
        )
    # norm and output run last in forward and first in backward: one unit, kept gathered
    # between the two unless the user asks to always reshard.
    tail = [m for m in (getattr(model, "norm", None), getattr(model, "output", None)) if m is not None]
    if tail:
        fully_shard(tail, reshard_after_forward=reshard_after_forward_policy == "always", **config)
    fully_shard(model, reshard_after_forward=reshard_after_forward_policy == "always", **config)
    return model


def apply_ddp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    enable_compile: bool,
    enable_compiled_autograd: bool,
) -> nn.Module:
    """Replicate ``model`` over the 1-D ``dp_mesh`` with DDP (gradients all-reduced in
    100 MB buckets). Parameters must be plain tensors: DDP does not compose with TP/CP here.

    With compile on, dynamo's DDP optimizer splits compiled graphs at bucket boundaries so
    communication overlaps the backward; compiled autograd instead traces the Python reducer.
    """
    from torch.distributed._composable.replicate import replicate

    if dp_mesh.ndim != 1:
        raise ValueError(f"apply_ddp needs a 1-D data-parallel mesh, got {dp_mesh.ndim}-D")
    if enable_compile:
        torch._dynamo.config.optimize_ddp = (
            "python_reducer_without_compiled_forward" if enable_compiled_autograd else "ddp_optimizer"
        )
    replicate(model, device_mesh=dp_mesh, bucket_cap_mb=100)
    return model
