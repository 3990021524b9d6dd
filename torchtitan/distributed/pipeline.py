"""Pipeline parallelism, model-independent parts: stage layout, schedules, microbatches, step.

A pipeline splits the model's layers into ``num_stages`` consecutive stages over the ``pp``
ranks of a pipeline group. Single-stage schedules (GPipe, 1F1B) put one stage on each rank;
looped schedules put several ("virtual") stages on each rank, stage ``s`` on rank
``s % pp``; V schedules (ZBVZeroBubble, DualPipeV) put exactly two on each rank, rank ``r``
holding stages ``r`` and ``2 pp - 1 - r``, so the first and the last stage share a rank.

What a model family supplies is only the names of its pieces (see
``torchtitan/models/llama3/pipeline.py``): a stage is the whole model deep-copied on the meta
device with every piece it does not hold removed, so parameter names (and checkpoint keys)
are the same as without pipelining.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from torchtitan.config import PIPELINE_SCHEDULES, ConfigError

__all__ = [
    "SCHEDULES",
    "V_SCHEDULES",
    "ZERO_BUBBLE_SCHEDULES",
    "StageLayout",
    "build_pipeline_schedule",
    "check_reshard_policy",
    "csv_stage_ids",
    "get_schedule_class",
    "is_multi_stage_schedule",
    "num_microbatches",
    "pipeline_step",
    "prune_to_stage",
    "resolve_stage_layout",
    "share_last_stage_loss",
    "stage_ids_on_rank",
    "stage_module_names",
    "validate_microbatches",
]

SCHEDULES = PIPELINE_SCHEDULES  # the names options accept, spelled once in config/
# Two stages per rank, placed in a V: rank r holds stages r and 2 pp - 1 - r.
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")
# Split backward into input-grad and weight-grad passes, run at different times. If FSDP
# frees a stage's gathered parameters between them, torch computes wrong weight gradients
# (measured: some None, others ~0.7x), so these need reshard_after_forward=False.
ZERO_BUBBLE_SCHEDULES = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")

_OPT = "parallelism.pipeline_parallel_"


def get_schedule_class(name: str) -> type:
    """The ``torch.distributed.pipelining`` schedule class called ``name`` (case-insensitive).

    Raises ConfigError for names torch (this version) does not have, e.g. DualPipeV before
    torch 2.9.
    """
    from torch.distributed.pipelining import schedules

    try:
        return schedules.get_schedule_class(name)
    except ValueError:
        known = [s for s in SCHEDULES if hasattr(schedules, f"Schedule{s}")]
        raise ConfigError(
            f"{_OPT}schedule {name!r} is not available in torch {torch.__version__}; "
            f"choose one of {', '.join(known)}"
        ) from None


def is_multi_stage_schedule(name: str) -> bool:
    """Whether the schedule runs several stages per rank (looped / V)."""
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti

    return issubclass(get_schedule_class(name), PipelineScheduleMulti)


def csv_stage_ids(path: str, pp: int) -> list[tuple[int, ...]]:
    """For a custom schedule file (one row of actions such as ``0F1`` per rank): the stage
    ids each rank runs, in increasing order."""
    from torch.distributed.pipelining.schedules import _Action

    if not os.path.isfile(path):
        raise ConfigError(f"{_OPT}schedule_csv {path!r} does not exist; give a path to a schedule CSV file")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) != pp:
        raise ConfigError(
            f"{_OPT}schedule_csv {path!r} has {len(rows)} rows but pipeline_parallel_degree is {pp}; "
            "write one row of actions per pipeline rank"
        )
    stages: list[tuple[int, ...]] = []
    for rank, row in enumerate(rows):
        try:
            actions = [_Action.from_str(cell) for cell in row]
        except RuntimeError as e:
            raise ConfigError(f"{_OPT}schedule_csv {path!r} row {rank}: {str(e).splitlines()[0]}") from None
        ids = sorted({a.stage_index for a in actions if a is not None})
        if not ids:
            raise ConfigError(f"{_OPT}schedule_csv {path!r} row {rank} has no actions; every rank needs a stage")
        stages.append(tuple(ids))
    return stages


def stage_ids_on_rank(pp_rank: int, pp: int, num_stages: int, style: str) -> tuple[int, ...]:
    """Stages of rank ``pp_rank``: ``loop`` puts stage s on rank s % pp; ``v`` (two stages per
    rank) puts rank r's on r and 2 pp - 1 - r."""
    if style == "loop":
        return tuple(range(pp_rank, num_stages, pp))
    if style == "v":
        if num_stages != 2 * pp:
            raise ConfigError(
                f"V-shaped schedules need exactly 2 stages per rank (2 × {pp}), got {num_stages} stages; "
                f"remove {_OPT}split_points / layers_per_stage or give {2 * pp} stages"
            )
        return (pp_rank, 2 * pp - 1 - pp_rank)
    raise ValueError(f"unknown stage placement style {style!r}: 'loop' or 'v'")


