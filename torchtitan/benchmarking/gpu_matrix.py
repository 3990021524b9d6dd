"""The 3D/4D integration matrix (issue #13): every layout of one world size trains the same
few steps from the same weights on the same data, and must give the losses of the FSDP-only
baseline of that world size.

    python scripts/run_gpu_matrix.py --list                        # 8 GPUs: layouts and commands
    python scripts/run_gpu_matrix.py --output matrix.md            # 8 GPUs, debug model
    python scripts/run_gpu_matrix.py --flavor 8B --output m8b.md   # 8 GPUs, Llama 3 8B shapes
    python scripts/run_gpu_matrix.py --world_size 4 --device cpu   # 4 CPU processes (gloo)
    python scripts/run_gpu_matrix.py --world_size 8 --device cpu --only fsdp4_tp2

How: one process writes a seed checkpoint (``checkpoint.create_seed_checkpoint``); every
layout loads it (``checkpoint.initial_load_path``), so all start from identical weights.
``training.dataset_shards = global_batch_size`` gives every layout the same global batch at
any data-parallel degree (docs/datasets.md); ``training.deterministic`` and one seed. Each
layout is launched through ``run_train.sh`` (torchrun) by the benchmark harness's launcher
(``benchmarking.launch``), with its per-layout timeout (a hang becomes a "timed out" row)
and its JSONL metrics sink; the per-step losses come from those records and are compared
with ``benchmarking.loss_compare``'s rule (|a - b| <= rtol * |baseline|). The checkpoint
rows resume the baseline's step-k
checkpoint under another layout and must reproduce the baseline's later steps.

Statuses: passed; loss mismatch; failed (exit code and the worker's last error line);
timed out; refused by the trainer (its own layout checks, run before launching); skipped
(needs more ranks than --world_size); gpu only (compile / Float8 / async TP variants, and any
layout the trainer cannot run on a CPU, in --device cpu). Exit code: 0 when every selected
layout that can run here passed, 1 otherwise, 2 for a bad option, 130 when interrupted.

This module holds the matrix itself (the layouts, the settings shared by every run, each
layout's plan); ``gpu_matrix_run`` runs and compares one plan; ``gpu_matrix_cli`` is the
command line (``scripts/run_gpu_matrix.py``) and its reports.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchtitan.benchmarking.launch import Launch, build_launch
from torchtitan.benchmarking.sweep import Entry, SweepError, parallel_layout, parse_job, repo_relative

CONFIG_FILE = "train_configs/debug_model.toml"
SEED = 42
# Per-step loss tolerance, relative to the baseline's loss (see docs/gpu_matrix.md):
# CPU, fp32: layouts differ only in fp32 summation order (measured ~1e-6 or less).
# GPU, bf16: one bf16 rounding is 2**-8 = 3.9e-3 relative; layouts round partial sums in
# different places (TP row-wise outputs, reduce order), which averages out over a batch's
# tokens but compounds over steps; the 2-GPU bf16 parity test holds 2e-3 on a small model
# over 5 steps. Float8 (e4m3, 3 mantissa bits) against bf16: 2e-2. Not yet measured on GPUs.
TOLERANCE = {"cpu": 1e-5, "gpu": 5e-3}
FLOAT8_VS_BF16_TOLERANCE = 2e-2
DEFAULTS = {  # --device: steps, seq_len, per-layout timeout (s)
    "cpu": dict(steps=6, seq_len=64, timeout=900),
    "gpu": dict(steps=6, seq_len=2048, timeout=1200),
}
GLOBAL_BATCH = 8  # samples per step in every layout; = training.dataset_shards
LR_WARMUP = 2


class MatrixError(ValueError):
    """A bad option: one line, exit code 2."""


# ---- the layouts ------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    name: str
    world: int
    dp_shard: int = 1
    dp_replicate: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    schedule: str = "1F1B"
    compile: bool = False
    float8: bool = False
    async_tp: bool = False
    baseline: str | None = None  # compared with this layout; None = the world size's baseline
    resume_from: str | None = None  # resume this layout's step-k checkpoint, compare the rest
    float8_vs_bf16: bool = False  # the float8 tolerance applies (a float8 run vs a bf16 baseline)

    @property
    def dp(self) -> int:
        return self.dp_shard * self.dp_replicate

    @property
    def variant(self) -> bool:
        """Compile / Float8 / async TP: GPU mode only (CPU numerics of these say nothing)."""
        return self.compile or self.float8 or self.async_tp

    @property
    def degrees(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def options(self) -> list[str]:
        """The layout's own trainer options: every degree explicit, then the variants."""
        p = "--parallelism."
        args = [
            f"{p}data_parallel_replicate_degree", str(self.dp_replicate),
            f"{p}data_parallel_shard_degree", str(self.dp_shard),
            f"{p}tensor_parallel_degree", str(self.tp),
            f"{p}pipeline_parallel_degree", str(self.pp),
            f"{p}context_parallel_degree", str(self.cp),
        ]
        if self.pp > 1:
            args += [f"{p}pipeline_parallel_schedule", self.schedule]
        if self.compile:
            args += ["--compile.enable"]
        if self.float8:
            args += ["--model.converters", "float8"]
            if self.dp_shard > 1:
                args += ["--float8.enable_fsdp_float8_all_gather",
                         "--float8.precompute_float8_dynamic_scale_for_fsdp"]
        if self.async_tp:
            args += [f"{p}enable_async_tensor_parallel"]
        return args

    def describe(self) -> str:
        parts = [w for w, on in (("compile", self.compile), ("Float8", self.float8),
                                 ("async TP", self.async_tp)) if on]
        return " + ".join(parts)


