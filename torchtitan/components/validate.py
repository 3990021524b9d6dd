"""Validation: the loss on a held-out dataset every ``validation.freq`` steps.

The held-out data has its own batch size and sequence length and is sharded by
data-parallel rank like the training data (CP, TP and PP ranks of one data-parallel group
share its batches). A validation runs ``validation.steps`` batches per data-parallel rank
(-1: until any rank's data runs out; the ranks agree each batch, so they always run the
same number of batches and no collective is left waiting), in eval mode and without
gradients, through the same contexts as training: the context-parallel sequence split,
loss parallel under TP, mixed precision, and, under PP, the pipeline schedule's
forward-only ``eval`` (or, for the schedules whose ``eval`` keeps backward actions and
before the first training step, the stages run forward in order with point-to-point
sends: ``pipeline_forward``). The model is
put back in training mode afterwards (FSDP modules resharded), and the data starts from the
beginning at every validation.

The loss is averaged per token over all batches and all data-parallel (and CP) ranks;
perplexity is ``exp(loss)``. Both go to the console, TensorBoard, W&B and JSONL through
``MetricsProcessor.log_validation``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from torchtitan.components.chunked_loss import labels_for_loss
from torchtitan.components.data import build_dataloader
from torchtitan.config import ConfigError
from torchtitan.distributed.context_parallel import cp_context
from torchtitan.tools.logging import logger

__all__ = ["Validator", "pipeline_eval", "pipeline_forward"]


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def pipeline_eval(
    schedule: Any,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    has_first_stage: bool,
    has_last_stage: bool,
    labels_to_stages: bool = False,
) -> torch.Tensor:
    """Forward only through the pipeline (``schedule.eval``): the sum of the microbatch
    losses as the schedule's loss function returns them, on the last stage; zero elsewhere."""
    if not hasattr(schedule, "eval"):
        raise RuntimeError(
            f"{type(schedule).__name__} has no eval(): this torch's pipelining has no "
            "forward-only schedule path; validation under PP needs torch >= 2.8"
        )
    losses: list[torch.Tensor] | None = [] if has_last_stage else None
    target = labels if has_last_stage else None
    args = (inputs,) if has_first_stage else ()
    kwargs = {"labels": labels} if labels_to_stages and has_last_stage else {}
    schedule.eval(*args, target=target, losses=losses, **kwargs)
    if not has_last_stage:
        return torch.zeros((), device=labels.device)
    return torch.stack([_plain(loss.detach()).float() for loss in losses]).sum()  # type: ignore[union-attr]


