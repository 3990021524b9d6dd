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
    _check_sequence_split(cfg)
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


def _check_sequence_split(cfg: JobConfig) -> None:
    """Sequence parallelism (on with TP) shards each sequence over the tp ranks, so every rank
    must get the same number of tokens: checked here, where all ranks agree, instead of one
    rank failing inside a collective while the others wait for it."""
    p = cfg.parallelism
    tp, cp = p.tensor_parallel_degree, p.context_parallel_degree
    if tp <= 1 or cp > 1:  # with CP, validate_cp checks seq_len against cp x tp
        return
    runs = [("training.seq_len", cfg.training.seq_len)]
    if cfg.validation.enable:
        runs.append(("validation.seq_len", cfg.validation.seq_len))
    for option, seq_len in runs:
        if seq_len % tp:
            raise ConfigError(
                f"{option} {seq_len} must be divisible by parallelism.tensor_parallel_degree ({tp}): "
                f"sequence parallelism splits each sequence over the tp ranks; use a multiple of {tp}"
            )
