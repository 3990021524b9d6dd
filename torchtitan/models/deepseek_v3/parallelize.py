"""Apply N-D parallelism to a DeepSeek-V3 model (on meta): the shared decoder order
(``torchtitan.models.common.parallelize.parallelize_decoder``: EP -> TP -> AC -> compile ->
FSDP / HSDP or DDP) with a TP plan for multi-head latent attention (MLA).

Outside the attention the plan is Qwen3's: the embedding, the final norm and the output as
Llama 3's (sequence parallelism, loss parallel), the dense blocks' SwiGLU column/row-wise,
the MoE blocks through ``apply_moe_tp``. In the attention, fed the gathered sequence:

- the query projection is column-parallel over heads: ``wq``, or, with low-rank queries,
  ``wq_a`` replicated, ``q_norm`` on the replicated latent and ``wq_b`` column-wise;
- ``wkv_a`` is replicated: its output (the key/value latent and the rotary key part shared
  by all heads) is needed whole by every rank; ``kv_norm`` runs on the replicated latent;
  ``wkv_b`` is column-wise (each rank expands the latent into its own heads);
- ``wo`` is row-wise and reduce-scatters back to the sequence shard.

Why the activations stay DTensors from the projections to the attention op (Qwen3's plan
turns them into local tensors right away): the latent and the rotary key are replicated but
feed only this rank's heads, so each rank's gradient for them is a partial sum. As DTensors
the partial gradient is summed over tp by DTensor itself (the rotary key is expanded to all
heads and cut to this rank's; the latent's gradient comes out of ``wkv_b`` as ``Partial``);
as local tensors it would silently stay partial. ``freqs_cis`` enters the attention as a
replicated DTensor for the same reason (the rotary ops then see DTensors only); the
attention op gets this rank's heads as plain tensors (DTensor has no sharding rule for the
CPU flash-attention op, and the op needs none: heads are independent).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ParallelStyle, PrepareModuleInput, SequenceParallel, parallelize_module

from torchtitan.config import JobConfig
from torchtitan.distributed.expert_parallel import apply_moe_tp
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.tensor_parallel import _all_float8, _plan_classes, check_tp_divisibility
from torchtitan.distributed.utils import device_type
from torchtitan.models.common.parallelize import apply_outer_tp, feed_forward_plan, parallelize_decoder

__all__ = ["apply_deepseek_v3_tp", "attention_plan", "parallelize_deepseek_v3"]


class _Replicated(ParallelStyle):
    """Parameters become ``Replicate`` DTensors over tp; plain tensor inputs are taken as
    replicated; outputs stay DTensors (so their consumers' partial gradients get summed)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def to_dtensor(mod: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
            return tuple(
                DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
                else x
                for x in inputs
            )

        return distribute_module(module, device_mesh, input_fn=to_dtensor)


class _LocalHeads(ParallelStyle):
    """The attention op's inputs ``[bs, heads, seq, head_dim]`` as plain tensors of this
    rank's heads (``Shard(1)``, whatever layout sharding propagation gave them)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def to_local_heads(mod: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
            return tuple(
                x.redistribute(mesh, [Shard(1)]).to_local() if isinstance(x, DTensor) else x for x in inputs
            )

        return distribute_module(module, device_mesh, input_fn=to_local_heads)


def attention_plan(attention: nn.Module, enable_float8_tensorwise_tp: bool) -> dict[str, ParallelStyle]:
    """MLA's plan, relative to the block (see the module docstring). Float8 tensorwise plans
    for the sharded linears when every attention linear was converted; the input is gathered
    in high precision (the replicated ``wkv_a``/``wq_a`` take it as it is)."""
    col, row, _ = _plan_classes(enable_float8_tensorwise_tp and _all_float8(attention))
    plan: dict[str, ParallelStyle] = {
        # attention(x, freqs_cis): gather the sequence of x; freqs_cis as a replicated DTensor.
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), Replicate()), desired_input_layouts=(Replicate(), Replicate())
        ),
        "attention.wkv_a": _Replicated(),
        "attention.kv_norm": _Replicated(),
        "attention.wkv_b": col(use_local_output=False),
        "attention.sdpa": _LocalHeads(),
        "attention.wo": row(output_layouts=Shard(1)),
    }
    if getattr(attention, "q_lora_rank", 0):
        plan["attention.wq_a"] = _Replicated()
        plan["attention.q_norm"] = _Replicated()
        plan["attention.wq_b"] = col(use_local_output=False)
    else:
        plan["attention.wq"] = col(use_local_output=False)
    return plan


def apply_deepseek_v3_tp(
    model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool, enable_float8_tensorwise_tp: bool = False
) -> nn.Module:
    """Megatron-style TP with sequence parallelism for DeepSeek-V3 (MLA, dense and MoE blocks)."""
    check_tp_divisibility(model, tp_mesh.size())
    apply_outer_tp(model, tp_mesh, loss_parallel)
    for block in model.layers.values():
        plan: dict[str, Any] = {"attention_norm": SequenceParallel(), "ffn_norm": SequenceParallel()}
        plan.update(attention_plan(block.attention, enable_float8_tensorwise_tp))
        if getattr(block, "moe_enabled", False):
            parallelize_module(block, tp_mesh, plan)
            apply_moe_tp(block.moe, tp_mesh)
            continue
        plan.update(feed_forward_plan(block, enable_float8_tensorwise_tp))
        parallelize_module(block, tp_mesh, plan)
    return model


def parallelize_deepseek_v3(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    """Parallelize ``model`` in place according to ``parallel_dims`` and ``job_config``."""
    return parallelize_decoder(model, parallel_dims, job_config, apply_deepseek_v3_tp, device_type)