@dataclass(frozen=True)
class StageLayout:
    """How the layers are cut into stages, and where the stages run.

    ``layer_starts[s]`` is the first layer of stage ``s`` (``layer_starts[0] == 0``);
    ``rank_stages[r]`` are the stages pipeline rank ``r`` holds.
    """

    num_stages: int
    layer_starts: tuple[int, ...]
    n_layers: int
    rank_stages: tuple[tuple[int, ...], ...]

    def layers_of(self, stage: int) -> range:
        end = self.layer_starts[stage + 1] if stage + 1 < self.num_stages else self.n_layers
        return range(self.layer_starts[stage], end)


def _parse_split_points(points: Sequence[str], n_layers: int, layers_prefix: str) -> list[int]:
    starts = []
    for point in points:
        head, _, index = point.rpartition(".")
        if head != layers_prefix or not index.isdigit():
            raise ConfigError(
                f"{_OPT}split_points entry {point!r} is not a layer name; use '{layers_prefix}.N' "
                f"with 0 < N < {n_layers}"
            )
        starts.append(int(index))
    if any(not 0 < s < n_layers for s in starts) or starts != sorted(set(starts)):
        raise ConfigError(
            f"{_OPT}split_points {list(points)} must be strictly increasing layers between "
            f"{layers_prefix}.1 and {layers_prefix}.{n_layers - 1}"
        )
    return starts


def _even_starts(n_layers: int, num_stages: int) -> list[int]:
    """Balanced cut; the first ``n_layers % num_stages`` stages get one layer more (the last
    stage also runs the output projection, the costliest single matmul)."""
    base, extra = divmod(n_layers, num_stages)
    starts, at = [], 0
    for s in range(num_stages):
        starts.append(at)
        at += base + (1 if s < extra else 0)
    return starts


def _weighted_starts(n_layers: int, num_stages: int, first_less: int, last_less: int) -> list[int]:
    """TorchTitan's weighted automatic split: the embedding counts as ``first_less`` layers of
    the first stage and the output projection as ``last_less`` of the last, and the
    ``n_layers + first_less + last_less`` units are spread evenly (earlier stages take the
    remainder). Raises ConfigError when a stage would get no layer."""
    units = _even_starts(n_layers + first_less + last_less, num_stages) + [n_layers + first_less + last_less]
    sizes = [units[s + 1] - units[s] for s in range(num_stages)]
    sizes[0] -= first_less
    sizes[-1] -= last_less
    if num_stages == 1:
        sizes = [n_layers]
    if min(sizes) < 1:
        raise ConfigError(
            f"{_OPT}first_stage_less_layers {first_less} / last_stage_less_layers {last_less} leave a "
            f"stage of {num_stages} without a layer ({n_layers} layers); use smaller values"
        )
    starts, at = [], 0
    for size in sizes:
        starts.append(at)
        at += size
    return starts


def stage_layout_from_config(parallelism: Any, n_layers: int, pp: int, layers_prefix: str = "layers") -> StageLayout:
    """``resolve_stage_layout`` with the options of a ``[parallelism]`` section."""
    p = parallelism
    return resolve_stage_layout(
        n_layers=n_layers,
        pp=pp,
        schedule=p.pipeline_parallel_schedule,
        schedule_csv=p.pipeline_parallel_schedule_csv,
        split_points=p.pipeline_parallel_split_points,
        layers_per_stage=p.pipeline_parallel_layers_per_stage,
        layers_prefix=layers_prefix,
        first_stage_less_layers=p.pipeline_parallel_first_stage_less_layers,
        last_stage_less_layers=p.pipeline_parallel_last_stage_less_layers,
    )


