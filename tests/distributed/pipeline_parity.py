"""Rank-side code of the pipeline tests: train a small Llama 3 split into pipeline stages
(optionally with FSDP and TP) and compare it with one process on the same global batch.

Every rank builds the same initial weights (seeded, no communication) and loads them into
its stages; the stages are built by the real ``pipeline_llama`` with ``parallelize_llama``.
After a few AdamW steps with clipping, every rank gathers its stages' full parameters and
rank 0 merges all ranks' into one state dict, compares it (and the per-step losses and
gradient norms, and every parameter's gradient after the first step) with the reference,
and reports relative errors; the pytest side judges. The stages use the project's loss, the
reference llama_parity's hand-written cross-entropy.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from harness import layout_scope
from torchtitan.components.loss import cross_entropy_loss as loss_fn  # the code under test
from torchtitan.config import ConfigError, JobConfig
from torchtitan.distributed import utils as dist_utils
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.pipeline import pipeline_step, share_last_stage_loss
from torchtitan.models.llama3 import Transformer, llama3_configs
from torchtitan.models.llama3.parallelize import parallelize_llama
from torchtitan.models.llama3.pipeline import pipeline_llama

from llama_parity import (  # shared parity helpers
    _rel,
    clean_name,
    full_grads,
    full_params,
    grad_rel_err,
    load_full_state,
    reference_loss,
)

STEPS = 3
GLOBAL_BATCH = 8
SEQ_LEN = 16
LR = 2e-3
EPS = 1e-6  # keeps Adam from turning fp32 noise in ~0 gradients into lr-sized steps
MAX_NORM = 0.5  # clipping is active on every step of this model

# The debug flavor shrunk to 8 layers (enough for 8 stages), dim 64, 4 / 2 heads, vocab 128.
ARGS = dataclasses.replace(
    copy.deepcopy(llama3_configs["debugmodel"]),
    dim=64,
    n_layers=8,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=128,
    multiple_of=16,
    max_seq_len=SEQ_LEN,
)


@dataclasses.dataclass
class Layout:
    name: str
    pp: int
    schedule: str = "1F1B"
    dp_shard: int = 1
    tp: int = 1
    csv: str = ""
    microbatch_size: int = 1
    split_points: list[str] = dataclasses.field(default_factory=list)
    layers_per_stage: int | None = None
    reshard: str = "default"
    loss_chunk_size: int = 0  # > 0: the last stage computes the loss itself, in chunks


def initial_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, ARGS.vocab_size, (STEPS, GLOBAL_BATCH, SEQ_LEN + 1), generator=g)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def train_reference(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One process, the whole model on the whole global batch, torch's own clipping."""
    model = Transformer(ARGS)
    model.load_state_dict(state)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, eps=EPS)
    losses, norms, grads = [], [], None
    for inputs, labels in batches():
        opt.zero_grad()
        loss = reference_loss(model(inputs), labels)
        loss.backward()
        grads = full_grads(model) if grads is None else grads
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "params": full_params(model), "grads": grads}


def _job_config(layout: Layout) -> JobConfig:
    jc = JobConfig()
    p = jc.parallelism
    p.pipeline_parallel_degree = layout.pp
    p.data_parallel_shard_degree = layout.dp_shard
    p.tensor_parallel_degree = layout.tp
    p.pipeline_parallel_schedule = layout.schedule
    p.pipeline_parallel_schedule_csv = layout.csv
    p.pipeline_parallel_microbatch_size = layout.microbatch_size
    p.pipeline_parallel_split_points = list(layout.split_points)
    p.pipeline_parallel_layers_per_stage = layout.layers_per_stage
    p.fsdp_reshard_after_forward = layout.reshard
    jc.activation_checkpoint.mode = "none"
    jc.training.mixed_precision_param = "float32"
    jc.training.mixed_precision_reduce = "float32"
    jc.training.local_batch_size = GLOBAL_BATCH // layout.dp_shard
    jc.training.seq_len = SEQ_LEN
    jc.training.loss_chunk_size = layout.loss_chunk_size
    return jc


def _reshard_flags(part: nn.Module) -> list[bool]:
    """Whether each FSDP unit of a stage frees its parameters after forward."""
    from torch.distributed.fsdp import FSDPModule

    flags = []
    for module in part.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                flags.append(group.post_forward_mesh_info is not None)
    return flags


