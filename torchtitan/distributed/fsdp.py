"""Data parallelism applied from outside the model: FSDP2 (and HSDP) or DDP.

FSDP wraps each transformer block as one communication unit (one all-gather before its
forward, one reduce-scatter after its backward), the embedding as another, and the final
norm with the output projection as a third, then the root. Blocks are found by the module
names of docs/architecture.md (``tok_embeddings``, ``layers``, ``norm``, ``output``); any of
them may be None on a pipeline stage.

Under expert parallelism the routed experts of an MoE block (``<block>.moe.experts``, whose
weights ``apply_ep`` made DTensors sharded over ``ep``) are their own FSDP unit over the data
ranks EP leaves (``dp_shard_mod_ep``, with ``dp_replicate`` under HSDP); the block's unit
then takes the rest. See ``torchtitan/distributed/expert_parallel.py`` for the gradient
divide factor.

``training.enable_cpu_offload`` keeps parameters, gradients and optimizer state on the host,
which only FSDP knows how to do (it copies each unit to the device for its forward and
backward): with one data rank the model is still wrapped, over a mesh of one rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from torchtitan.config import ConfigError
from torchtitan.distributed.utils import TORCH_DTYPE_MAP
from torchtitan.tools.logging import logger

__all__ = ["apply_data_parallel", "apply_fsdp", "apply_ddp", "uses_fsdp", "RESHARD_POLICIES"]

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
    experts_mesh: DeviceMesh | None = None,
    ep_gradient_divide_factor: float | None = None,
) -> nn.Module:
    """Shard ``model`` with FSDP2 over ``dp_mesh``; a 2-D mesh (replicate, shard) gives HSDP.

    ``param_dtype`` is the compute dtype of gathered parameters; gradients are reduced in
    ``reduce_dtype``; sharded parameters and optimizer state stay in their own dtype (fp32).

    ``experts_mesh`` (expert parallelism): the mesh the EP-sharded routed experts
    (``<block>.moe.experts``) are FSDP-sharded over, as a unit of their own whose gradients
    are divided by ``ep_gradient_divide_factor`` (all data ranks) instead of its group size.
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
        # pinned host memory makes the copies asynchronous; only a CUDA build can pin
        config["offload_policy"] = CPUOffloadPolicy(pin_memory=dp_mesh.device_type == "cuda")

    tok_embeddings = getattr(model, "tok_embeddings", None)
    output = getattr(model, "output", None)
    # A weight shared by the embedding and the output layer (tied embeddings) can belong to
    # one FSDP unit only: both then stay in the root unit.
    tied = tok_embeddings is not None and output is not None and output.weight is tok_embeddings.weight
    if tok_embeddings is not None and not tied:
        fully_shard(
            tok_embeddings,
            reshard_after_forward=_reshard_after_forward(reshard_after_forward_policy, pp_enabled, False),
            **config,
        )
    blocks = [b for b in model.layers.values() if b is not None]
    for i, block in enumerate(blocks):
        experts = getattr(getattr(block, "moe", None), "experts", None)
        if experts_mesh is not None and experts is not None:
            _shard_experts(
                experts,
                experts_mesh,
                ep_gradient_divide_factor,
                reshard_after_forward=_reshard_after_forward(
                    reshard_after_forward_policy, pp_enabled, i == len(blocks) - 1
                ),
                **config,
            )
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
    if tail and not tied:
        fully_shard(tail, reshard_after_forward=reshard_after_forward_policy == "always", **config)
    fully_shard(model, reshard_after_forward=reshard_after_forward_policy == "always", **config)
    return model


def _shard_experts(
    experts: nn.Module,
    experts_mesh: DeviceMesh,
    gradient_divide_factor: float | None,
    reshard_after_forward: bool,
    **config,
) -> None:
    """One FSDP unit for a block's routed experts over ``experts_mesh``.

    The local expert dim (``num_experts / ep``) is sharded when it has at least one expert
    per rank; otherwise the hidden dim (dim 1), so no rank gets an empty shard.
    """
    config = dict(config, mesh=experts_mesh)
    shard_size = experts_mesh.size(-1)
    local_experts = min(p.to_local().shape[0] if hasattr(p, "to_local") else p.shape[0] for p in experts.parameters())
    if local_experts < shard_size:
        config["shard_placement_fn"] = lambda param: Shard(1)
    fully_shard(experts, reshard_after_forward=reshard_after_forward, **config)
    if gradient_divide_factor is not None:
        experts.set_gradient_divide_factor(gradient_divide_factor)
        gloo = any(torch.distributed.get_backend(g) == "gloo" for g in experts_mesh.get_all_groups())
        if gloo and shard_size > 1:
            # A custom factor makes the reduce-scatter a PREMUL_SUM, which gloo lacks: sum,
            # then divide. (Not with one shard: FSDP then divides while copying, and a
            # forced sum would divide a second time, torch 2.13.)
            experts.set_force_sum_reduction_for_comms(True)


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


def uses_fsdp(parallel_dims: Any, training: Any) -> bool:
    """Whether ``apply_data_parallel`` wraps the model in FSDP: data ranks to shard over, or
    CPU offload (module doc). FSDP then casts to the compute dtype, not autocast."""
    return parallel_dims.fsdp_enabled or training.enable_cpu_offload


def apply_data_parallel(
    model: nn.Module,
    parallel_dims: Any,
    training: Any,
    parallelism: Any,
    compile_model: bool,
) -> nn.Module:
    """The data-parallel step of every family's parallelize function: FSDP (or HSDP) over
    dp_shard x cp (x dp_replicate), the routed experts as their own units under expert
    parallelism; or DDP when only ``data_parallel_replicate_degree`` > 1. Takes the
    ``[training]`` and ``[parallelism]`` sections."""
    pd, t, p = parallel_dims, training, parallelism
    if uses_fsdp(pd, t):
        replicated = pd.dp_replicate_enabled
        dp_mesh = pd.get_mesh(("dp_replicate", "dp_shard_cp") if replicated else "dp_shard_cp")
        experts_mesh, divide = None, None
        if getattr(pd, "ep", 1) > 1:
            experts_mesh = pd.get_mesh(("dp_replicate", "dp_shard_mod_ep") if replicated else "dp_shard_mod_ep")
            # the experts' gradients are averaged over every data rank, not their unit's
            divide = float(pd.dp_replicate * pd.dp_shard * pd.cp)
        apply_fsdp(
            model,
            dp_mesh,
            param_dtype=TORCH_DTYPE_MAP[t.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[t.mixed_precision_reduce],
            pp_enabled=pd.pp_enabled,
            cpu_offload=t.enable_cpu_offload,
            reshard_after_forward_policy=p.fsdp_reshard_after_forward,
            experts_mesh=experts_mesh,
            ep_gradient_divide_factor=divide,
        )
        kind = "HSDP" if replicated else "FSDP"
        logger.info(f"applied {kind} over mesh {dp_mesh.mesh_dim_names} {tuple(dp_mesh.shape)}")
    elif pd.dp_replicate_enabled:
        if pd.tp_enabled or pd.cp_enabled:
            raise ConfigError(
                "parallelism.data_parallel_replicate_degree > 1 with tensor or context parallelism "
                "needs FSDP: set data_parallel_shard_degree > 1 (HSDP) instead of pure DDP"
            )
        apply_ddp(
            model,
            pd.get_mesh("dp_replicate"),
            enable_compile=compile_model,
            enable_compiled_autograd=p.enable_compiled_autograd,
        )
        logger.info(f"applied DDP over {pd.dp_replicate} replicas")
    return model
