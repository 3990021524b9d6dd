"""A layout: the parallel degrees, pipeline schedule, batch shape and AC mode of one run.

The planner reasons about layouts; the trainer reads JobConfigs. ``Layout.from_config``
reads the layout a config describes (resolving ``data_parallel_shard_degree = -1`` and the
batch arithmetic through the trainer's own ``validate_layout``), ``Layout.apply`` writes a
layout into a copy of a config, and ``Layout.overrides`` gives the command-line options that
make the trainer run it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torchtitan.config import JobConfig
from torchtitan.planner.memory import OP_AC_OPTIONS, OP_AC_SAVED_MATMULS

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    """One way to run a model on ``world_size`` GPUs."""

    world_size: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    local_batch: int
    grad_accum: int
    seq: int
    ac_mode: str
    ac_option: str
    schedule: str = "1F1B"
    microbatch_size: int = 1
    microbatches: int | None = None
    ep: int = 1  # expert parallel: borrowed from dp_shard x cp (no GPUs of its own)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def global_batch(self) -> int:
        return self.local_batch * self.dp * self.grad_accum

    @property
    def n_microbatches(self) -> int:
        if self.pp == 1:
            return 1
        return self.microbatches or self.local_batch // self.microbatch_size

    @property
    def forward_tokens(self) -> float:
        """Tokens of one forward on one rank (a microbatch, its share of the sequence)."""
        return self.local_batch // self.n_microbatches * self.seq / self.cp

    @classmethod
    def from_config(cls, cfg: JobConfig, world_size: int) -> Layout:
        from torchtitan.distributed.layout import validate_layout
        from torchtitan.models import check_model_config

        check = validate_layout(cfg, world_size)
        check_model_config(cfg)
        pd, p, t = check.parallel_dims, cfg.parallelism, cfg.training
        return cls(
            world_size=world_size,
            dp_replicate=pd.dp_replicate,
            dp_shard=pd.dp_shard,
            cp=pd.cp,
            tp=pd.tp,
            pp=pd.pp,
            local_batch=t.local_batch_size,
            grad_accum=check.grad_accumulation_steps,
            seq=t.seq_len,
            ac_mode=cfg.activation_checkpoint.mode,
            ac_option=_ac_option(cfg),
            schedule=p.pipeline_parallel_schedule,
            microbatch_size=p.pipeline_parallel_microbatch_size,
            microbatches=p.pipeline_parallel_microbatches,
            ep=getattr(pd, "ep", 1),
        )

    def apply(self, cfg: JobConfig) -> JobConfig:
        """A copy of ``cfg`` running this layout (split points and layers per stage are
        cleared: the search places layers evenly)."""
        out = copy.copy(cfg)  # only three sections change: copy those (a search makes thousands)
        out.parallelism = p = copy.copy(cfg.parallelism)
        out.training = t = copy.copy(cfg.training)
        out.activation_checkpoint = copy.copy(cfg.activation_checkpoint)
        p.pipeline_parallel_split_points = list(p.pipeline_parallel_split_points)
        p.data_parallel_replicate_degree = self.dp_replicate
        p.data_parallel_shard_degree = self.dp_shard
        p.context_parallel_degree = self.cp
        p.tensor_parallel_degree = self.tp
        p.pipeline_parallel_degree = self.pp
        p.pipeline_parallel_schedule = self.schedule
        p.pipeline_parallel_microbatch_size = self.microbatch_size
        p.pipeline_parallel_microbatches = self.microbatches
        p.expert_parallel_degree = self.ep
        if self.pp != cfg.parallelism.pipeline_parallel_degree:
            p.pipeline_parallel_split_points = []
            p.pipeline_parallel_layers_per_stage = None
            p.pipeline_parallel_schedule_csv = ""
        t.local_batch_size = self.local_batch
        t.global_batch_size = self.global_batch
        t.seq_len = self.seq
        ac = out.activation_checkpoint
        ac.mode = self.ac_mode
        ac.selective_ac_option, ac.op_saved_matmuls = self._ac_settings
        if not self._op_ac:
            ac.op_ac_layers, ac.later_layers = -1, "full"  # only meaningful with op AC
        return out

    @property
    def _ac_settings(self) -> tuple[str, str]:
        """(selective_ac_option, op_saved_matmuls) spelling this layout's AC option."""
        if self.ac_option in OP_AC_OPTIONS:
            return "op", OP_AC_SAVED_MATMULS[self.ac_option]
        return self.ac_option, "every_other"

    @property
    def _op_ac(self) -> bool:
        return self.ac_mode == "selective" and self.ac_option in OP_AC_OPTIONS

    def overrides(self) -> list[str]:
        """Trainer options (``--section.key value``) that select this layout."""
        args = [
            "--parallelism.data_parallel_replicate_degree", str(self.dp_replicate),
            "--parallelism.data_parallel_shard_degree", str(self.dp_shard),
            "--parallelism.tensor_parallel_degree", str(self.tp),
            "--parallelism.context_parallel_degree", str(self.cp),
            "--parallelism.pipeline_parallel_degree", str(self.pp),
            "--training.local_batch_size", str(self.local_batch),
            "--training.global_batch_size", str(self.global_batch),
            "--training.seq_len", str(self.seq),
            "--activation_checkpoint.mode", self.ac_mode,
            "--activation_checkpoint.selective_ac_option", self._ac_settings[0],
            "--activation_checkpoint.op_saved_matmuls", self._ac_settings[1],
        ]
        if self.ep > 1:
            args += ["--parallelism.expert_parallel_degree", str(self.ep)]
        if not self._op_ac:
            args += ["--activation_checkpoint.op_ac_layers", "-1", "--activation_checkpoint.later_layers", "full"]
        if self.pp > 1:
            args += [
                "--parallelism.pipeline_parallel_schedule", self.schedule,
                "--parallelism.pipeline_parallel_microbatch_size", str(self.microbatch_size),
            ]
        return args

    def label(self) -> str:
        """Short description, e.g. ``FSDP 8 x TP 8 x PP 8 (Interleaved1F1B, 16 mb) | AC full | lb 16``."""
        parts = []
        if self.dp_replicate > 1:
            parts.append(f"{'HSDP' if self.dp_shard > 1 else 'DDP'} {self.dp_replicate}")
        if self.dp_shard > 1:
            parts.append(f"FSDP {self.dp_shard}")
        for name, value in (("CP", self.cp), ("TP", self.tp), ("PP", self.pp), ("EP", self.ep)):
            if value > 1:
                parts.append(f"{name} {value}")
        text = " x ".join(parts) or "1 GPU"
        if self.pp > 1:
            text += f" ({self.schedule}, {self.n_microbatches} mb)"
        ac = self.ac_mode if self.ac_mode != "selective" else f"sel {self.ac_option}"
        accum = f" x{self.grad_accum} acc" if self.grad_accum > 1 else ""
        return f"{text} | AC {ac} | lb {self.local_batch}{accum}"