ALL_ON = dict(compile=True, float8=True, async_tp=True)
LAYOUTS: list[Layout] = [
    # 2 ranks
    Layout("fsdp2", 2, dp_shard=2),
    Layout("tp2", 2, tp=2, baseline="fsdp2"),
    Layout("pp2_1f1b", 2, pp=2, baseline="fsdp2"),
    Layout("cp2", 2, cp=2, baseline="fsdp2"),
    Layout("resume_fsdp2_as_tp2", 2, tp=2, baseline="fsdp2", resume_from="fsdp2"),
    Layout("fsdp2_compile", 2, dp_shard=2, compile=True, baseline="fsdp2"),
    Layout("tp2_compile_async_tp", 2, tp=2, compile=True, async_tp=True, baseline="fsdp2"),
    Layout("fsdp2_float8", 2, dp_shard=2, float8=True, baseline="fsdp2", float8_vs_bf16=True),
    Layout("tp2_float8_compile_async_tp", 2, tp=2, **ALL_ON, baseline="fsdp2_float8"),
    # 4 ranks
    Layout("fsdp4", 4, dp_shard=4),
    Layout("hsdp_rep2_shard2", 4, dp_replicate=2, dp_shard=2, baseline="fsdp4"),
    Layout("fsdp2_tp2", 4, dp_shard=2, tp=2, baseline="fsdp4"),
    Layout("pp2_tp2_1f1b", 4, pp=2, tp=2, baseline="fsdp4"),
    Layout("cp2_tp2", 4, cp=2, tp=2, baseline="fsdp4"),
    Layout("resume_fsdp4_as_fsdp2_tp2", 4, dp_shard=2, tp=2, baseline="fsdp4", resume_from="fsdp4"),
    Layout("resume_fsdp4_as_pp2_tp2", 4, pp=2, tp=2, baseline="fsdp4", resume_from="fsdp4"),
    Layout("fsdp2_tp2_compile", 4, dp_shard=2, tp=2, compile=True, baseline="fsdp4"),
    Layout("fsdp2_tp2_compile_async_tp", 4, dp_shard=2, tp=2, compile=True, async_tp=True, baseline="fsdp4"),
    Layout("fsdp4_float8", 4, dp_shard=4, float8=True, baseline="fsdp4", float8_vs_bf16=True),
    Layout("fsdp2_tp2_float8_compile_async_tp", 4, dp_shard=2, tp=2, **ALL_ON, baseline="fsdp4_float8"),
    # 8 ranks (the matrix)
    Layout("fsdp8", 8, dp_shard=8),
    Layout("hsdp_rep2_shard4", 8, dp_replicate=2, dp_shard=4, baseline="fsdp8"),
    Layout("fsdp4_tp2", 8, dp_shard=4, tp=2, baseline="fsdp8"),
    Layout("fsdp2_tp2_pp2_1f1b", 8, dp_shard=2, tp=2, pp=2, schedule="1F1B", baseline="fsdp8"),
    Layout("fsdp2_tp2_pp2_interleaved1f1b", 8, dp_shard=2, tp=2, pp=2, schedule="Interleaved1F1B",
       baseline="fsdp8"),
    Layout("fsdp2_tp2_pp2_zbv", 8, dp_shard=2, tp=2, pp=2, schedule="ZBVZeroBubble", baseline="fsdp8"),
    Layout("fsdp2_cp2_tp2", 8, dp_shard=2, cp=2, tp=2, baseline="fsdp8"),
    Layout("cp2_tp2_pp2_1f1b", 8, cp=2, tp=2, pp=2, baseline="fsdp8"),
    Layout("resume_fsdp8_as_fsdp4_tp2", 8, dp_shard=4, tp=2, baseline="fsdp8", resume_from="fsdp8"),
    Layout("resume_fsdp8_as_fsdp2_tp2_pp2", 8, dp_shard=2, tp=2, pp=2, baseline="fsdp8",
       resume_from="fsdp8"),
    Layout("fsdp8_compile", 8, dp_shard=8, compile=True, baseline="fsdp8"),
    Layout("fsdp4_tp2_compile", 8, dp_shard=4, tp=2, compile=True, baseline="fsdp8"),
    Layout("fsdp4_tp2_compile_async_tp", 8, dp_shard=4, tp=2, compile=True, async_tp=True, baseline="fsdp8"),
    Layout("fsdp2_cp2_tp2_compile", 8, dp_shard=2, cp=2, tp=2, compile=True, baseline="fsdp8"),
    Layout("fsdp8_float8", 8, dp_shard=8, float8=True, baseline="fsdp8", float8_vs_bf16=True),
    Layout("fsdp4_tp2_float8_compile_async_tp", 8, dp_shard=4, tp=2, **ALL_ON, baseline="fsdp8_float8"),
    Layout("fsdp2_tp2_pp2_1f1b_float8_compile_async_tp", 8, dp_shard=2, tp=2, pp=2, **ALL_ON,
       baseline="fsdp8_float8"),
]
BY_NAME = {layout.name: layout for layout in LAYOUTS}
WORLD_SIZES = sorted({layout.world for layout in LAYOUTS})

