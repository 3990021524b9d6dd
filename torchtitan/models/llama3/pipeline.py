"""Split a Llama 3 model (on meta) into pipeline stages and build the schedule that runs them.

Each stage is the whole Transformer deep-copied with the pieces it does not hold removed
(``tok_embeddings`` only on the first stage, ``norm`` + ``output`` only on the last, the
``layers`` ModuleDict keeping its original keys), then parallelized (TP, AC, compile, FSDP)
by ``parallelize_fn`` exactly like a whole model. The trainer materialises the stages
afterwards. Generic machinery lives in ``torchtitan/distributed/pipeline.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchtitan.components.chunked_loss import take_labels_kwarg
from torchtitan.config import JobConfig
from torchtitan.distributed import pipeline as pp_lib
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.tools.logging import logger

__all__ = ["pipeline_llama", "split_llama"]

_FIRST = ("tok_embeddings",)
_LAST = ("norm", "output")


def split_llama(model: nn.Module, layout: pp_lib.StageLayout, stage_ids: tuple[int, ...]) -> list[nn.Module]:
    """One pruned deep copy of ``model`` per stage id (the model itself is left whole)."""
    pieces = list(_FIRST) + [f"layers.{name}" for name in model.layers] + list(_LAST)
    parts = []
    for stage in stage_ids:
        keep = pp_lib.stage_module_names(layout, stage, _FIRST, _LAST)
        parts.append(pp_lib.prune_to_stage(copy.deepcopy(model), keep, pieces))
    return parts


def pipeline_llama(
    model: nn.Module,
    parallel_dims: ParallelDims,
    job_config: JobConfig,
    device: torch.device,
    model_args: Any,
    parallelize_fn: Callable[[nn.Module, ParallelDims, JobConfig], nn.Module],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[Any, list[nn.Module], bool, bool]:
    """Build this rank's stages and their schedule.

    Returns ``(schedule, model_parts, has_first_stage, has_last_stage)``; ``model_parts`` are
    the parallelized stages on this rank, still on meta (the caller runs ``to_empty`` and
    ``init_weights`` on each), in stage order.
    """
    from torch.distributed.pipelining import PipelineStage

    p = job_config.parallelism
    pp_mesh = parallel_dims.get_mesh("pp")
    pp_rank, pp = pp_mesh.get_local_rank(), parallel_dims.pp
    schedule = p.pipeline_parallel_schedule
    layout = pp_lib.stage_layout_from_config(p, n_layers=len(model.layers), pp=pp)
    n_microbatches = pp_lib.num_microbatches(
        job_config.training.local_batch_size,
        p.pipeline_parallel_microbatch_size,
        p.pipeline_parallel_microbatches,
    )
    if not p.pipeline_parallel_schedule_csv:
        pp_lib.validate_microbatches(schedule, n_microbatches, layout.num_stages, pp)
    if parallel_dims.fsdp_enabled:
        pp_lib.check_reshard_policy(schedule, p.fsdp_reshard_after_forward, p.pipeline_parallel_schedule_csv)

    stage_ids = layout.rank_stages[pp_rank]
    parts, stages = [], []
    for stage_id, part in zip(stage_ids, split_llama(model, layout, stage_ids)):
        part = parallelize_fn(part, parallel_dims, job_config)
        if job_config.training.chunked_loss:  # the last stage returns the loss
            take_labels_kwarg(part)
        parts.append(part)
        stages.append(
            PipelineStage(part, stage_id, layout.num_stages, device, group=pp_mesh.get_group())
        )
        logger.info(
            f"pipeline rank {pp_rank}: stage {stage_id}/{layout.num_stages} holds "
            f"{pp_lib.stage_module_names(layout, stage_id, _FIRST, _LAST)}"
        )
    sched = pp_lib.build_pipeline_schedule(
        stages, schedule, n_microbatches, loss_fn, p.pipeline_parallel_schedule_csv
    )
    logger.info(
        f"pipeline schedule {type(sched).__name__}: {layout.num_stages} stages over {pp} ranks, "
        f"{n_microbatches} microbatches"
    )
    has_first = 0 in stage_ids
    has_last = layout.num_stages - 1 in stage_ids
    return sched, parts, has_first, has_last
