"""Apply N-D parallelism to a Qwen3 model (dense or MoE, on meta): the shared decoder order
(``torchtitan.models.common.parallelize.parallelize_decoder``: EP -> TP -> AC -> compile ->
FSDP / HSDP or DDP) with Qwen3's TP plan.

The plan is Llama 3's Megatron-style TP with sequence parallelism, plus:

- Qwen3's per-head ``q_norm``/``k_norm`` (they see this rank's heads: the weight is
  replicated and its gradient summed over tp, by treating the head dim as the sharded one);
- MoE blocks (``apply_moe_tp``: replicated routing, shared experts column/row-wise).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

from torchtitan.config import JobConfig
from torchtitan.distributed.expert_parallel import apply_moe_tp
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.tensor_parallel import _all_float8, _plan_classes, check_tp_divisibility
from torchtitan.distributed.utils import device_type
from torchtitan.models.common.parallelize import apply_outer_tp, feed_forward_plan, parallelize_decoder

__all__ = ["apply_qwen3_tp", "parallelize_qwen3"]


def apply_qwen3_tp(
    model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool, enable_float8_tensorwise_tp: bool = False
) -> nn.Module:
    """Megatron-style TP with sequence parallelism (as Llama 3's ``apply_tp``) for Qwen3."""
    check_tp_divisibility(model, tp_mesh.size())
    apply_outer_tp(model, tp_mesh, loss_parallel)

    for block in model.layers.values():
        attn = _plan_classes(enable_float8_tensorwise_tp and _all_float8(block.get_submodule("attention")))
        plan = {
            "attention_norm": SequenceParallel(),
            "attention": attn[2](input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
            "attention.wq": attn[0](),
            "attention.wk": attn[0](),
            "attention.wv": attn[0](),
            "attention.wo": attn[1](output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
        }
        if getattr(block.attention, "q_norm", None) is not None:
            # [bs, seq, local heads, head_dim]: the heads (dim 2) are what tp splits here.
            plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        if getattr(block, "moe_enabled", False):
            parallelize_module(block, tp_mesh, plan)
            apply_moe_tp(block.moe, tp_mesh)
            continue
        plan.update(feed_forward_plan(block, enable_float8_tensorwise_tp))
        parallelize_module(block, tp_mesh, plan)
    return model


def parallelize_qwen3(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    """Parallelize ``model`` in place according to ``parallel_dims`` and ``job_config``."""
    return parallelize_decoder(model, parallel_dims, job_config, apply_qwen3_tp, device_type)