# Layouts the trainer cannot run on a CPU although it accepts them (checked in this tree,
# torch 2.13 CPU; docs/gpu_matrix.md): name -> why. Variants are GPU-only by definition.
CPU_GAPS: dict[str, str] = {}


def cpu_gap(layout: Layout) -> str | None:
    """Why ``layout`` is not run with --device cpu, or None."""
    why = []
    if layout.async_tp:
        why.append("async TP needs CUDA (the trainer refuses it on a CPU)")
    if layout.float8:
        why.append("Float8 matmuls need an SM89+ GPU (a CPU only emulates them)")
    if layout.compile:
        why.append("compile is a GPU-mode variant (inductor's CPU kernels say nothing about the GPU's)")
    if layout.name in CPU_GAPS:
        why.append(CPU_GAPS[layout.name])
    return "; ".join(why) or None


def _check_table() -> None:
    for layout in LAYOUTS:
        assert layout.degrees == layout.world, layout
        assert GLOBAL_BATCH % layout.dp == 0, layout
        for ref in (layout.baseline, layout.resume_from):
            assert ref is None or BY_NAME[ref].world == layout.world, layout
    assert len(BY_NAME) == len(LAYOUTS)


_check_table()


# ---- settings and plans -----------------------------------------------------------------


@dataclass
class Settings:
    world_size: int
    device: str
    flavor: str
    steps: int
    seq_len: int
    global_batch: int
    tolerance: float
    timeout: float
    extra: list[str]

    @property
    def ckpt_step(self) -> int:
        return self.steps // 2

    def fingerprint(self) -> dict[str, Any]:
        """What must match for --reuse: everything that changes a baseline's losses."""
        return dict(world_size=self.world_size, device=self.device, flavor=self.flavor,
                    steps=self.steps, seq_len=self.seq_len, global_batch=self.global_batch,
                    extra=self.extra)

    def common(self) -> list[str]:
        """Options every run shares, the seed checkpoint's run included."""
        return [
            "--model.flavor", self.flavor,
            "--training.seq_len", str(self.seq_len),
            "--training.global_batch_size", str(self.global_batch),
            "--training.dataset_shards", str(self.global_batch),
            "--training.seed", str(SEED),
            "--training.deterministic",
            "--training.mixed_precision_param", "float32" if self.device == "cpu" else "bfloat16",
            "--lr_scheduler.warmup_steps", str(LR_WARMUP),
            "--job.no-print_config",
        ]