def _ac_option(cfg: JobConfig) -> str:
    """The planner's one-word AC option: one of OP_AC_OPTIONS or N (every N-th block).
    It only matters for selective AC; one spelling otherwise keeps layouts comparable."""
    ac = cfg.activation_checkpoint
    if ac.mode != "selective":
        return "op"
    if ac.selective_ac_option == "op":
        return {v: k for k, v in OP_AC_SAVED_MATMULS.items()}[ac.op_saved_matmuls]
    return ac.selective_ac_option


def rank_workload(
    cfg: JobConfig,
    layout: Layout,
    pp_rank: int,
    stage_layers: tuple[int, ...],
    first: bool,
    last: bool,
    gpu_path: bool = True,
    inflight: int | None = None,
    stage_moe_layers: tuple[int, ...] = (),
):
    """The memory model's view of one rank running ``layout`` with ``cfg``'s other settings.

    ``gpu_path=False`` describes this CPU instead (keys/values repeated before SDPA, rms_norm
    decomposed): what the tests measure against. ``inflight`` overrides the schedule formula
    with a count read off a built schedule.
    """
    from torchtitan.planner.memory import Workload, inflight_chunks

    t, p = cfg.training, cfg.parallelism
    bf16 = t.mixed_precision_param == "bfloat16"
    # CPU offload needs FSDP: on one data rank the trainer shards over a mesh of one
    fsdp = layout.dp_shard > 1 or layout.cp > 1 or (t.enable_cpu_offload and layout.dp_replicate == 1)
    autocast = bf16 and not fsdp
    compile_on = cfg.compile.enable
    n_mb = layout.n_microbatches
    return Workload(
        tp=layout.tp,
        cp=layout.cp,
        stage_layers=tuple(stage_layers),
        first=first,
        last=last,
        microbatch=layout.local_batch // n_mb,
        seq=layout.seq,
        inflight=inflight or inflight_chunks(layout.schedule, layout.pp, pp_rank, n_mb, len(stage_layers)),
        grad_accum=layout.grad_accum,
        ac_mode=layout.ac_mode,
        ac_option=layout.ac_option,
        op_layers=cfg.activation_checkpoint.op_ac_layers,
        later_layers={"attention": "op_attn"}.get(cfg.activation_checkpoint.later_layers,
                                                  cfg.activation_checkpoint.later_layers),
        compile_model=compile_on and "model" in cfg.compile.components,
        compile_loss=compile_on and "loss" in cfg.compile.components,
        compute_bytes=2 if bf16 else 4,
        residual_bytes=2 if (bf16 and fsdp) else 4,
        autocast=autocast,
        loss_parallel=not p.disable_loss_parallel,
        loss_chunk=t.loss_chunk_size,
        fsdp=fsdp,
        ddp=not fsdp and layout.dp_replicate > 1,
        pp=layout.pp > 1,
        reshard=p.fsdp_reshard_after_forward,
        reduce_bytes=4 if t.mixed_precision_reduce == "float32" else 2,
        cpu_offload=t.enable_cpu_offload,
        offload_layers=cfg.activation_checkpoint.cpu_offload_layers,
        repeat_kv=layout.cp > 1 or not gpu_path,
        composite_rmsnorm=not gpu_path,
        pad_values=not gpu_path,
        ep=layout.ep,
        group_align=16 // (2 if bf16 else 4) if gpu_path else 1,
        stage_moe_layers=tuple(stage_moe_layers),
    )
