"""Enumerate the legal layouts for a model, world size, GPU and sequence length; rank them.

A candidate is a ``Layout`` (dp_replicate, dp_shard, cp, tp, pp with its schedule and
microbatches, AC mode, local batch and gradient accumulation) that reaches the target global
batch. It is legal when the trainer's own checks accept it: ``JobConfig.validate``,
``validate_layout`` (degrees, CP shape and batch arithmetic),
the data loader's shard layout, ``check_tp_divisibility`` on a one-layer model of the
flavor, and for PP ``resolve_stage_layout``, ``num_microbatches``, ``validate_microbatches``
and ``check_reshard_policy``; the float8 converter's checks when float8 is on. Legal candidates
get the analytical memory model for every pipeline rank (those predicted not to fit are
dropped) and the cost model; the best are then built for real by the dry run, which catches
anything that only shows when the model is parallelized.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

import torch

from torchtitan.config import ConfigError, JobConfig
from torchtitan.planner.cost import StepCost, step_cost_for_config
from torchtitan.planner.hardware import GIB, GpuSpec
from torchtitan.planner.layout import Layout, rank_workload
from torchtitan.planner.memory import Geometry, MemoryEstimate, analytical_states, estimate_memory

__all__ = ["Candidate", "SearchResult", "SearchSpace", "evaluate", "search"]

AC_CHOICES = {
    "none": ("none", "op"), "op": ("selective", "op"), "op_all": ("selective", "op_all"),
    "op_attn": ("selective", "op_attn"), "2": ("selective", "2"), "full": ("full", "op"),
}


@dataclass(frozen=True)
class SearchSpace:
    """Which values of each knob the search tries."""

    tp: tuple[int, ...] = (1, 2, 4, 8)
    cp: tuple[int, ...] = (1, 2, 4, 8)
    pp: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    # zero-bubble schedules are opt-in: their bubble is an assumption, not yet measured here
    schedules: tuple[str, ...] = ("1F1B", "Interleaved1F1B")
    ac: tuple[str, ...] = ("none", "op_all", "op", "op_attn", "2", "full")
    max_local_batch: int = 32
    max_replicate: int = 0  # 0: any dp_replicate that divides the world
    ep: tuple[int, ...] = ()  # expert-parallel degrees (MoE models); (): every legal one


@dataclass
class Candidate:
    """A legal layout with its predicted worst-rank memory and step cost."""

    layout: Layout
    memory: MemoryEstimate  # of the pipeline rank with the largest reserved peak
    cost: StepCost
    fits: bool
    verified: str = ""  # "" not built; "ok"; or the error the dry run raised


@dataclass
class SearchResult:
    ranked: list[Candidate]  # fitting candidates, fastest first
    considered: int
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one full message
    too_big: int = 0
    configured: Candidate | None = None
    configured_error: str = ""
    global_batch: int = 0


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _reason(err: Exception) -> str:
    """A short key grouping similar rejections (the message without its numbers)."""
    text = str(err).splitlines()[0]
    words = [w for w in text.split() if not any(c.isdigit() for c in w)]
    return " ".join(words[:8])


def model_geometry(cfg: JobConfig, tokenizer_vocab: int = 0) -> Geometry:
    """The shape of ``cfg``'s model; a flavor that takes its vocabulary from the tokenizer
    gets ``tokenizer_vocab``, read from ``model.tokenizer_path`` when 0."""
    from torchtitan.models import get_model_args

    args = get_model_args(cfg.model.name, cfg.model.flavor)
    if args.vocab_size <= 0:
        if not tokenizer_vocab:
            from torchtitan.components.tokenizer import build_tokenizer

            tokenizer_vocab = int(build_tokenizer(cfg.model.tokenizer_path).vocab_size)
        args.vocab_size = tokenizer_vocab
    return Geometry.from_model_args(args)


def tiny_model(cfg: JobConfig, tokenizer_vocab: int):
    """A one-layer meta model of the flavor, for the real TP divisibility check."""
    from torchtitan.models import get_model_args, get_model_spec

    args = get_model_args(cfg.model.name, cfg.model.flavor)
    args.n_layers = 1
    if args.vocab_size <= 0:
        args.vocab_size = tokenizer_vocab
    with torch.device("meta"):
        return get_model_spec(cfg.model.name).model_cls(args)


def check_legal(cfg: JobConfig, lay: Layout, tiny) -> tuple[JobConfig, object]:
    """Run the trainer's checks on ``lay``; return the candidate config and its stage layout
    (None without PP). Raises the error the trainer would raise."""
    from torchtitan.components.data.loader import ShardLayout
    from torchtitan.distributed import pipeline as pp_lib
    from torchtitan.distributed.layout import validate_layout
    from torchtitan.distributed.tensor_parallel import check_tp_divisibility
    from torchtitan.models import check_model_config

    cand = lay.apply(cfg)
    cand.validate()
    check = validate_layout(cand, lay.world_size)
    check_model_config(cand)
    pd = check.parallel_dims
    t = cand.training
    ShardLayout.create(  # what the data loader checks first
        num_shards=t.dataset_shards, dp_rank=0, dp_world_size=pd.dp_degree,
        local_batch_size=t.local_batch_size, global_batch_size=check.global_batch,
    )
    if pd.tp_enabled:
        check_tp_divisibility(tiny, pd.tp)
    if "float8" in cand.model.converters:
        from torchtitan.components.float8 import build_model_converters

        build_model_converters(cand, pd)
    p = cand.parallelism
    if not pd.pp_enabled:
        return cand, None
    stages = pp_lib.stage_layout_from_config(p, n_layers=_n_layers(cand), pp=pd.pp)
    n_mb = pp_lib.num_microbatches(
        cand.training.local_batch_size, p.pipeline_parallel_microbatch_size, p.pipeline_parallel_microbatches
    )
    if not p.pipeline_parallel_schedule_csv:
        pp_lib.validate_microbatches(p.pipeline_parallel_schedule, n_mb, stages.num_stages, pd.pp)
    if pd.fsdp_enabled:
        pp_lib.check_reshard_policy(
            p.pipeline_parallel_schedule, p.fsdp_reshard_after_forward, p.pipeline_parallel_schedule_csv
        )
    return cand, stages


def _n_layers(cfg: JobConfig) -> int:
    from torchtitan.models import get_model_args

    return get_model_args(cfg.model.name, cfg.model.flavor).n_layers


_states = functools.lru_cache(maxsize=4096)(analytical_states)  # many candidates share ranks


def evaluate(
    cfg: JobConfig, lay: Layout, stages, g: Geometry, gpu: GpuSpec, headroom_gib: float, margin: float = 0.05
) -> Candidate:
    """Analytical memory of every pipeline rank (the worst one kept) and the step cost."""
    t, f8 = cfg.training, "float8" in cfg.model.converters
    fsdp_degree = lay.dp_shard * lay.cp
    worst = None
    for pp_rank in range(lay.pp):
        ids = stages.rank_stages[pp_rank] if stages is not None else (0,)
        ranges = [stages.layers_of(s) for s in ids] if stages is not None else [range(g.n_layers)]
        layers = tuple(len(r) for r in ranges)
        moe_layers = tuple(sum(g.is_moe_layer(i) for i in r) for r in ranges)
        first = 0 in ids
        last = (stages.num_stages - 1 if stages is not None else 0) in ids
        states = _states(
            g,
            tp=lay.tp,
            fsdp_degree=fsdp_degree,
            stage_layers=sum(layers),
            first=first,
            last=last,
            float8_all_gather=f8 and cfg.float8.enable_fsdp_float8_all_gather and fsdp_degree > 1,
            gather_bytes=2 if t.mixed_precision_param == "bfloat16" else 4,
            fused_step=cfg.optimizer.implementation == "fused",
            ddp=fsdp_degree == 1 and lay.dp_replicate > 1,
            ep=lay.ep,
            moe_layers=sum(moe_layers),
            cpu_offload=t.enable_cpu_offload,
        )
        workload = rank_workload(cfg, lay, pp_rank, layers, first, last, stage_moe_layers=moe_layers)
        mem = estimate_memory(g, workload, states)
        if worst is None or mem.peak_reserved > worst.peak_reserved:
            worst = mem
    assert worst is not None
    cost = step_cost_for_config(
        cfg, g, lay, gpu, stages_per_rank=len(stages.rank_stages[0]) if stages is not None else 1,
        offload_bytes=worst.offloaded,
    )
    budget = (gpu.memory_gib - headroom_gib) * GIB * (1 - margin)
    return Candidate(lay, worst, cost, worst.peak_reserved <= budget)


def _ep_degrees(g: Geometry, dp_shard_cp: int, tp: int, space: SearchSpace) -> list[int]:
    """Expert-parallel degrees to try: 1 for a dense model; for an MoE model each degree of
    ``space.ep`` (all when empty) that divides the experts and dp_shard x cp and is >= tp
    (the trainer's rules; validate_layout checks them again)."""
    if not g.moe:
        return [1]
    out = [1] if tp == 1 else []
    for ep in space.ep or _divisors(dp_shard_cp):
        if ep > 1 and g.num_experts % ep == 0 and dp_shard_cp % ep == 0 and ep >= tp:
            out.append(ep)
    return out


def _layouts(world: int, seq: int, global_batch: int, cfg: JobConfig, space: SearchSpace, node: int,
             g: Geometry | None = None):
    """Every combination of the search space whose degrees multiply to ``world`` and whose
    batch reaches ``global_batch`` exactly; HSDP only with shard groups of whole nodes; for
    an MoE model every legal expert-parallel degree."""
    for tp in space.tp:
        for cp in space.cp:
            for pp in space.pp:
                if world % (tp * cp * pp):
                    continue
                dp = world // (tp * cp * pp)
                if global_batch % dp:
                    continue
                per_dp = global_batch // dp
                for rep in _divisors(dp):
                    # HSDP: replicas of a shard group that fills whole nodes (else plain FSDP)
                    group = dp // rep * cp * tp
                    if rep > 1 and (group % node or (space.max_replicate and rep > space.max_replicate)):
                        continue
                    eps = _ep_degrees(g, dp // rep * cp, tp, space) if g is not None else [1]
                    batches = [lb for lb in _divisors(per_dp) if lb <= space.max_local_batch]
                    for ep, lb in ((ep, lb) for ep in eps for lb in batches):
                        for ac in space.ac:
                            mode, option = AC_CHOICES[ac]
                            for sched in space.schedules if pp > 1 else (cfg.parallelism.pipeline_parallel_schedule,):
                                yield Layout(
                                    world_size=world, dp_replicate=rep, dp_shard=dp // rep, cp=cp, tp=tp,
                                    pp=pp, local_batch=lb, grad_accum=per_dp // lb, seq=seq,
                                    ac_mode=mode, ac_option=option, schedule=sched, ep=ep,
                                )


def search(
    cfg: JobConfig,
    world_size: int,
    gpu: GpuSpec,
    *,
    global_batch: int = 0,
    headroom_gib: float = 2.0,
    margin: float = 0.05,
    space: SearchSpace = SearchSpace(),
    tokenizer_vocab: int = 0,
) -> SearchResult:
    """Rank the legal layouts of ``cfg``'s model on ``world_size`` GPUs (see module doc).

    ``global_batch`` 0 keeps the configured one (local batch x dp x accumulation of the
    config's own layout), so every candidate trains the same number of samples per step.
    ``tokenizer_vocab`` is read from ``model.tokenizer_path`` when the flavor needs it and 0.
    """
    g = model_geometry(cfg, tokenizer_vocab)
    if "float8" in cfg.model.converters:  # every candidate runs on the planned GPU
        from torchtitan.components.float8 import _import_torchao, check_float8_device

        _import_torchao()
        check_float8_device(cfg.float8.emulate, "cuda", gpu.capability)
    tiny = tiny_model(cfg, g.vocab)
    result = SearchResult(ranked=[], considered=0)
    try:
        configured = Layout.from_config(cfg, world_size)
        cand, stages = check_legal(cfg, configured, tiny)
        result.configured = evaluate(cand, configured, stages, g, gpu, headroom_gib, margin)
        target = global_batch or configured.global_batch
    except (ConfigError, ValueError) as e:
        result.configured_error = str(e).splitlines()[0]
        target = global_batch or cfg.training.global_batch_size
        if target <= 0:
            raise ConfigError(
                f"the configured layout is not legal on {world_size} GPUs ({result.configured_error}); "
                "give the target with --global_batch"
            ) from None
    result.global_batch = target
    seq = cfg.training.seq_len
    for lay in _layouts(world_size, seq, target, cfg, space, gpu.gpus_per_node, g):
        result.considered += 1
        try:
            cand, stages = check_legal(cfg, lay, tiny)
        except (ConfigError, ValueError) as e:
            key = _reason(e)
            result.rejected[key] += 1
            result.examples.setdefault(key, str(e).splitlines()[0])
            continue
        c = evaluate(cand, lay, stages, g, gpu, headroom_gib, margin)
        if c.fits:
            result.ranked.append(c)
        else:
            result.too_big += 1
    result.ranked.sort(key=lambda c: (-c.cost.tokens_per_s_per_gpu, c.memory.peak_reserved))
    return result


def verify(
    cfg: JobConfig, result: SearchResult, gpu: GpuSpec, top: int, headroom_gib: float = 2.0, margin: float = 0.05
) -> list[Candidate]:
    """Build the best candidates for real with the dry run until ``top`` pass (at most
    3 x top tries); a candidate the dry run refuses keeps the error in ``verified``."""
    from torchtitan.planner.dry_run import dry_run

    passed: list[Candidate] = []
    for c in result.ranked[: 3 * top]:
        try:
            plan = dry_run(c.layout.apply(cfg), c.layout.world_size, gpu, headroom_gib, margin)
        except (ConfigError, ValueError, RuntimeError) as e:
            c.verified = str(e).splitlines()[0]
            continue
        c.verified = "ok" if plan.fits else f"built, but the exact states give {plan.peak_reserved / GIB:.1f} GiB"
        if plan.fits:
            passed.append(c)
        if len(passed) == top:
            break
    return passed

