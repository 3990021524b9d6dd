"""The layout checks made before anything is built: degrees, CP shape, batch arithmetic.

A pure function of the config and the world size (no process group, no device), so the
trainer can call it before the rendezvous and the dry-run planner raises exactly the errors
a real launch would.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan.config import ConfigError, JobConfig
from torchtitan.distributed.context_parallel import validate_cp
from torchtitan.distributed.parallel_dims import ParallelDims

__all__ = ["LayoutCheck", "validate_layout"]


@dataclass(frozen=True)
class LayoutCheck:
    """What ``validate_layout`` settles: the degrees and the batch arithmetic."""

    parallel_dims: ParallelDims
    global_batch: int
    grad_accumulation_steps: int


def validate_layout(cfg: JobConfig, world_size: int) -> LayoutCheck:
    """Check ``cfg``'s layout for ``world_size`` ranks; raise ConfigError naming the option."""
    p = cfg.parallelism
    pd = ParallelDims(
        dp_replicate=p.data_parallel_replicate_degree,
        dp_shard=p.data_parallel_shard_degree,
        cp=p.context_parallel_degree,
        tp=p.tensor_parallel_degree,
        pp=p.pipeline_parallel_degree,
        world_size=world_size,
        enable_loss_parallel=not p.disable_loss_parallel,
        ep=getattr(p, "expert_parallel_degree", 1),
    )
    validate_cp(
        p.context_parallel_degree,
        cfg.training.seq_len,
        p.context_parallel_load_balance,
        p.context_parallel_rotate_method,
        tp=p.tensor_parallel_degree,
    )
    if cfg.checkpoint.create_seed_checkpoint and world_size != 1:
        raise ConfigError(
            "checkpoint.create_seed_checkpoint writes the seed from one process: run it "
            "without torchrun (or with --nproc_per_node 1)"
        )
    # Batch arithmetic: global = local × dp × accumulation.
    t, dp_degree = cfg.training, pd.dp_degree
    global_batch = t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size * dp_degree
    if global_batch % (t.local_batch_size * dp_degree) != 0:
        raise ConfigError(
            f"training.global_batch_size {global_batch} is not a multiple of local_batch_size "
            f"{t.local_batch_size} × data-parallel degree {dp_degree}; use a multiple of "
            f"{t.local_batch_size * dp_degree}"
        )
    return LayoutCheck(pd, global_batch, global_batch // (t.local_batch_size * dp_degree))