def train_pipeline(layout: Layout, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    pd = ParallelDims(
        dp_replicate=1, dp_shard=layout.dp_shard, cp=1, tp=layout.tp, pp=layout.pp,
        world_size=dist.get_world_size(),
    )
    pd.build_mesh("cpu")
    jc = _job_config(layout)
    with torch.device("meta"):
        model = Transformer(ARGS)
    chunked = layout.loss_chunk_size > 0
    schedule, parts, has_first, has_last = pipeline_llama(
        model, pd, jc, torch.device("cpu"), ARGS, parallelize_llama,
        (lambda loss, labels: loss) if chunked else loss_fn,  # the last stage returns the loss
    )
    for part in parts:
        part.to_empty(device="cpu")
        with torch.no_grad():
            part.init_weights()
        load_full_state(part, state)
    params = [p for part in parts for p in part.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.1, eps=EPS)
    train_context = dist_utils.get_train_context(pd.loss_parallel_enabled, False)
    pp_mesh = pd.get_mesh("pp")
    dp_rank, dp_size = pd.dp_rank_and_size(pd.world_mesh)
    rows = slice(dp_rank * GLOBAL_BATCH // dp_size, (dp_rank + 1) * GLOBAL_BATCH // dp_size)
    losses, norms, grads = [], [], None
    for inputs, labels in batches():
        opt.zero_grad()
        with train_context():
            loss = pipeline_step(schedule, inputs[rows], labels[rows], has_first, has_last, labels_to_stages=chunked)
        loss = share_last_stage_loss(loss, pp_mesh)
        if grads is None:
            grads = _merged([full_grads(part) for part in parts])
        norms.append(dist_utils.clip_grad_norm_(params, MAX_NORM, foreach=True, pp_mesh=pp_mesh).item())
        opt.step()
        losses.append(dist_utils.dist_mean(loss, pd.get_mesh("dp_cp")))
    return {
        "losses": losses,
        "norms": norms,
        "params": _merged([full_params(part) for part in parts]),
        "grads": grads,
        "stage_fqns": [sorted({clean_name(n).rsplit(".weight", 1)[0] for n, _ in part.named_parameters()})
                       for part in parts],
        "reshard_after_forward": [f for part in parts for f in _reshard_flags(part)],
        "schedule_class": type(schedule).__name__,
    }


def _merged(per_part: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every rank's stages' tensors in one dict on rank 0, which compares; ``{}`` elsewhere
    (all ranks call; a gather, not an all-gather: 8 ranks on 2 cores pay for every copy)."""
    mine = {k: v for d in per_part for k, v in d.items()}
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return {k: v for d in gathered for k, v in d.items()} if gathered is not None else {}


def compare(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    common = set(reference["params"]) & set(result["params"])
    return {
        "loss_rel_err": max(abs(a - b) / abs(b) for a, b in zip(result["losses"], reference["losses"])),
        "grad_norm_rel_err": max(abs(a - b) / abs(b) for a, b in zip(result["norms"], reference["norms"])),
        "param_rel_err": max((_rel(result["params"][k], reference["params"][k]) for k in common), default=math.inf),
        "grad_rel_err": grad_rel_err(result, reference),
        "param_names_differ": sorted(set(reference["params"]) ^ set(result["params"])),
        "losses": result["losses"],
        "ref_losses": reference["losses"],
        "schedule_class": result["schedule_class"],
        "reshard_after_forward": result["reshard_after_forward"],
        "stage_fqns": result["stage_fqns"],
    }


def run_layouts(layouts: list[dict[str, Any]]) -> dict[str, Any]:
    """Every layout on every rank; rank 0 returns the comparisons (or the one-line error)."""
    state = initial_state()
    reference = train_reference(state) if dist.get_rank() == 0 else None
    report: dict[str, Any] = {}
    for spec in layouts:
        layout = Layout(**spec)
        started = time.perf_counter()
        with layout_scope(layout.name):
            try:
                result = train_pipeline(layout, state)
            except ConfigError as e:  # a rejected layout is a result, on every rank
                report[layout.name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            if reference is not None:
                report[layout.name] = compare(result, reference)
                report[layout.name]["losses_exact"] = result["losses"]
                report[layout.name]["seconds"] = round(time.perf_counter() - started, 2)  # watches suite time
            dist.barrier()
    return report


# ---- the real Trainer, built in-process ----------------------------------------------------
def run_trainers(configs: dict[str, list[str]], steps: int, reference: str) -> dict[str, Any]:
    """Build and run a Trainer per named list of CLI overrides (without tearing the process
    group down); return each one's losses and, on rank 0, the worst relative parameter error
    against the ``reference`` run (tensors do not travel back: only numbers)."""
    from torchtitan.config import ConfigManager
    from torchtitan.trainer import Trainer

    out: dict[str, Any] = {}
    params: dict[str, dict[str, torch.Tensor]] = {}
    for name, overrides in configs.items():
        with layout_scope(name):
            cfg = ConfigManager().parse_args([*overrides, "--training.steps", str(steps)])
            trainer = Trainer(cfg)
            try:
                losses = trainer.train()
                mine = [full_params(part) for part in trainer.model_parts]
            finally:
                trainer.checkpointer.close()
                trainer.metrics.close()
            params[name] = _merged(mine)
        out[name] = {
            "losses": losses,
            "n_parts": len(trainer.model_parts),
            "part_fqns": [sorted(n for n, _ in part.named_children()) for part in trainer.model_parts],
            "checkpoint_keys": _checkpoint_keys(cfg),
        }
        if dist.get_rank() == 0:
            out[name]["param_names"] = sorted(params[name])
    ref = params[reference]
    for name, mine in params.items():
        out[name]["param_names_differ"] = sorted(set(ref) ^ set(mine))
        out[name]["param_rel_err"] = max((_rel(mine[k], ref[k]) for k in set(ref) & set(mine)), default=math.inf)
    return out


def _checkpoint_keys(cfg) -> dict[int, list[str]]:
    """The model keys of every checkpoint the run left (from DCP's metadata), by step."""
    if not cfg.checkpoint.enable:
        return {}
    import os

    from torch.distributed.checkpoint import FileSystemReader

    folder = os.path.join(cfg.job.dump_folder, cfg.checkpoint.folder)
    keys = {}
    for entry in sorted(os.listdir(folder)):
        if entry.startswith("step-"):
            meta = FileSystemReader(os.path.join(folder, entry)).read_metadata()
            keys[int(entry[5:])] = sorted(k for k in meta.state_dict_metadata if k.startswith("model."))
    return keys


def main(
    layouts: list[dict[str, Any]],
    trainers: dict[str, list[str]] | None = None,
    trainer_steps: int = 3,
    trainer_reference: str = "",
) -> dict[str, Any] | None:
    """The entry point of one launch: every check of one world size."""
    out: dict[str, Any] = {"layouts": run_layouts(layouts)}
    if trainers:
        out["trainers"] = run_trainers(trainers, trainer_steps, trainer_reference)
    return out if dist.get_rank() == 0 else None