@dataclass
class Plan:
    """One layout as it will run (or why it will not)."""

    layout: Layout
    title: str
    tolerance: float
    entry: Entry | None = None
    launch: Launch | None = None
    dump: Path | None = None
    not_run: str | None = None  # 'skipped: ...' / 'gpu only: ...'
    extra_for: list[str] = field(default_factory=list)


def device_env(settings: Settings) -> dict[str, str]:
    if settings.device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}  # CPU processes over gloo even on a GPU machine
    return {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS from the first handle


def seed_dir(root: Path) -> Path:
    return root / "seed"


def seed_path(root: Path) -> Path:
    return seed_dir(root) / "checkpoint" / "step-0"


def seed_command(settings: Settings, root: Path) -> list[str]:
    """One process, every degree 1 (docs/checkpoint.md)."""
    return [
        sys.executable, "-m", "torchtitan.train", "--job.config_file", CONFIG_FILE,
        *settings.common(),
        "--training.local_batch_size", str(settings.global_batch),
        "--parallelism.data_parallel_replicate_degree", "1",
        "--parallelism.data_parallel_shard_degree", "1",
        "--parallelism.tensor_parallel_degree", "1",
        "--parallelism.pipeline_parallel_degree", "1",
        "--parallelism.context_parallel_degree", "1",
        "--checkpoint.enable", "--checkpoint.create_seed_checkpoint",
        "--metrics.no-enable_color_printing",
        "--job.dump_folder", repo_relative(seed_dir(root)),
        *settings.extra,
    ]


def is_reference(layout: Layout) -> bool:
    """Some layout resumes from this one's step-k checkpoint (so it keeps a full one)."""
    return any(other.resume_from == layout.name for other in LAYOUTS)


def layout_overrides(layout: Layout, settings: Settings, seed: Path, dumps: dict[str, Path]) -> list[str]:
    rel = repo_relative
    args = [
        *settings.common(),
        "--training.local_batch_size", str(settings.global_batch // layout.dp),
        *layout.options(),
        "--checkpoint.enable",
        # The baseline keeps a full checkpoint at step k for the resume rows; every run also
        # writes a small bf16 weights-only export at its last step (deleted after the run).
        "--checkpoint.interval", str(settings.ckpt_step if is_reference(layout) else settings.steps),
        "--checkpoint.model_weights_only", "--checkpoint.export_dtype", "bfloat16",
    ]
    if layout.resume_from:
        start = dumps[layout.resume_from] / "checkpoint" / f"step-{settings.ckpt_step}"
        args += ["--checkpoint.initial_load_path", rel(start),
                 "--checkpoint.no-initial_load_model_weights_only"]
    else:
        args += ["--checkpoint.initial_load_path", rel(seed)]
    return args


def make_plans(settings: Settings, root: Path, selected: list[Layout], seed: Path,
               extra_for: dict[str, list[str]], reused_dumps: dict[str, Path]) -> list[Plan]:
    dumps = {layout.name: root / layout.name for layout in LAYOUTS}
    dumps.update(reused_dumps)
    plans: list[Plan] = []
    for layout in selected:
        tol = FLOAT8_VS_BF16_TOLERANCE if layout.float8_vs_bf16 and settings.device == "gpu" else settings.tolerance
        plan = Plan(layout, "", tol, dump=dumps[layout.name], extra_for=extra_for.get(layout.name, []))
        entry = Entry(
            name=layout.name, description=layout.describe(), ngpu=layout.world, nnodes=1,
            config_file=CONFIG_FILE,
            overrides=layout_overrides(layout, settings, seed, dumps) + plan.extra_for,
            steps=settings.steps, log_freq=1, warmup_steps=0,
        )
        try:
            entry.job = parse_job(entry, f"layout '{layout.name}'", settings.extra)
        except SweepError as e:
            raise MatrixError(str(e)) from None
        title, error = parallel_layout(entry.job, layout.world)
        assert error is None, (layout.name, error)
        plan.title = title + (f" + {layout.describe()}" if layout.variant else "")
        if layout.resume_from:
            plan.title = f"resume {layout.resume_from} step {settings.ckpt_step} as {plan.title}"
        plan.entry = entry
        if layout.world > settings.world_size:
            plan.not_run = f"skipped: needs {layout.world} ranks"
        elif settings.device == "cpu" and cpu_gap(layout):
            plan.not_run = f"gpu only: {cpu_gap(layout)}"
        else:
            launch = build_launch(entry, "torchrun", repo_relative(plan.dump), settings.extra, None, [])
            launch.env["LOG_DIR"] = repo_relative(plan.dump / "torchrun_logs")
            launch.env.update(device_env(settings))
            plan.launch = launch
        plans.append(plan)
    return plans


def select(settings: Settings, only: str | None) -> list[Layout]:
    """The world size's layouts (plus the larger ones, to be listed as skipped), or the
    --only names with the baselines they are compared with, in table order."""
    if not only:
        # the 8-rank matrix is always listed (as skipped below 8 ranks)
        return [lay for lay in LAYOUTS if lay.world in (settings.world_size, max(WORLD_SIZES))]
    names = [n.strip() for n in only.split(",") if n.strip()]
    for n in names:
        if n not in BY_NAME:
            close = difflib.get_close_matches(n, list(BY_NAME), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "see --list"
            raise MatrixError(f"--only: no layout '{n}'; {hint}")
        if BY_NAME[n].world < settings.world_size:
            raise MatrixError(f"--only: '{n}' is a {BY_NAME[n].world}-rank layout; run it with --world_size {BY_NAME[n].world}")
    wanted = set(names)
    changed = True
    while changed:  # the baselines (and the checkpoints resumed) of what was asked for
        changed = False
        for n in list(wanted):
            for ref in (BY_NAME[n].baseline, BY_NAME[n].resume_from):
                if ref and ref not in wanted:
                    wanted.add(ref)
                    changed = True
    return [lay for lay in LAYOUTS if lay.name in wanted]


def order_for_running(plans: list[Plan]) -> list[Plan]:
    """Every layout after the layouts it is compared with or resumes from."""
    done: set[str] = set()
    ordered: list[Plan] = []
    pending = list(plans)
    while pending:
        for plan in pending:
            refs = {r for r in (plan.layout.baseline, plan.layout.resume_from) if r}
            if refs <= done or not refs & {p.layout.name for p in pending}:
                ordered.append(plan)
                done.add(plan.layout.name)
                pending.remove(plan)
                break
    return ordered
