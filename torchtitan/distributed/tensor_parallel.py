"""Tensor + sequence parallelism for a Llama-shaped transformer, applied from outside.

Megatron-style plan expressed with DTensor:

- attention ``wq/wk/wv`` and MLP ``w1/w3`` are column-wise (each rank owns a slice of heads
  / hidden units), ``wo``/``w2`` row-wise, so a block needs one gather before and one
  reduce-scatter after each of attention and MLP;
- between those, activations are sharded along the sequence (sequence parallelism): the
  norms run on ``seq / tp`` tokens, and the row-wise outputs reduce-*scatter* to that layout
  instead of all-reducing;
- the embedding is row-wise (vocabulary-sharded) and emits sequence-sharded activations;
- the output projection is column-wise; with loss parallel its logits stay sharded along
  the vocabulary (a DTensor) and cross-entropy runs under ``loss_parallel()`` without
  gathering them.

``freqs_cis`` needs no plan: attention sees the whole (gathered) sequence and applies the
same rotary table to its local heads. Module names follow docs/architecture.md.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from torchtitan.config import ConfigError

__all__ = [
    "apply_outer_tp",
    "apply_tp",
    "check_async_tp",
    "check_tp_divisibility",
    "feed_forward_plan",
    "float8_tensorwise",
]


def _head_counts(attention: nn.Module) -> tuple[int, int]:
    """(query heads, key/value heads) of a block's attention: ``wq``/``wk`` of ``head_dim``-wide
    heads, or multi-head latent attention's ``wkv_b`` (DeepSeek), which expands the shared
    latent into every head's key and value part (as many heads as queries)."""
    if hasattr(attention, "wkv_b"):
        n_heads = attention.wkv_b.out_features // (attention.qk_nope_head_dim + attention.v_head_dim)
        return n_heads, n_heads
    head_dim = attention.head_dim
    return attention.wq.out_features // head_dim, attention.wk.out_features // head_dim


def check_tp_divisibility(model: nn.Module, tp_degree: int) -> None:
    """Each rank must own whole query and key/value heads."""
    for name, block in model.layers.named_children():
        n_heads, n_kv_heads = _head_counts(block.get_submodule("attention"))
        if n_kv_heads % tp_degree != 0 or n_heads % tp_degree != 0:
            raise ConfigError(
                f"parallelism.tensor_parallel_degree {tp_degree} must divide the model's "
                f"{n_kv_heads} key/value heads and {n_heads} query heads (layer {name}); "
                f"choose a degree that divides {n_kv_heads}"
            )


def _plan_classes(float8_tensorwise: bool) -> tuple[type, type, type]:
    """Float8 tensorwise linears need float8-aware plans that all-gather in float8."""
    if float8_tensorwise:
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
            PrepareFloat8ModuleInput,
        )

        return Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput
    return ColwiseParallel, RowwiseParallel, PrepareModuleInput


def _all_float8(module: nn.Module) -> bool:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return bool(linears) and all(type(m).__name__ == "Float8Linear" for m in linears)


def apply_tp(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    loss_parallel: bool,
    enable_async_tp: bool = False,
    enable_float8_tensorwise_tp: bool = False,
) -> nn.Module:
    """Shard ``model`` in place over the 1-D ``tp_mesh``; returns it.

    Between blocks, hidden states are plain local tensors holding ``seq / tp`` tokens (also
    what a pipeline stage sends on). ``enable_async_tp`` lets inductor overlap the TP
    collectives with the matmuls (CUDA + compile only).
    """
    check_tp_divisibility(model, tp_mesh.size())
    apply_outer_tp(model, tp_mesh, loss_parallel)

    for block in model.layers.values():
        # Float8 plans only where every linear they touch was converted (the float8
        # converter skips some, e.g. dims not multiples of 16); the others keep plain plans.
        attn = _plan_classes(enable_float8_tensorwise_tp and _all_float8(block.get_submodule("attention")))
        block_plan = {
            "attention_norm": SequenceParallel(),
            # attention(x, freqs_cis): gather the sequence of x, leave freqs_cis alone.
            "attention": attn[2](
                input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)
            ),
            "attention.wq": attn[0](),
            "attention.wk": attn[0](),
            "attention.wv": attn[0](),
            "attention.wo": attn[1](output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            **feed_forward_plan(block, enable_float8_tensorwise_tp),
        }
        parallelize_module(block, tp_mesh, block_plan)

    if enable_async_tp:
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group

        torch._inductor.config._micro_pipeline_tp = True
        enable_symm_mem_for_group(tp_mesh.get_group().group_name)
    return model


def apply_outer_tp(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool) -> None:
    """The plan outside the blocks: the embedding row-wise (vocabulary-sharded) emitting
    sequence-sharded activations, the final norm sequence-parallel, the output column-wise
    (logits sharded on the vocabulary under loss parallel). Any of the three may be None on
    a pipeline stage. An output tied to the embedding is refused: they shard differently."""
    tok, out = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    if tok is not None and out is not None and out.weight is tok.weight:
        raise ConfigError(
            "parallelism.tensor_parallel_degree > 1 with a flavor that ties the output layer to the "
            "embedding is not supported (they are sharded differently); use an untied flavor"
        )
    top_plan = {}
    if tok is not None:
        top_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if getattr(model, "norm", None) is not None:
        top_plan["norm"] = SequenceParallel()
    if out is not None:
        top_plan["output"] = ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    if top_plan:
        parallelize_module(model, tp_mesh, top_plan)


def feed_forward_plan(block: nn.Module, enable_float8_tensorwise_tp: bool) -> dict:
    """A dense block's SwiGLU (``feed_forward``), relative to the block: gathered input,
    ``w1``/``w3`` column-wise, ``w2`` row-wise reduce-scattered back to the sequence shard."""
    ffn = _plan_classes(enable_float8_tensorwise_tp and _all_float8(block.get_submodule("feed_forward")))
    return {
        "feed_forward": ffn[2](input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ffn[0](),
        "feed_forward.w2": ffn[1](output_layouts=Shard(1)),
        "feed_forward.w3": ffn[0](),
    }


def float8_tensorwise(job_config) -> bool:
    """Whether the float8 converter's recipe lets TP all-gather in float8 (tensorwise scales)."""
    return "float8" in job_config.model.converters and job_config.float8.recipe_name in (None, "tensorwise")


def check_async_tp(enabled: bool, compile_model: bool, device_type: str) -> None:
    """``parallelism.enable_async_tensor_parallel`` needs the compiled model on CUDA."""
    if not enabled:
        return
    if not compile_model:
        raise ConfigError(
            "parallelism.enable_async_tensor_parallel needs compile.enable = true with "
            "'model' in compile.components (inductor fuses the overlapped collectives)"
        )
    if device_type != "cuda":
        raise ConfigError("parallelism.enable_async_tensor_parallel needs CUDA GPUs")
