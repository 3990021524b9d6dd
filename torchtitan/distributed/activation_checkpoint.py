"""Activation checkpointing per transformer block: trade recomputation for memory.

Modes (``[activation_checkpoint]``):

- ``none``: keep every activation.
- ``full``: each block keeps only its input; its whole forward is rerun in backward.
- ``selective`` with ``selective_ac_option = "N"`` (an integer): checkpoint every N-th block
  fully (blocks N-1, 2N-1, ... counting from 0); N = 1 is the same as full.
- ``selective`` with ``selective_ac_option = "op"``: every block is checkpointed, but the
  outputs of the expensive ops are saved rather than recomputed: attention (every SDPA
  kernel: flash, memory-efficient, cuDNN, CPU flash), tensor-parallel reduce-scatters, and
  every other matmul (mm/addmm/bmm, and the MoE experts' grouped GEMMs), and full
  reductions to one value (``aten.max``: the amax each float8 cast scales by, a scalar, so saving it costs nothing and spares backward a pass
  over the activation). The rest (norms, activations, rotary, elementwise) is cheap and
  recomputed. Saving alternate matmuls keeps roughly half of the matmul memory
  while recomputing only half of the matmul FLOPs. ``op_saved_matmuls = "all"`` saves every
  matmul output instead: only cheap ops are rerun (on the 3B shape that removes wk, wo and
  w3's reruns, ~11% of the step's matmul FLOPs, for 0.38 GiB per block at 16k tokens), for when memory
  allows it (``scripts/plan.py`` says whether it does). ``op_saved_matmuls = "none"`` saves
  no matmul output, only attention's: backward reruns the block's matmuls as full AC does but
  not attention, whose FLOPs grow with the sequence (at 65k tokens on the 3B shape attention
  is ~3/4 of the step) while its saved output costs one activation per block (about a tenth of
  op AC's memory). ``op_ac_layers = N`` keeps op AC
  on layers 0..N-1 only and checkpoints the later ones fully: a dial between op AC's speed
  and full AC's memory for shapes where op AC on every layer does not fit;
  ``later_layers = "attention"`` gives those later layers attention-only op AC instead, and
  ``later_layers = "none"`` no AC at all (between op AC everywhere and none anywhere: what
  ``mode = "auto"`` picks when memory is left after op AC on every layer).

Blocks are replaced in ``model.layers`` by a checkpoint wrapper, so parameter names gain a
``_checkpoint_wrapped_module.`` segment that ``torch.distributed.checkpoint.state_dict``
strips again.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from torchtitan.config import ConfigError
from torchtitan.tools.logging import logger

__all__ = ["apply_ac", "describe_ac", "AC_MODES", "op_sac_save_list"]

AC_MODES = ("none", "full", "selective")
LATER_LAYERS = ("full", "attention", "none")
OP_SAVED_MATMULS = ("every_other", "all", "none")


def _ops(namespace: Any, names: tuple[str, ...]) -> set:
    """The ``.default`` overloads of the named ops that this torch build has."""
    return {getattr(namespace, n).default for n in names if hasattr(namespace, n)}


# Grouped GEMMs (MoE experts) count as matmuls: their outputs are as costly to recompute.
_MATMUL_OPS = _ops(torch.ops.aten, ("mm", "addmm", "bmm", "_grouped_mm"))


def op_sac_save_list() -> set:
    """Ops whose outputs selective-op AC saves (matmuls only every other one by default)."""
    attention = _ops(
        torch.ops.aten,
        (
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_flash_attention_for_cpu",
        ),
    )
    comms = _ops(torch.ops._c10d_functional, ("reduce_scatter_tensor",))
    # Float8 linears cast with a scale from max(abs(x)); with the scalar saved, the recompute
    # before backward's float8 casts does not reread the whole activation to find it again.
    amax = _ops(torch.ops.aten, ("max",))
    return attention | comms | amax | _MATMUL_OPS


def _op_sac_context_fn(saved_matmuls: str = "every_other") -> tuple[Any, Any]:
    """Fresh contexts for one checkpointed forward; called by checkpoint on every forward."""
    save_list = op_sac_save_list()
    # Forward and recompute count matmuls separately so both make the same decisions.
    matmul_count: dict[bool, int] = defaultdict(int)

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if op in _MATMUL_OPS:
            if saved_matmuls == "none":
                return CheckpointPolicy.PREFER_RECOMPUTE
            if saved_matmuls == "every_other":
                matmul_count[ctx.is_recompute] += 1
                if matmul_count[ctx.is_recompute] % 2 == 0:
                    return CheckpointPolicy.PREFER_RECOMPUTE
        if op in save_list:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _wrap(block: nn.Module, saved_matmuls: str | None) -> nn.Module:
    """Checkpoint ``block``: fully (``saved_matmuls`` None) or per op, saving those matmuls."""
    kwargs: dict[str, Any] = {"preserve_rng_state": False}
    if saved_matmuls is not None:
        kwargs["context_fn"] = functools.partial(_op_sac_context_fn, saved_matmuls)
    return checkpoint_wrapper(block, **kwargs)


def _every_n(option: str | int) -> int:
    try:
        n = int(option)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ConfigError(
            f"activation_checkpoint.selective_ac_option {option!r} must be 'op' or a positive "
            "integer N (checkpoint every N-th block)"
        )
    return n


def describe_ac(ac: Any) -> str:
    """What an ``[activation_checkpoint]`` section applies, for the build's log line."""
    detail = str(ac.selective_ac_option)
    if ac.mode == "selective" and detail == "op":
        saved = {"every_other": "every other matmul", "all": "every matmul", "none": "attention only, no matmul"}
        detail = f"op, {saved[ac.op_saved_matmuls]} output saved"
        if ac.op_ac_layers >= 0:
            later = {"full": "full AC", "attention": "attention output only saved", "none": "no AC"}[ac.later_layers]
            detail += f", on the first {ac.op_ac_layers} layers; {later} on the others"
    return detail