def resolve_stage_layout(
    n_layers: int,
    pp: int,
    schedule: str,
    schedule_csv: str = "",
    split_points: Sequence[str] = (),
    layers_per_stage: int | None = None,
    layers_prefix: str = "layers",
    first_stage_less_layers: int = 0,
    last_stage_less_layers: int = 0,
) -> StageLayout:
    """Decide the number of stages, their layers and their ranks from the ``[parallelism]``
    options; every inconsistency is a one-line ConfigError naming the option."""
    if schedule_csv:
        rank_stages = csv_stage_ids(schedule_csv, pp)
        num_stages = max(max(ids) for ids in rank_stages) + 1
        seen = sorted(s for ids in rank_stages for s in ids)
        if seen != list(range(num_stages)):
            raise ConfigError(
                f"{_OPT}schedule_csv {schedule_csv!r} must run each stage 0..{num_stages - 1} on exactly one rank"
            )
        style = None
    else:
        multi = is_multi_stage_schedule(schedule)
        style = "v" if schedule in V_SCHEDULES else "loop"
        if split_points:
            num_stages = len(split_points) + 1
        elif layers_per_stage is not None:
            num_stages = math.ceil(n_layers / layers_per_stage)
        else:
            num_stages = 2 * pp if multi else pp
        what = "split_points" if split_points else "layers_per_stage"
        if not multi and num_stages != pp:
            raise ConfigError(
                f"{_OPT}{what} gives {num_stages} stages but {schedule} runs one stage per rank "
                f"({pp}); use {pp} stages or a looped schedule such as Interleaved1F1B"
            )
        if num_stages % pp != 0:
            raise ConfigError(
                f"{_OPT}{what} gives {num_stages} stages, not a multiple of pipeline_parallel_degree {pp}; "
                "every rank needs the same number of stages"
            )
        rank_stages = [stage_ids_on_rank(r, pp, num_stages, style) for r in range(pp)]
    if num_stages > n_layers:
        raise ConfigError(
            f"{num_stages} pipeline stages for {n_layers} layers: every stage needs a layer; "
            f"use fewer stages ({_OPT}degree / layers_per_stage)"
        )
    if split_points:
        starts = [0] + _parse_split_points(split_points, n_layers, layers_prefix)
        if len(starts) != num_stages:
            raise ConfigError(
                f"{_OPT}split_points gives {len(starts)} stages but the schedule file has {num_stages}"
            )
    elif layers_per_stage is not None:
        starts = list(range(0, n_layers, layers_per_stage))
        if len(starts) != num_stages:
            raise ConfigError(
                f"{_OPT}layers_per_stage {layers_per_stage} gives {len(starts)} stages but the "
                f"schedule file has {num_stages}"
            )
    elif first_stage_less_layers or last_stage_less_layers:
        starts = _weighted_starts(n_layers, num_stages, first_stage_less_layers, last_stage_less_layers)
    else:
        starts = _even_starts(n_layers, num_stages)
    return StageLayout(num_stages, tuple(starts), n_layers, tuple(tuple(ids) for ids in rank_stages))


def stage_module_names(
    layout: StageLayout,
    stage: int,
    first: Sequence[str] = ("tok_embeddings",),
    last: Sequence[str] = ("norm", "output"),
    layers_prefix: str = "layers",
) -> list[str]:
    """Fully qualified names of the modules stage ``stage`` holds, in forward order."""
    names = list(first) if stage == 0 else []
    names += [f"{layers_prefix}.{i}" for i in layout.layers_of(stage)]
    if stage == layout.num_stages - 1:
        names += list(last)
    return names


def prune_to_stage(model: nn.Module, keep: Sequence[str], pieces: Sequence[str]) -> nn.Module:
    """Remove from ``model`` (in place) every module of ``pieces`` not in ``keep``.

    A piece inside a ModuleDict (``layers.3``) is deleted, so the remaining keys keep their
    names; a top-level piece (``tok_embeddings``) is set to None, which the model's forward
    skips.
    """
    keep_set = set(keep)
    for name in pieces:
        if name in keep_set:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.ModuleDict):
            del parent[child]
        else:
            setattr(parent, child, None)
    return model


# ---- microbatches ------------------------------------------------------------------------
def num_microbatches(local_batch_size: int, microbatch_size: int, microbatches: int | None) -> int:
    """Microbatches per step: ``pipeline_parallel_microbatches`` if set, else local batch /
    microbatch size; the local batch must split evenly."""
    if microbatches is not None:
        if local_batch_size % microbatches != 0:
            raise ConfigError(
                f"training.local_batch_size {local_batch_size} does not split into {_OPT}microbatches "
                f"{microbatches}; use a divisor of {local_batch_size}"
            )
        return microbatches
    if local_batch_size % microbatch_size != 0:
        raise ConfigError(
            f"training.local_batch_size {local_batch_size} is not a multiple of {_OPT}microbatch_size "
            f"{microbatch_size}; use a divisor of {local_batch_size}"
        )
    return local_batch_size // microbatch_size


def validate_microbatches(schedule: str, n_microbatches: int, num_stages: int, pp: int) -> None:
    """Refuse, in one line, microbatch counts the torch schedules would reject later."""
    fix = f"raise training.local_batch_size or lower {_OPT}microbatch_size"
    if schedule in ("1F1B", "DualPipeV") and n_microbatches < num_stages:
        raise ConfigError(
            f"{schedule} needs at least as many microbatches as stages ({num_stages}), got "
            f"{n_microbatches}; {fix}"
        )
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds != 0:
            raise ConfigError(
                f"{schedule} runs microbatches in rounds of {pp} ranks: {n_microbatches} microbatches "
                f"must be a multiple of {rounds} (or fewer than {2 * pp}); {fix}"
            )


