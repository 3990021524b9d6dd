"""Between MoE steps: the expert-bias update (load balancing without an auxiliary loss), the
router metrics and the MoE config checks; the family's ``ModelSpec`` hooks.

``MoE.tokens_per_expert`` accumulates the routed copies a rank saw since the last optimizer
step; :func:`build_moe_step_hooks` returns the callable the trainer runs after each optimizer
step, which sums the counts over the ranks that saw different tokens and moves
``expert_bias`` by ``coeff * sign(mean - load)``; :func:`moe_metrics` reports the loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn

from torchtitan.models.common.moe import MoE

if TYPE_CHECKING:
    from torchtitan.config import JobConfig

__all__ = [
    "build_moe_step_hooks",
    "moe_layers",
    "moe_metrics",
    "update_expert_bias",
    "validate_moe_config",
]



def moe_layers(model_parts: Iterable[nn.Module]) -> list[tuple[str, MoE]]:
    """Every ``MoE`` module of the model parts (pipeline stages), with its qualified name."""
    found = []
    for part in model_parts:
        for name, module in part.named_modules():
            if isinstance(module, MoE):
                found.append((name, module))
    return found


def update_expert_bias(moe: MoE, load: torch.Tensor) -> None:
    """``expert_bias += coeff * sign(mean(load) - load)``: under-loaded experts become more
    likely to be picked. ``load`` is the summed token count per expert (global)."""
    if moe.load_balance_coeff is None:
        return
    with torch.no_grad():
        load = load.to(torch.float32)
        delta = moe.load_balance_coeff * torch.sign(load.mean() - load)
        moe.expert_bias.add_(delta.to(moe.expert_bias.device))


def _token_group(parallel_dims: Any) -> Any | None:
    """The process group of the ranks whose routed tokens differ: dp_replicate x dp_shard x
    cp (the "dp_cp" view). Tensor-parallel ranks route the same tokens (the MoE input is
    replicated over tp, see ``torchtitan/distributed/expert_parallel.py``) and pipeline
    stages own different layers, so neither is summed over. None on one rank."""
    if parallel_dims is None or not getattr(parallel_dims, "dp_cp_enabled", False):
        return None
    return parallel_dims.get_mesh("dp_cp").get_group()


def _summed_counts(layers: list[tuple[str, MoE]], group: Any | None) -> list[torch.Tensor]:
    """Each layer's ``tokens_per_expert`` summed over ``group``, in one all-reduce."""
    if not layers:
        return []
    counts = torch.stack([m.tokens_per_expert for _, m in layers])
    if group is not None:
        import torch.distributed as dist

        if dist.get_world_size(group) > 1:
            counts = counts.clone()
            dist.all_reduce(counts, group=group)
    return list(counts.unbind(0))


def build_moe_step_hooks(model_parts: list[nn.Module], parallel_dims: Any) -> list[Callable[[], None]]:
    """The ``ModelSpec.build_step_hooks_fn`` of MoE families: one callable, run after every
    optimizer step, that updates every MoE layer's expert bias from the token counts summed
    over the ranks that routed different tokens, then resets the counts.

    Counts accumulate over all micro-batches of the step (gradient accumulation, pipeline
    micro-batches); each pipeline stage updates its own layers, so the sum is over the data
    (and sequence-parallel) ranks only, never over pp. One all-reduce of ``[layers, E]`` per
    step. Returns ``[]`` for a model without MoE layers.
    """
    layers = moe_layers(model_parts)
    if not layers:
        return []

    def step() -> None:
        group = _token_group(parallel_dims)
        with torch.no_grad():
            loads = _summed_counts(layers, group)
            for (_, moe), load in zip(layers, loads):
                update_expert_bias(moe, load)
                moe.last_load = load.clone()  # what moe_metrics reports for this step
                moe.tokens_per_expert.zero_()

    step.__name__ = "moe_expert_bias_update"
    return [step]


def moe_metrics(model_parts: list[nn.Module]) -> dict[str, float]:
    """Router statistics for the step line (``ModelSpec.metrics_fn``); no communication.

    From each layer's load of the last optimizer step as the step hook summed it over the
    data ranks (``MoE.last_load``; before any step, this rank's running counts):
    ``moe/imbalance`` = max load / mean load, averaged over layers, ``moe/imbalance_max`` and
    ``moe/worst_layer`` for the worst layer, ``moe/max_load`` and ``moe/min_load`` (largest
    and smallest fraction of a layer's routed copies any expert got). Under pipeline
    parallelism a rank sees its own stage's layers only.
    """
    layers = moe_layers(model_parts)
    imbalances, max_frac, min_frac, worst = [], 0.0, 1.0, ("", 0.0)
    for name, moe in layers:
        load = getattr(moe, "last_load", None)
        if load is None:
            load = moe.tokens_per_expert
        total = float(load.sum())
        if total <= 0:
            continue
        frac = load / total
        imb = float(frac.max()) * load.numel()
        imbalances.append(imb)
        max_frac = max(max_frac, float(frac.max()))
        min_frac = min(min_frac, float(frac.min()))
        if imb > worst[1]:
            worst = (name, imb)
    if not imbalances:
        return {}
    out = {
        "moe/imbalance": sum(imbalances) / len(imbalances),
        "moe/imbalance_max": worst[1],
        "moe/max_load": max_frac,
        "moe/min_load": min_frac,
    }
    parts = worst[0].replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "").split(".")
    if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit():
        out["moe/worst_layer"] = float(parts[1])
    return out


def validate_moe_config(job_config: JobConfig, model_args: Any) -> None:
    """The MoE checks that need the model's args (``ModelSpec.validate_fn``); raises
    ``ConfigError`` naming the option.

    ``model_args.moe_args`` (a ``MoEArgs``, or None/absent for a dense model) is read, and
    ``model_args.moe_enabled`` when present. The degree arithmetic that needs no model
    (EP divides dp_shard x cp, EP >= TP) is ``validate_layout``'s.
    """
    from torchtitan.config import ConfigError

    moe_args = getattr(model_args, "moe_args", None)
    enabled = getattr(model_args, "moe_enabled", moe_args is not None)
    ep = getattr(job_config.parallelism, "expert_parallel_degree", 1)
    if not enabled or moe_args is None:
        if ep > 1:
            raise ConfigError(
                f"parallelism.expert_parallel_degree {ep} needs an MoE model; this flavor is dense "
                "(set it to 1 or pick an MoE flavor)"
            )
        return
    if not 1 <= moe_args.top_k <= moe_args.num_experts:
        raise ConfigError(
            f"the flavor's top_k {moe_args.top_k} must be between 1 and its num_experts {moe_args.num_experts}"
        )
    if ep > 1 and moe_args.num_experts % ep != 0:
        raise ConfigError(
            f"parallelism.expert_parallel_degree {ep} must divide the number of experts "
            f"{moe_args.num_experts}"
        )
