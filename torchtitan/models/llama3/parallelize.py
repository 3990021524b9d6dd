"""Apply N-D parallelism to a Llama 3 model (on meta) in the one legal order.

TP (+SP, loss parallel) → activation checkpointing → compile (per block) → FSDP / HSDP, or
DDP when only ``data_parallel_replicate_degree`` > 1. Each step is a generic function in
``torchtitan.distributed`` that receives a sub-mesh and the few settings it needs; this file
only reads the JobConfig and decides which ones run.
"""

from __future__ import annotations

from torch import nn

from torchtitan.components.chunked_loss import apply_chunked_loss
from torchtitan.config import JobConfig
from torchtitan.distributed.activation_checkpoint import apply_ac, describe_ac
from torchtitan.distributed.activation_offload import apply_activation_offload
from torchtitan.distributed.compile import apply_compile
from torchtitan.distributed.context_parallel import prepare_model_for_cp
from torchtitan.distributed.fsdp import apply_data_parallel
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.tensor_parallel import apply_tp, check_async_tp, float8_tensorwise
from torchtitan.distributed.utils import device_type
from torchtitan.tools.logging import logger

__all__ = ["parallelize_llama"]


def parallelize_llama(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    """Parallelize ``model`` in place according to ``parallel_dims`` and ``job_config``."""
    p = job_config.parallelism
    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    backend = job_config.compile.backend

    if parallel_dims.cp_enabled:
        # Ring attention takes equal-head q/k/v; inputs are sharded by the trainer's context.
        prepare_model_for_cp(model)
    if job_config.training.chunked_loss:
        compile_loss = job_config.compile.enable and "loss" in job_config.compile.components
        apply_chunked_loss(model, job_config.training.loss_chunk_size, backend if compile_loss else None)

    if parallel_dims.tp_enabled:
        check_async_tp(p.enable_async_tensor_parallel, compile_model, device_type)
        apply_tp(
            model,
            parallel_dims.get_mesh("tp"),
            loss_parallel=parallel_dims.loss_parallel_enabled,
            enable_async_tp=p.enable_async_tensor_parallel,
            enable_float8_tensorwise_tp=float8_tensorwise(job_config),
        )
        logger.info(
            f"applied tensor parallelism (degree {parallel_dims.tp}, loss parallel "
            f"{parallel_dims.loss_parallel_enabled}, async {p.enable_async_tensor_parallel})"
        )

    ac = job_config.activation_checkpoint
    if ac.mode != "none":
        apply_ac(model, ac.mode, ac.selective_ac_option, ac.op_saved_matmuls, ac.op_ac_layers, ac.later_layers)
        logger.info(f"applied {ac.mode} activation checkpointing ({describe_ac(ac)})")

    if compile_model:
        apply_compile(model, backend)
        logger.info(f"compiled each transformer block with backend {backend!r}")
    apply_activation_offload(model, ac.cpu_offload_layers, device_type)

    apply_data_parallel(model, parallel_dims, job_config.training, p, compile_model)
    return model