def apply_ac(
    model: nn.Module,
    mode: str,
    selective_ac_option: str | int = "2",
    op_saved_matmuls: str = "every_other",
    op_ac_layers: int = -1,
    later_layers: str = "full",
) -> nn.Module:
    """Wrap the blocks of ``model.layers`` in place according to ``mode``; returns ``model``."""
    if mode == "auto":
        raise ConfigError(
            'activation_checkpoint.mode = "auto" is resolved by the launch (python -m torchtitan.train) '
            "before the build; a trainer built directly needs torchtitan.planner.memory_policy.resolve_auto"
        )
    if mode not in AC_MODES:
        raise ConfigError(f"activation_checkpoint.mode {mode!r} is not one of {AC_MODES}")
    if op_saved_matmuls not in OP_SAVED_MATMULS:
        raise ConfigError(
            f"activation_checkpoint.op_saved_matmuls {op_saved_matmuls!r} is not one of {OP_SAVED_MATMULS}"
        )
    if later_layers not in LATER_LAYERS:
        raise ConfigError(f"activation_checkpoint.later_layers {later_layers!r} is not one of {LATER_LAYERS}")
    if mode == "none":
        return model
    op_level = mode == "selective" and str(selective_ac_option) == "op"
    every = 1 if mode == "full" or op_level else _every_n(selective_ac_option)
    blocks = len(model.layers)
    if every > blocks:
        logger.warning(
            f"activation_checkpoint.selective_ac_option = {selective_ac_option!r}: checkpointing every "
            f"{every}th block of {blocks} checkpoints none of them (as mode = \"none\"); use a value <= {blocks}"
        )
    for i, (name, block) in enumerate(list(model.layers.named_children())):
        # The layer's index in the whole model: a pipeline stage keeps the global names.
        layer = int(name) if name.isdigit() else i
        saved: str | None = None  # full AC
        if op_level and (op_ac_layers < 0 or layer < op_ac_layers):
            saved = op_saved_matmuls
        elif op_level and later_layers == "attention":
            saved = "none"
        elif op_level and later_layers == "none":
            continue
        if (i + 1) % every == 0:
            model.layers.register_module(name, _wrap(block, saved))
    return model