def check_reshard_policy(schedule: str, policy: str, schedule_csv: str = "") -> None:
    """Zero-bubble schedules (and custom files, which may split backward the same way)
    compute weight gradients after FSDP would have resharded: refuse 'always' for them."""
    if policy == "always" and (schedule_csv or schedule in ZERO_BUBBLE_SCHEDULES):
        what = f"the schedule file {schedule_csv!r}" if schedule_csv else schedule
        raise ConfigError(
            f"parallelism.fsdp_reshard_after_forward 'always' gives wrong gradients with {what} "
            "(weight gradients are computed after resharding); use 'default' or 'never'"
        )


# ---- schedule and step ----------------------------------------------------------------
def build_pipeline_schedule(
    stages: list,
    schedule: str,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule_csv: str = "",
):
    """The torch schedule object running ``stages`` (this rank's PipelineStages).

    The loss of each microbatch is divided by the number of microbatches and gradients are
    not rescaled by torch (``scale_grads=False``): the summed microbatch losses are then the
    batch mean, and the gradients are those of the batch mean, as without pipelining.
    """
    from torch.distributed.pipelining.schedules import (
        PipelineScheduleMulti,
        _PipelineScheduleRuntime,
    )

    def microbatch_loss(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_fn(pred, labels) / n_microbatches

    if schedule_csv:
        cls: type = _PipelineScheduleRuntime
    else:
        cls = get_schedule_class(schedule)
    if issubclass(cls, PipelineScheduleMulti):
        sched = cls(stages, n_microbatches=n_microbatches, loss_fn=microbatch_loss, scale_grads=False)
    else:
        if len(stages) != 1:
            raise ValueError(f"{schedule} runs one stage per rank, got {len(stages)}")
        sched = cls(stages[0], n_microbatches=n_microbatches, loss_fn=microbatch_loss, scale_grads=False)
    if schedule_csv:
        sched._load_csv(schedule_csv)
    for stage in stages:
        _no_stats_in_metadata_inference(stage)
    return sched


def _no_stats_in_metadata_inference(stage: Any) -> None:
    """On its first step torch runs each stage's forward once more, to infer the shapes it
    sends (later stages on uninitialised inputs). Modules that accumulate training
    statistics in forward say so with a ``collect_stats`` attribute (the MoE token counts
    behind the expert-bias update): it is off during that extra forward. (torch 2.13 calls
    it ``_forward_metadata_inference``, torch 2.11 ``_shape_inference``.)"""
    name = next((n for n in ("_forward_metadata_inference", "_shape_inference") if hasattr(stage, n)), None)
    if name is None:
        return
    infer = getattr(stage, name)

    def without_stats(*args: Any, **kwargs: Any) -> Any:
        modules = [m for m in stage.submod.modules() if hasattr(m, "collect_stats")]
        for m in modules:
            m.collect_stats = False
        try:
            return infer(*args, **kwargs)
        finally:
            for m in modules:
                m.collect_stats = True

    setattr(stage, name, without_stats)


def pipeline_step(
    schedule,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    has_first_stage: bool,
    has_last_stage: bool,
    labels_to_stages: bool = False,
) -> torch.Tensor:
    """Run forward and backward of one batch through the pipeline.

    Inputs are fed where the first stage lives, labels where the last one does (and, with
    ``labels_to_stages``, also to the stages as the keyword ``labels``, for a last stage that
    computes its loss itself: the chunked loss). Returns the batch's loss (sum of the scaled
    microbatch losses) on the rank of the last stage, zero elsewhere (see
    ``share_last_stage_loss``).
    """
    losses: list[torch.Tensor] | None = [] if has_last_stage else None
    target = labels if has_last_stage else None
    args = (inputs,) if has_first_stage else ()
    kwargs = {"labels": labels} if labels_to_stages and has_last_stage else {}
    schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
    if not has_last_stage:
        return torch.zeros((), device=labels.device)
    loss = torch.stack([_plain(loss.detach()) for loss in losses]).sum()  # type: ignore[union-attr]
    return loss


def _plain(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def share_last_stage_loss(loss: torch.Tensor, pp_mesh: DeviceMesh) -> torch.Tensor:
    """Give every rank of the pipeline group the last stage's loss (others pass zero)."""
    out = loss.detach().clone().float()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=pp_mesh.get_group())
    return out
