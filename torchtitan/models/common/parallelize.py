"""The parallelize function shared by decoder families with MoE blocks (Qwen3, DeepSeek-V3).

One legal order: EP -> TP (+SP, loss parallel) -> activation checkpointing -> compile (per
block) -> FSDP / HSDP (the routed experts as their own units over the data ranks EP
leaves), or DDP when only ``data_parallel_replicate_degree`` > 1. What differs between the
families is the attention's TP plan only: a family passes its ``apply_tp`` (see
:data:`ApplyTP`) and may reuse the plan pieces every family shares (re-exported here from
``distributed/tensor_parallel.py``: the embedding, the final norm and the output; the dense
SwiGLU; the MoE block). Also:

- the sequence-level auxiliary loss (if on) enters backward divided by what each forward's
  main loss is divided by (gradient accumulation steps x pipeline microbatches);
- under EP, compile leaves the routed experts eager (their FSDP hooks and host-read split
  sizes do not fit a full graph).

This is a parallelize module: with the families' own, the only part of ``models/`` that
imports ``torchtitan.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from torchtitan.components.chunked_loss import apply_chunked_loss
from torchtitan.config import ConfigError, JobConfig
from torchtitan.distributed.activation_checkpoint import apply_ac, describe_ac
from torchtitan.distributed.activation_offload import apply_activation_offload
from torchtitan.distributed.compile import apply_compile
from torchtitan.distributed.context_parallel import prepare_model_for_cp
from torchtitan.distributed.expert_parallel import apply_ep, expert_modules, ignore_profiler_ops_in_op_sac
from torchtitan.distributed.fsdp import apply_data_parallel
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.tensor_parallel import (  # noqa: F401 - the families' plan pieces
    apply_outer_tp,
    check_async_tp,
    feed_forward_plan,
    float8_tensorwise,
)
from torchtitan.tools.logging import logger

__all__ = ["ApplyTP", "apply_outer_tp", "feed_forward_plan", "float8_tensorwise", "parallelize_decoder"]

# apply_tp(model, tp_mesh, loss_parallel, enable_float8_tensorwise_tp) -> model: a family's
# TP plan for its blocks (and, through apply_outer_tp, the rest of the model).
ApplyTP = Callable[[nn.Module, DeviceMesh, bool, bool], nn.Module]


def _compile_around_experts(model: nn.Module, backend: str) -> None:
    """Regional compile under expert parallelism: an MoE block's routed experts are their
    own FSDP unit (whose hooks dynamo does not trace) and their all-to-alls take split sizes
    read on the host, so neither fits in a full graph. Dense blocks are compiled whole; in an
    MoE block each other piece (norms, attention, router, shared experts) is compiled on its
    own, and the dispatch, the grouped GEMMs and the combine run eagerly between them."""
    import torch

    from torchtitan.distributed.compile import _materialize_async_inputs

    def compiled(module: nn.Module) -> nn.Module:
        c = torch.compile(module, backend=backend, fullgraph=True)
        c.register_forward_pre_hook(_materialize_async_inputs)
        return c

    for name, block in list(model.layers.named_children()):
        if not getattr(block, "moe_enabled", False):
            model.layers.register_module(name, compiled(block))
            continue
        inner = getattr(block, "_checkpoint_wrapped_module", block)  # under AC
        for child in ("attention_norm", "attention", "ffn_norm"):
            setattr(inner, child, compiled(getattr(inner, child)))
        moe = inner.moe
        moe.router = compiled(moe.router)
        if moe.shared_experts is not None:
            moe.shared_experts = compiled(moe.shared_experts)


def _loss_divisor(job_config: JobConfig, parallel_dims: ParallelDims) -> int:
    """What the trainer divides each forward's loss by: the gradient accumulation steps,
    times the pipeline microbatches under PP."""
    t, p = job_config.training, job_config.parallelism
    dp = parallel_dims.dp_degree
    global_batch = t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size * dp
    divisor = max(1, global_batch // (t.local_batch_size * dp))
    if parallel_dims.pp_enabled:
        from torchtitan.distributed.pipeline import num_microbatches

        divisor *= num_microbatches(
            t.local_batch_size, p.pipeline_parallel_microbatch_size, p.pipeline_parallel_microbatches
        )
    return divisor


def parallelize_decoder(
    model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig, apply_tp: ApplyTP, device_type: str
) -> nn.Module:
    """Parallelize ``model`` in place according to ``parallel_dims`` and ``job_config``,
    with the family's ``apply_tp``. ``device_type`` comes from the family's module, where
    the planner's dry run sets it to the planned GPU's ("cuda") while it builds."""
    p = job_config.parallelism
    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    backend = job_config.compile.backend
    moes = expert_modules(model)

    if parallel_dims.cp_enabled:
        prepare_model_for_cp(model)
    if job_config.training.chunked_loss:
        compile_loss = job_config.compile.enable and "loss" in job_config.compile.components
        apply_chunked_loss(model, job_config.training.loss_chunk_size, backend if compile_loss else None)

    ep = getattr(parallel_dims, "ep", 1)
    if ep > 1:
        if not moes:
            raise ConfigError(
                f"parallelism.expert_parallel_degree {ep} needs an MoE model; this flavor is dense"
            )
        apply_ep(model, parallel_dims.get_mesh("ep"))
        logger.info(f"applied expert parallelism (degree {ep}) to {len(moes)} MoE layers")

    if parallel_dims.tp_enabled:
        check_async_tp(p.enable_async_tensor_parallel, compile_model, device_type)
        apply_tp(model, parallel_dims.get_mesh("tp"), parallel_dims.loss_parallel_enabled, float8_tensorwise(job_config))
        if p.enable_async_tensor_parallel:
            import torch
            from torch.distributed._symmetric_memory import enable_symm_mem_for_group

            torch._inductor.config._micro_pipeline_tp = True
            enable_symm_mem_for_group(parallel_dims.get_mesh("tp").get_group().group_name)
        logger.info(f"applied tensor parallelism (degree {parallel_dims.tp})")

    divisor = _loss_divisor(job_config, parallel_dims)
    for _, moe in moes:
        moe.aux_loss_grad_scale = 1.0 / divisor

    ac = job_config.activation_checkpoint
    if ac.mode != "none":
        if ep > 1 and ac.mode == "selective" and ac.selective_ac_option == "op":
            ignore_profiler_ops_in_op_sac()
        apply_ac(model, ac.mode, ac.selective_ac_option, ac.op_saved_matmuls, ac.op_ac_layers, ac.later_layers)
        logger.info(f"applied {ac.mode} activation checkpointing ({describe_ac(ac)})")

    if compile_model:
        if ep > 1:
            _compile_around_experts(model, backend)
            logger.info(
                f"compiled each dense block, and each MoE block but its routed experts, with backend {backend!r}"
            )
        else:
            apply_compile(model, backend)
            logger.info(f"compiled each transformer block with backend {backend!r}")
    apply_activation_offload(model, ac.cpu_offload_layers, device_type)

    apply_data_parallel(model, parallel_dims, job_config.training, p, compile_model)
    return model
