"""Build a run's real layout for any world size in one CPU process, on a fake process group.

For every rank role that differs (each pipeline stage; the last tensor-parallel rank too
when the vocabulary does not split evenly) the dry run goes through the trainer's own build
path with ``init_process_group("fake")`` standing in for the cluster: the trainer's checks
(``validate_layout`` of torchtitan.distributed.layout, the data loader's shard layout),
``ParallelDims.build_mesh``, the model on the meta device, the model converters (float8),
``pipelining_fn`` or ``parallelize_fn``. Whatever the real launch would raise while building,
the dry run raises, with the same type and message. Nothing is materialised: the state bytes
are read off the sharded meta parameters (FSDP's padded shards, DTensor local shards) and
the rest of the step is left to the memory model (``memory.py``).

The build runs as the GPU run would: the device-type check of async TP sees "cuda" and
float8 is checked against the planned GPU's compute capability. Meshes live on the CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from torchtitan.config import JobConfig
from torchtitan.distributed.utils import destroy_process_group
from torchtitan.planner.cost import StepCost, model_flops_per_token, step_cost_for_config
from torchtitan.planner.hardware import GIB, GpuSpec
from torchtitan.planner.layout import Layout, rank_workload
from torchtitan.planner.memory import (
    Geometry,
    MemoryEstimate,
    StateBytes,
    Workload,
    estimate_memory,
    schedule_inflight,
)

__all__ = ["RankPlan", "Plan", "dry_run", "fake_process_group", "measured_states", "role_ranks"]


@dataclass
class RankPlan:
    """One rank role: where it sits in the mesh, what it holds, what it needs."""

    rank: int
    coords: dict[str, int]
    stages: tuple[int, ...]
    stage_layers: tuple[int, ...]
    first: bool
    last: bool
    states: StateBytes
    workload: Workload
    memory: MemoryEstimate


@dataclass
class Plan:
    """The dry run of one config on ``world_size`` GPUs."""

    layout: Layout
    gpu: GpuSpec
    headroom_gib: float
    margin: float  # share of the budget kept free against the memory model's error
    ranks: list[RankPlan]
    cost: StepCost
    nparams: int
    flops_per_token: int
    geometry: Geometry
    warnings: list[str] = field(default_factory=list)

    @property
    def peak_reserved(self) -> int:
        return max(r.memory.peak_reserved for r in self.ranks)

    @property
    def budget(self) -> float:
        """Bytes a rank may reserve: the GPU's memory less the headroom, less the margin."""
        return (self.gpu.memory_gib - self.headroom_gib) * GIB * (1 - self.margin)

    @property
    def fits(self) -> bool:
        return self.peak_reserved <= self.budget


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int) -> Iterator[None]:
    """A process group that pretends to be rank ``rank`` of ``world_size`` (no communication)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the dry run needs a process without a process group; call it before init")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        destroy_process_group()  # and DTensor's caches of this world's meshes


@contextlib.contextmanager
def _as_on_gpu(parallelize_fn) -> Iterator[None]:
    """Let device-type checks in the parallelize code see the GPU run's "cuda", and keep
    async TP's process-wide settings (symmetric memory, an inductor flag) out of this process."""
    import torch.distributed._symmetric_memory as symm

    module = importlib.import_module(getattr(parallelize_fn, "__module__", "") or "builtins")
    saved_type = getattr(module, "device_type", None)
    saved_symm = symm.enable_symm_mem_for_group
    inductor = importlib.import_module("torch._inductor.config")
    saved_flag = inductor._micro_pipeline_tp
    if saved_type is not None:
        module.device_type = "cuda"
    symm.enable_symm_mem_for_group = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if saved_type is not None:
            module.device_type = saved_type
        symm.enable_symm_mem_for_group = saved_symm
        inductor._micro_pipeline_tp = saved_flag


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The builders log a line per step and rank; a dry run of 8 roles would drown the report."""
    log = logging.getLogger("torchtitan")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _fsdp_params(parts: list[nn.Module]) -> tuple[list, set[int]]:
    """FSDP parameter groups in forward order, and the ids of the parameters they manage."""
    from torch.distributed.fsdp import FSDPModule

    groups, seen, managed = [], set(), set()
    for part in parts:
        for module in part.modules():
            if not isinstance(module, FSDPModule):
                continue
            state = module._get_fsdp_state()
            # torch >= 2.13 may keep several groups per state; 2.11 has the one attribute
            found = getattr(state, "_fsdp_param_groups", None)
            for group in found if found is not None else [state._fsdp_param_group]:
                if group is None or id(group) in seen:
                    continue
                seen.add(id(group))
                groups.append(group)
                for fp in group.fsdp_params:
                    managed.add(id(fp.sharded_param))
    return groups, managed


def measured_states(
    parts: list[nn.Module], gather_bytes: int = 2, fused_step: bool = True, ddp: bool = False
) -> StateBytes:
    """State bytes of this rank read off its built (meta) modules: parameters as allocated
    (FSDP's padded shard, else the DTensor local shard), gradients like them (DDP's buckets
    counted apart), AdamW's two moments like the unpadded shard plus a 4-byte step per tensor when
    the optimizer is fused (it then lives on the device). ``gather_bytes`` is the FSDP
    compute dtype's size; torchao's float8 weights gather one byte per element."""
    from torch.distributed.tensor import DTensor

    groups, managed = _fsdp_params(parts)
    params = grads = opt = 0
    units: list[int] = []
    for group in groups:
        gathered = 0
        world = group.mesh_info.shard_mesh_size
        for fp in group.fsdp_params:
            item = fp.sharded_param.element_size()
            padded = fp.padded_sharded_param_size.numel()
            params += padded * item
            grads += padded * item
            opt += 2 * fp.sharded_size.numel() * item
            fp8 = type(fp.sharded_param._local_tensor).__name__ == "WeightWithDynamicFloat8CastTensor"
            gathered += padded * world * (1 if fp8 else gather_bytes)
        units.append(gathered)
    n_tensors = stage = block = output = buckets = 0
    for part in parts:
        for p in part.parameters():
            n_tensors += 1
            stage += _tp_local_numel(p)
            if id(p) not in managed:
                local = p.to_local() if isinstance(p, DTensor) else p
                nbytes = local.numel() * local.element_size()
                params += nbytes
                grads += nbytes
                buckets += nbytes if ddp else 0
                opt += 2 * nbytes
        layers = getattr(part, "layers", None)
        if layers is not None:  # the largest block (dense and MoE blocks differ)
            for layer in layers.values():
                if layer is not None:
                    block = max(block, sum(_tp_local_numel(p) for p in layer.parameters()))
        if getattr(part, "output", None) is not None:
            output = sum(_tp_local_numel(p) for p in part.output.parameters())
    return StateBytes(
        params=params,
        grads=grads,
        optimizer=opt + (4 * n_tensors if fused_step else 0),
        unit_unsharded=units,
        stage_params=stage,
        block_params=block,
        output_params=output,
        buckets=buckets,
    )


def _tp_local_numel(p: torch.Tensor) -> int:
    """Elements of ``p`` on this rank after TP (and EP: routed experts) sharding, before
    FSDP sharding."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return p.numel()
    shape = list(p.shape)
    names = p.device_mesh.mesh_dim_names or ()
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard) and mesh_dim < len(names) and names[mesh_dim] in ("tp", "ep"):
            size = p.device_mesh.size(mesh_dim)
            shape[placement.dim] = -(-shape[placement.dim] // size)
    return math.prod(shape)


def role_ranks(layout: Layout, vocab: int) -> list[int]:
    """One global rank per distinct role: coordinate 0 in every dim but pp, for each pp
    stage; plus the last TP rank of each stage when ``vocab`` does not split over tp."""
    per_stage = layout.world_size // layout.pp
    ranks = []
    for s in range(layout.pp):
        ranks.append(s * per_stage)
        if layout.tp > 1 and vocab % layout.tp:
            ranks.append(s * per_stage + layout.tp - 1)
    return ranks


def _tokenizer(cfg: JobConfig, warnings: list[str]):
    """The run's tokenizer when its file is here; a fixed-vocabulary flavor plans without it
    (the file is often only on the training machines), other flavors fail as the run would."""
    from torchtitan.components.tokenizer import build_tokenizer
    from torchtitan.models import get_model_args

    path = cfg.model.tokenizer_path
    if os.path.exists(path) or get_model_args(cfg.model.name, cfg.model.flavor).vocab_size <= 0:
        return build_tokenizer(path)
    warnings.append(
        f"model.tokenizer_path {path} does not exist here; the run stops there unless the file "
        "exists on the training machines (planned with the flavor's vocabulary)"
    )
    return None


def _stage_ids(pd, cfg: JobConfig, n_layers: int) -> tuple[int, ...]:
    """The stage ids of this pp rank, as the pipelining function placed them."""
    from torchtitan.distributed import pipeline as pp_lib

    if not pd.pp_enabled:
        return (0,)
    p = cfg.parallelism
    layout = pp_lib.stage_layout_from_config(p, n_layers=n_layers, pp=pd.pp)
    return layout.rank_stages[pd.get_mesh("pp").get_local_rank()]


def _build_rank(cfg: JobConfig, layout: Layout, rank: int, gpu: GpuSpec, tokenizer) -> tuple[RankPlan, Geometry]:
    """The trainer's build steps, up to the optimizer, as rank ``rank`` (see module docstring)."""
    from torchtitan.components.data.loader import ShardLayout
    from torchtitan.components.float8 import _import_torchao, build_model_converters, check_float8_device
    from torchtitan.distributed.layout import validate_layout
    from torchtitan.models import check_model_config, get_model_args, get_model_spec

    t = cfg.training
    with fake_process_group(rank, layout.world_size), _quiet():
        check = validate_layout(cfg, layout.world_size)
        check_model_config(cfg)
        pd = check.parallel_dims
        mesh = pd.build_mesh("cpu")
        dp_rank, dp_degree = pd.dp_rank_and_size(mesh)
        ShardLayout.create(  # what build_dataloader checks first
            num_shards=t.dataset_shards,
            dp_rank=dp_rank,
            dp_world_size=dp_degree,
            local_batch_size=t.local_batch_size,
            global_batch_size=check.global_batch,
        )
        spec = get_model_spec(cfg.model.name)
        args = get_model_args(cfg.model.name, cfg.model.flavor)
        args.update_from_config(cfg, tokenizer)
        with torch.device("meta"):
            model = spec.model_cls(args)
        n_layers = len(model.layers)
        if "float8" in cfg.model.converters:  # what Float8Converter checks on the GPU
            _import_torchao()
            check_float8_device(cfg.float8.emulate, "cuda", gpu.capability)
        build_model_converters(cfg, pd).convert(model)
        with _as_on_gpu(spec.parallelize_fn):
            if pd.pp_enabled:
                schedule, parts, first, last = spec.pipelining_fn(
                    model, pd, cfg, torch.device("cpu"), args, spec.parallelize_fn, lambda pred, labels: pred
                )
            else:
                schedule, parts, first, last = None, [spec.parallelize_fn(model, pd, cfg)], True, True
        coords = {name: mesh.get_local_rank(name) for name in mesh.mesh_dim_names}
        states = measured_states(
            parts,
            gather_bytes=2 if t.mixed_precision_param == "bfloat16" else 4,
            fused_step=cfg.optimizer.implementation == "fused",
            ddp=not pd.fsdp_enabled and pd.dp_replicate_enabled,
        )
        stages = _stage_ids(pd, cfg, n_layers)
        stage_layers = tuple(len(part.layers) for part in parts)
    geometry = Geometry.from_model_args(args)
    # the blocks keep their global layer ids as names: the MoE ones of each stage
    stage_moe = tuple(sum(geometry.is_moe_layer(int(i)) for i in part.layers.keys()) for part in parts)
    inflight = schedule_inflight(schedule, coords["pp"]) if schedule is not None else None
    workload = rank_workload(
        cfg, layout, coords["pp"], stage_layers, first, last, inflight=inflight, stage_moe_layers=stage_moe
    )
    plan = RankPlan(
        rank=rank,
        coords=coords,
        stages=tuple(stages),
        stage_layers=stage_layers,
        first=first,
        last=last,
        states=states,
        workload=workload,
        memory=estimate_memory(geometry, workload, states),
    )
    return plan, geometry


# The worst measured shortfall of the memory model on GPUs outside FSDP-only layouts: CP 2 at
# 65,536 tokens (-21%) and TP 2 (-14%), 2026-12-01 (docs/planning.md).
TP_CP_MARGIN = 0.2


def dry_run(cfg: JobConfig, world_size: int, gpu: GpuSpec, headroom_gib: float = 2.0, margin: float = 0.05) -> Plan:
    """Build ``cfg`` for ``world_size`` ranks, one role at a time, and predict each role's
    memory and the step time. Raises what the real launch would raise while building."""
    if cfg.experimental.custom_import:
        importlib.import_module(cfg.experimental.custom_import)
    layout = Layout.from_config(cfg, world_size)
    warnings: list[str] = []
    tokenizer = _tokenizer(cfg, warnings)
    vocab = tokenizer.vocab_size if tokenizer is not None else 0
    ranks, geometry = [], None
    for rank in role_ranks(layout, vocab or _flavor_vocab(cfg)):
        plan, geometry = _build_rank(cfg, layout, rank, gpu, tokenizer)
        ranks.append(plan)
    assert geometry is not None
    cost = step_cost_for_config(cfg, geometry, layout, gpu, stages_per_rank=len(ranks[0].stages),
                                offload_bytes=max(r.memory.offloaded for r in ranks))
    if (layout.tp > 1 or layout.cp > 1) and margin < TP_CP_MARGIN:
        warnings.append(
            "on GPUs, TP and CP layouts have measured 14-21% above this memory model (docs/planning.md); "
            f"this verdict uses --margin {margin:g}, --margin {TP_CP_MARGIN:g} covers that"
        )
    return Plan(
        layout=layout,
        gpu=gpu,
        headroom_gib=headroom_gib,
        margin=margin,
        ranks=ranks,
        cost=cost,
        nparams=geometry.nparams,
        flops_per_token=int(model_flops_per_token(geometry, layout.seq)),
        geometry=geometry,
        warnings=warnings,
    )


def _flavor_vocab(cfg: JobConfig) -> int:
    from torchtitan.models import get_model_args

    return max(get_model_args(cfg.model.name, cfg.model.flavor).vocab_size, 1)