def _reshard(model: nn.Module) -> None:
    """Free FSDP's unsharded parameters. A module that does not reshard after forward waits
    for the backward to do it; without one (here) the unsharded parameters would stay
    registered, and the optimizer's state dict would no longer find its sharded ones."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# Schedules whose eval() is forward-only (checked on torch 2.13: one stage per rank, or looped
# stages with separate forward and backward actions). The zero-bubble and V-shaped ones run a
# fixed action list that keeps its backward actions under eval(), so the validator runs
# their stages forward itself (``pipeline_forward``).
_EVAL_SCHEDULES = ("ScheduleGPipe", "Schedule1F1B", "ScheduleInterleaved1F1B", "ScheduleLoopedBFS")


def _eval_is_forward_only(schedule: Any) -> bool:
    """Whether ``schedule.eval`` may run this validation: one of ``_EVAL_SCHEDULES``, and
    not the schedule's first step. torch 2.11 prepares a stage's buffers once, on the first
    step; a first step under ``eval`` prepares them without gradients and the training step
    after it fails ("has gradients None"). Before the first training step the stages run
    forward by hand (``pipeline_forward``)."""
    if type(schedule).__name__ not in _EVAL_SCHEDULES:
        return False
    ready = getattr(schedule, "_stage_backward_initialized", getattr(schedule, "_stages_backward_initialized", True))
    return bool(ready)
_P2P_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _send(t: torch.Tensor, dst: int) -> None:
    t = t.contiguous()
    header = [t.dim(), _P2P_DTYPES.index(t.dtype), *t.shape]
    dist.send(torch.tensor(header + [0] * (10 - len(header)), dtype=torch.int64, device=t.device), dst)
    dist.send(t, dst)


def _recv(src: int, device: torch.device) -> torch.Tensor:
    header = torch.empty(10, dtype=torch.int64, device=device)
    dist.recv(header, src)
    ndim, code, *shape = header.tolist()
    t = torch.empty(shape[:ndim], dtype=_P2P_DTYPES[code], device=device)
    dist.recv(t, src)
    return t


def pipeline_forward(
    schedule: Any,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunked_loss: bool = False,
) -> torch.Tensor:
    """Forward only through the pipeline stages without the schedule's action list: every
    microbatch goes through the stages in order, activations sent point-to-point between
    the ranks that own consecutive stages (any placement: looped or V). Returns the mean
    microbatch loss on the rank of the last stage, zero elsewhere."""
    stages = getattr(schedule, "_stages", None) or [schedule._stage]
    mine = {stage.stage_index: stage for stage in stages}
    first = stages[0]
    owner, me, last = first.stage_index_to_group_rank, first.group_rank, first.num_stages - 1
    n_microbatches = getattr(schedule, "_n_microbatches", 1)
    total = torch.zeros((), device=labels.device)
    for x, y in zip(inputs.tensor_split(n_microbatches), labels.tensor_split(n_microbatches)):
        act: torch.Tensor | None = None
        for index in range(last + 1):
            if owner[index] != me:
                continue
            if index > 0 and owner[index - 1] != me:
                act = _recv(dist.get_global_rank(first.group, owner[index - 1]), labels.device)
            module = mine[index].submod
            if index < last:
                act = module(x if index == 0 else act)
                act = act.to_local() if isinstance(act, DTensor) else act
                if owner[index + 1] != me:
                    _send(act, dist.get_global_rank(first.group, owner[index + 1]))
            elif chunked_loss:
                with labels_for_loss(module, y):
                    total += _plain(module(x if index == 0 else act)).float()
            else:
                total += _plain(loss_fn(module(x if index == 0 else act), y)).float()
    return total / n_microbatches


class Validator:
    """Builds the held-out loader once; ``validate(step)`` is collective (every rank calls it
    at the same steps) and returns the loss (also on ranks that do not log)."""

    def __init__(
        self,
        settings: Any,  # the [validation] section
        *,
        tokenizer: Any,
        dp_rank: int,
        dp_degree: int,
        model_parts: list[nn.Module],
        parallel_dims: Any,
        device: torch.device,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        train_context: Callable[[Any], AbstractContextManager],
        amp_context: AbstractContextManager,
        metrics: Any,
        rank: int,
        log_here: bool,
        chunked_loss: bool = False,
        cp_rotate_method: str = "allgather",
        cp_load_balance: bool = True,
        pp_schedule: Any = None,
        pp_has_first_stage: bool = False,
        pp_has_last_stage: bool = False,
        pp_loss_scale: float = 1.0,
        seed: int = 0,
        num_shards: int = 0,
    ):
        self.settings = s = settings
        pd = parallel_dims
        if pd.cp_enabled:
            chunks = 2 * pd.cp if cp_load_balance else pd.cp
            if s.seq_len % chunks:
                raise ConfigError(
                    f"validation.seq_len = {s.seq_len} must be divisible by {chunks} (context "
                    f"parallel degree {pd.cp}" + (" x 2 for load balancing)" if cp_load_balance else ")")
                )
        if pp_schedule is not None:
            n_microbatches = getattr(pp_schedule, "_n_microbatches", 1)
            if s.local_batch_size % n_microbatches:
                raise ConfigError(
                    f"validation.local_batch_size = {s.local_batch_size} must be divisible by the "
                    f"pipeline's {n_microbatches} microbatches (the schedule splits each batch)"
                )
        self.model_parts = model_parts
        self.parallel_dims = pd
        self.device = device
        self.loss_fn = loss_fn
        self.train_context = train_context
        self.amp_context = amp_context
        self.metrics = metrics
        self.log_here = log_here
        self.chunked_loss = chunked_loss
        self.cp_rotate_method = cp_rotate_method
        self.cp_load_balance = cp_load_balance
        self.pp_schedule = pp_schedule
        self.pp_has_first_stage = pp_has_first_stage
        self.pp_has_last_stage = pp_has_last_stage
        # The schedule's loss function is training's (scaled by 1 / accumulation steps): undo it.
        self.pp_loss_scale = pp_loss_scale
        self.dataloader = build_dataloader(
            dataset=s.dataset,
            dataset_path=s.dataset_path,
            tokenizer=tokenizer,
            seq_len=s.seq_len,
            local_batch_size=s.local_batch_size,
            global_batch_size=s.local_batch_size * dp_degree,
            dp_rank=dp_rank,
            dp_world_size=dp_degree,
            num_shards=num_shards,
            infinite=False,
            seed=seed,
        )
        self._start = copy.deepcopy(self.dataloader.state_dict())
        self._distributed = dist.is_available() and dist.is_initialized()
        self.last: dict[str, float] = {}
        if rank == 0:
            what = "the whole set" if s.steps == -1 else f"{s.steps} batches"
            logger.info(
                f"validation every {s.freq} steps on {s.dataset}: {what} of {s.local_batch_size} x {s.seq_len} "
                "tokens per data-parallel rank"
            )

    def should_validate(self, step: int) -> bool:
        return step % self.settings.freq == 0

    # ---- one batch --------------------------------------------------------------------
    def _batch_loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss per token of this rank's share of one batch (every stage of a pipeline
        and every rank of a TP group gets the same value)."""
        pd = self.parallel_dims
        cp = (
            cp_context(
                pd.get_mesh("cp"), self.model_parts, inputs, labels, self.cp_rotate_method, self.cp_load_balance
            )
            if pd.cp_enabled
            else None
        )
        with self.train_context(cp), self.amp_context:
            if self.pp_schedule is not None:
                if _eval_is_forward_only(self.pp_schedule):
                    loss = pipeline_eval(
                        self.pp_schedule, inputs, labels, self.pp_has_first_stage, self.pp_has_last_stage,
                        labels_to_stages=self.chunked_loss,
                    )
                    loss = loss * self.pp_loss_scale
                else:
                    loss = pipeline_forward(self.pp_schedule, inputs, labels, self.loss_fn, self.chunked_loss)
                group = pd.get_mesh("pp").get_group()
                dist.all_reduce(loss, group=group)  # the last stage's loss, on every stage
                return loss
            model = self.model_parts[0]
            if self.chunked_loss:
                with labels_for_loss(model, labels):
                    loss = model(inputs)
            else:
                loss = self.loss_fn(model(inputs), labels)
        return _plain(loss.detach()).float()

    def _all_have(self, have: bool) -> bool:
        """Whether every rank got a batch (steps = -1 ends when the first rank runs out)."""
        if not self._distributed:
            return have
        flag = torch.tensor([1 if have else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    # ---- a validation -----------------------------------------------------------------
    @torch.no_grad()
    def validate(self, step: int) -> float:
        started = time.perf_counter()
        pd, s = self.parallel_dims, self.settings
        for part in self.model_parts:
            part.eval()
        self.dataloader.load_state_dict(copy.deepcopy(self._start))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        batches = 0
        try:
            data = iter(self.dataloader)
            while s.steps == -1 or batches < s.steps:
                batch = next(data, None)
                if not self._all_have(batch is not None):
                    break
                inputs, labels = batch
                inputs = inputs.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                # CP ranks each see 1 / cp of the sequence and average over it.
                n = labels.numel() // (pd.cp if pd.cp_enabled else 1)
                loss_sum += self._batch_loss(inputs, labels).double() * n
                tokens += n
                batches += 1
        finally:
            for part in self.model_parts:
                _reshard(part)
                part.train()
        if batches == 0:
            raise RuntimeError(
                f"validation at step {step}: {s.dataset} gave no batch of {s.local_batch_size} x "
                f"{s.seq_len} tokens on some data-parallel rank; use a larger set or smaller batches"
            )
        # Per token over the data-parallel and CP ranks (TP ranks hold copies, PP shared above).
        totals = torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64, device=self.device)])
        if pd.dp_cp_enabled:
            dist.all_reduce(totals, group=pd.get_mesh("dp_cp").get_group())
        loss = (totals[0] / totals[1]).item()
        perplexity = math.exp(loss) if loss < 700 else math.inf
        seconds = time.perf_counter() - started
        self.last = {"loss": loss, "perplexity": perplexity, "batches": batches, "seconds": seconds}
        if self.log_here:
            self.metrics.log_validation(step, loss=loss, perplexity=perplexity, batches=batches, seconds=seconds)
        return loss


def build_validator(job_config: Any, **kwargs: Any) -> Validator | None:
    """The validator of a run, or None when ``validation.enable`` is off."""
    v = job_config.validation
    if not v.enable:
        return None
    # training.dataset_shards (fixed shards) makes the held-out batches independent of the dp
    # degree too, when the validation global batch splits over them.
    shards = job_config.training.dataset_shards
    dp = kwargs["dp_degree"]
    if shards and (shards % dp or (v.local_batch_size * dp) % shards):
        if kwargs.get("rank", 0) == 0:
            logger.info(
                f"validation: {shards} data shards do not split a held-out batch of {v.local_batch_size} x dp {dp}; "
                "one shard per data-parallel rank"
            )
        shards = 0
    return Validator(v, num_shards=shards, **kwargs)
