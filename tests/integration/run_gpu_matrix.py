"""The 3D/4D integration matrix (issue #13): every layout of one world size trains the same
few steps from the same weights on the same data, and must give the losses of the FSDP-only
baseline of that world size.

    python tests/integration/run_gpu_matrix.py --list                        # 8 GPUs: layouts and commands
    python tests/integration/run_gpu_matrix.py --output matrix.md            # 8 GPUs, debug model
    python tests/integration/run_gpu_matrix.py --flavor 8B --output m8b.md   # 8 GPUs, Llama 3 8B shapes
    python tests/integration/run_gpu_matrix.py --world_size 4 --device cpu   # 4 CPU processes (gloo)
    python tests/integration/run_gpu_matrix.py --world_size 8 --device cpu --only fsdp4_tp2

How: one process writes a seed checkpoint (``checkpoint.create_seed_checkpoint``); every
layout loads it (``checkpoint.initial_load_path``), so all start from identical weights.
``training.dataset_shards = global_batch_size`` gives every layout the same global batch at
any data-parallel degree (docs/datasets.md); ``training.deterministic`` and one seed. Each
layout is launched through ``run_train.sh`` (torchrun) by scripts/benchmark.py's launcher,
with its per-layout timeout (a hang becomes a "timed out" row) and its JSONL metrics sink;
the per-step losses come from those records and are compared with scripts/loss_compare.py's
rule (|a - b| <= rtol * |baseline|). The checkpoint rows resume the baseline's step-k
checkpoint under another layout and must reproduce the baseline's later steps.

Statuses: passed; loss mismatch; failed (exit code and the worker's last error line);
timed out; refused by the trainer (its own layout checks, run before launching); skipped
(needs more ranks than --world_size); gpu only (compile / Float8 / async TP variants, and any
layout the trainer cannot run on a CPU, in --device cpu). Exit code: 0 when every selected
layout that can run here passed, 1 otherwise, 2 for a bad option, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import importlib.util
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    if name in sys.modules and getattr(sys.modules[name], "__file__", "").startswith(str(REPO)):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bm = _load_script("benchmark")  # launch, timeout, JSONL figures, error lines
lc = _load_script("loss_compare")  # step-by-step comparison

from torchtitan.config import ConfigError  # noqa: E402  (no torch import)

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
    entry: Any = None  # benchmark.Entry
    launch: Any = None  # benchmark.Launch
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
        "--job.dump_folder", bm._repo_relative(seed_dir(root)),
        *settings.extra,
    ]


def is_reference(layout: Layout) -> bool:
    """Some layout resumes from this one's step-k checkpoint (so it keeps a full one)."""
    return any(other.resume_from == layout.name for other in LAYOUTS)


def layout_overrides(layout: Layout, settings: Settings, seed: Path, dumps: dict[str, Path]) -> list[str]:
    rel = bm._repo_relative
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
        entry = bm.Entry(
            name=layout.name, description=layout.describe(), ngpu=layout.world, nnodes=1,
            config_file=CONFIG_FILE,
            overrides=layout_overrides(layout, settings, seed, dumps) + plan.extra_for,
            steps=settings.steps, log_freq=1, warmup_steps=0,
        )
        try:
            entry.job = bm._parse_job(entry, f"layout '{layout.name}'", settings.extra)
        except bm.SweepError as e:
            raise MatrixError(str(e)) from None
        title, error = bm._parallel_layout(entry.job, layout.world)
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
            launch = bm.build_launch(entry, "torchrun", bm._repo_relative(plan.dump), settings.extra, None, [])
            launch.env["LOG_DIR"] = bm._repo_relative(plan.dump / "torchrun_logs")
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


# ---- running and comparing ----------------------------------------------------------------


@dataclass
class Result:
    name: str
    title: str
    world: int
    baseline: str | None
    tolerance: float
    status: str
    ok: bool | None  # None: not run here (skipped / gpu only), so not counted
    losses: dict[int, float] = field(default_factory=dict)
    compared_steps: list[int] = field(default_factory=list)
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    worst_step: int | None = None
    tokens_per_s_per_gpu: float | None = None
    peak_mem_gib: float | None = None
    wall_s: float | None = None
    exit_code: int | None = None
    command: str = ""
    dump: str = ""
    reused: bool = False


def read_losses(jsonl_dir: Path) -> dict[int, float]:
    """rank 0's per-step global loss (the same value every rank logs); None = non-finite."""
    path = jsonl_dir / "rank_0.jsonl"
    if not path.is_file():
        return {}
    out: dict[int, float] = {}
    for record in bm.read_jsonl(path):
        value = record.get("loss_metrics/global_avg_loss")
        out[int(record["step"])] = math.nan if value is None else float(value)
    return out


def compare_losses(result: Result, reference: Result, expected_steps: list[int]) -> None:
    """Fill the diff columns and set the status: passed or loss mismatch."""
    ours = {s: v for s, v in result.losses.items() if s in expected_steps}
    theirs = {s: v for s, v in reference.losses.items() if s in expected_steps}
    missing = [s for s in expected_steps if s not in ours or s not in theirs]
    if missing:
        result.status, result.ok = f"failed: no loss logged for steps {missing[:6]}", False
        return
    cmp = lc.compare(ours, theirs)
    result.compared_steps = cmp.steps
    rels = [d / abs(b) if b else (math.inf if d else 0.0) for d, b in zip(cmp.abs_diff, cmp.b)]
    worst = max(range(len(rels)), key=lambda i: (math.isnan(rels[i]), rels[i]))
    result.max_abs_diff = max(cmp.abs_diff)
    result.max_rel_diff = rels[worst]
    result.worst_step = cmp.steps[worst]
    bad = cmp.failures(result.tolerance, 0.0)
    nonfinite = [s for s, a in zip(cmp.steps, cmp.a) if not math.isfinite(a)]
    if bad or nonfinite:
        result.status = (
            f"loss mismatch: steps {bad[:6]} beyond rtol {result.tolerance:g} vs {reference.name} "
            f"(worst step {result.worst_step}: {cmp.a[worst]:.8g} vs {cmp.b[worst]:.8g})"
        )
        result.ok = False
    else:
        result.status, result.ok = "passed", True


def cleanup_checkpoints(plan: Plan, settings: Settings, keep: bool) -> None:
    """Drop what no later row needs: every save but the baseline's step k (8B: tens of GB each)."""
    folder = plan.dump / "checkpoint"
    if keep or not folder.is_dir():
        return
    for child in folder.iterdir():
        if is_reference(plan.layout) and child.name == f"step-{settings.ckpt_step}":
            continue
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()


def run_plan(plan: Plan, settings: Settings, results: dict[str, Result], verbose: bool,
             keep_checkpoints: bool) -> Result:
    layout = plan.layout
    res = Result(layout.name, plan.title, layout.world, layout.baseline, plan.tolerance, "", None,
                 command=plan.launch.shell(), dump=bm._repo_relative(plan.dump))
    jsonl_dir = plan.dump / plan.entry.job.metrics.save_jsonl_folder
    for stale in jsonl_dir.glob("rank_*.jsonl"):
        stale.unlink()
    if (plan.dump / "checkpoint").is_dir():  # a checkpoint there would be resumed instead of the seed
        shutil.rmtree(plan.dump / "checkpoint")
    log_path = plan.dump / "matrix.log"
    start = time.perf_counter()
    code = bm.run_launch(plan.launch, log_path, settings.timeout, verbose)
    res.wall_s = time.perf_counter() - start
    res.exit_code = code
    res.losses = read_losses(jsonl_dir)
    first = settings.ckpt_step + 1 if layout.resume_from else 1
    expected = list(range(first, settings.steps + 1))
    try:
        figures = bm.summarize(jsonl_dir, warmup_steps=first)  # the first window holds start-up
        res.tokens_per_s_per_gpu, res.peak_mem_gib = figures.tps, figures.mem_gib
    except (ValueError, KeyError, OSError):
        pass
    cleanup_checkpoints(plan, settings, keep_checkpoints)
    if code is None:
        res.status, res.ok = f"timed out after {settings.timeout:.0f} s (log: {log_path})", False
        return res
    if code != 0:
        line = bm.last_error_line(log_path.read_text(errors="replace"))
        what = "out of memory" if bm._is_oom(line) else f"failed (exit {code})"
        res.status, res.ok = f"{what}: {line}", False
        return res
    reference = results.get(layout.baseline) if layout.baseline else None
    if layout.baseline is None:  # a baseline: it must simply have trained every step
        res.compared_steps = [s for s in expected if s in res.losses]
        missing = [s for s in expected if s not in res.losses or not math.isfinite(res.losses[s])]
        res.status, res.ok = ("baseline", True) if not missing else (
            f"failed: no finite loss for steps {missing[:6]}", False)
    elif reference is None or not reference.ok:
        res.status, res.ok = f"not compared: baseline {layout.baseline} did not pass", False
    else:
        compare_losses(res, reference, expected)
    return res


def preflight(plan: Plan) -> str | None:
    """The trainer's own layout checks, without launching: its one-line refusal, or None."""
    from torchtitan.distributed.layout import validate_layout  # imports torch: only when running

    try:
        validate_layout(plan.entry.job, plan.layout.world)
    except ConfigError as e:
        return str(e)
    return None


def make_seed(settings: Settings, root: Path, verbose: bool) -> tuple[bool, str, float]:
    launch = bm.Launch(device_env(settings), seed_command(settings, root))
    if seed_dir(root).exists():
        shutil.rmtree(seed_dir(root))
    start = time.perf_counter()
    code = bm.run_launch(launch, seed_dir(root) / "matrix.log", settings.timeout, verbose)
    took = time.perf_counter() - start
    if code != 0:
        text = (seed_dir(root) / "matrix.log").read_text(errors="replace")
        why = "timed out" if code is None else f"exit {code}: {bm.last_error_line(text)}"
        return False, f"seed checkpoint failed ({why})", took
    return True, "", took


# ---- output -------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


COLUMNS = ["layout", "ranks", "status", "max loss diff vs baseline (abs / rel, steps)",
           "tokens/s/GPU", "peak mem (GiB)", "wall (s)"]


def format_table(results: list[Result], settings: Settings, header: str) -> str:
    out = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        if r.max_abs_diff is not None:
            steps = f"{r.compared_steps[0]}-{r.compared_steps[-1]}"
            diff = f"{r.max_abs_diff:.2e} / {r.max_rel_diff:.2e} (steps {steps}, vs {r.baseline}, rtol {r.tolerance:g})"
        elif r.status == "baseline":
            diff = f"(baseline; {len(r.compared_steps)} steps)"
        else:
            diff = ""
        status = r.status + (" (reused)" if r.reused else "")
        cells = [f"`{r.name}`: {r.title}", str(r.world), status, diff,
                 _fmt(r.tokens_per_s_per_gpu, ",.0f"), _fmt(r.peak_mem_gib, ".2f"), _fmt(r.wall_s, ".0f")]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


def header_line(settings: Settings, seed_note: str) -> str:
    try:
        import importlib.metadata

        torch_version = importlib.metadata.version("torch")
    except Exception:  # noqa: BLE001
        torch_version = "?"
    card = "CPU (gloo)" if settings.device == "cpu" else bm.local_card()
    precision = "fp32" if settings.device == "cpu" else "bf16 params, fp32 reduce"
    return (
        f"GPU matrix, {datetime.datetime.now():%Y-%m-%d %H:%M}: world size {settings.world_size}, "
        f"{card}, torch {torch_version}, flavor {settings.flavor}, {settings.steps} steps, seq_len "
        f"{settings.seq_len}, global batch {settings.global_batch} (dataset_shards {settings.global_batch}), "
        f"{precision}, deterministic, seed checkpoint{seed_note}; checkpoint rows resume step "
        f"{settings.ckpt_step}. Loss tolerance: rtol {settings.tolerance:g} per step vs the baseline"
        + (f" ({FLOAT8_VS_BF16_TOLERANCE:g} for float8 vs bf16)" if settings.device == "gpu" else "")
        + "; tokens/s/GPU: median of rank 0's windows after the first; peak mem: max over ranks "
        + ("(CPU: peak RSS)." if settings.device == "cpu" else "(reserved).")
    )


def _finite(value: Any) -> Any:
    """NaN / inf as null, so the JSON file stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_outputs(results: list[Result], settings: Settings, table: str, root: Path,
                  output: str | None, extra: dict[str, Any]) -> None:
    payload = {
        "settings": {**settings.fingerprint(), "tolerance": settings.tolerance,
                     "float8_vs_bf16_tolerance": FLOAT8_VS_BF16_TOLERANCE, "timeout": settings.timeout,
                     "ckpt_step": settings.ckpt_step},
        **extra,
        "layouts": [
            {**r.__dict__, "losses": {str(k): v for k, v in sorted(r.losses.items())}} for r in results
        ],
    }
    text = json.dumps(_finite(payload), indent=1, default=str, allow_nan=False)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.md").write_text(table + "\n")
    (root / "results.json").write_text(text + "\n")
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        out.with_suffix(".json").write_text(text + "\n")


def load_reuse(path: str, settings: Settings) -> tuple[Path, dict[str, Result]]:
    """The seed checkpoint and the passed baselines of an earlier run with the same settings."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise MatrixError(f"--reuse {path}: cannot read it ({e})") from None
    theirs = {k: data.get("settings", {}).get(k) for k in settings.fingerprint()}
    if theirs != settings.fingerprint():
        diff = [k for k in theirs if theirs[k] != settings.fingerprint()[k]]
        raise MatrixError(f"--reuse {path}: ran with other settings ({', '.join(diff)}); rerun without --reuse")
    seed = REPO / data.get("seed_checkpoint", "")
    if not (seed / "COMPLETE").is_file():
        raise MatrixError(f"--reuse {path}: its seed checkpoint {seed} is gone")
    reused: dict[str, Result] = {}
    for item in data.get("layouts", []):
        if item.get("baseline") is None and item.get("ok"):
            item = dict(item)
            item["losses"] = {int(k): float(v) for k, v in item["losses"].items()}
            known = set(Result.__dataclass_fields__)
            r = Result(**{k: v for k, v in item.items() if k in known})
            r.reused = True
            reused[r.name] = r
    return seed, reused


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--world_size", type=int, default=8, help=f"ranks (GPUs or CPU processes): one of {WORLD_SIZES}")
    add("--device", choices=("gpu", "cpu"), default="gpu",
        help="gpu: NCCL, bf16; cpu: gloo, fp32, debug model (compile/Float8/async TP rows: gpu only)")
    add("--flavor", default="debugmodel", help="model flavor (gpu: debugmodel or 8B; cpu: debugmodel)")
    add("--steps", type=int, help="training steps per layout (default 6); the checkpoint rows resume step steps//2")
    add("--seq_len", type=int, help="tokens per sample (default: cpu 64, gpu 2048)")
    add("--global_batch", type=int, default=GLOBAL_BATCH, help="samples per step in every layout (a multiple of 8)")
    add("--tolerance", type=float, help=f"per-step relative loss tolerance (default: cpu {TOLERANCE['cpu']:g}, gpu {TOLERANCE['gpu']:g})")
    add("--timeout", type=float, help="seconds per layout before it counts as hung (default: cpu 900, gpu 1200)")
    add("--only", help="comma-separated layout names (their baselines are added)")
    add("--list", action="store_true", help="print the layouts and their commands; run nothing")
    add("--output", help="write the markdown table here, and the JSON next to it (.json)")
    add("--dump_root", help="folder for the seed, each layout's dump and the results (default outputs/gpu_matrix/<...>)")
    add("--extra", action="append", default=[], help="trainer options added to every run (repeatable)")
    add("--extra_for", action="append", default=[], metavar="NAME=OPTIONS",
        help="trainer options for one layout only, e.g. tp2='--optimizer.lr 1e-3' (a deliberate mismatch)")
    add("--reuse", metavar="RESULTS.json", help="reuse the seed checkpoint and passed baselines of an earlier run with the same settings")
    add("--keep_checkpoints", action="store_true", help="keep every run's checkpoints (default: only the baseline's step k)")
    add("--verbose", action="store_true", help="echo every run's output to stderr")
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace) -> Settings:
    if args.world_size not in WORLD_SIZES:
        raise MatrixError(f"--world_size {args.world_size}: layouts exist for {WORLD_SIZES}")
    d = DEFAULTS[args.device]
    steps = args.steps if args.steps is not None else d["steps"]
    if steps < 2:
        raise MatrixError(f"--steps {steps}: at least 2 (the checkpoint rows resume step steps//2)")
    if args.global_batch < 8 or args.global_batch % 8:
        raise MatrixError(f"--global_batch {args.global_batch}: a multiple of 8 (every dp degree must divide it)")
    if args.device == "cpu" and args.flavor != "debugmodel":
        raise MatrixError(f"--flavor {args.flavor} on --device cpu: only debugmodel is sensible on a CPU")
    return Settings(
        world_size=args.world_size, device=args.device, flavor=args.flavor, steps=steps,
        seq_len=args.seq_len or d["seq_len"], global_batch=args.global_batch,
        tolerance=args.tolerance if args.tolerance is not None else TOLERANCE[args.device],
        timeout=args.timeout or d["timeout"],
        extra=[tok for item in args.extra for tok in shlex.split(item)],
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = build_settings(args)
        extra_for: dict[str, list[str]] = {}
        for item in args.extra_for:
            name, sep, opts = item.partition("=")
            if not sep or name not in BY_NAME:
                raise MatrixError(f"--extra_for {item!r}: use NAME='--section.key value' with a layout name")
            extra_for.setdefault(name, []).extend(shlex.split(opts))
        selected = select(settings, args.only)
        root = Path(args.dump_root).resolve() if args.dump_root else (
            REPO / "outputs" / "gpu_matrix"
            / f"{settings.world_size}r_{settings.device}_{settings.flavor}_{datetime.datetime.now():%Y%m%d_%H%M%S}")
        seed = seed_path(root)
        reused: dict[str, Result] = {}
        if args.reuse:
            seed, reused = load_reuse(args.reuse, settings)
        reused_dumps = {n: REPO / r.dump for n, r in reused.items()}
        plans = make_plans(settings, root, selected, seed, extra_for, reused_dumps)
    except MatrixError as e:
        print(f"run_gpu_matrix: error: {e}", file=sys.stderr)
        return 2

    if args.list:
        print(f"# {settings.world_size} ranks, --device {settings.device}, flavor {settings.flavor}, "
              f"{settings.steps} steps, seq_len {settings.seq_len}, global batch {settings.global_batch}, "
              f"rtol {settings.tolerance:g}; dump root {bm._repo_relative(root)}")
        print("# seed checkpoint (one process):")
        shown = ["python", *seed_command(settings, root)[1:]]
        print(shlex.join(shown) if not args.reuse else f"# reused: {seed}")
        for plan in plans:
            lay = plan.layout
            role = "baseline" if lay.baseline is None else f"vs {lay.baseline}, rtol {plan.tolerance:g}"
            print(f"# {lay.name}: {plan.title} [{lay.world} ranks, {role}]")
            print(f"#   {plan.not_run}" if plan.not_run else plan.launch.shell())
        return 0

    if settings.device == "gpu" and any(p.not_run is None for p in plans):
        import torch

        if torch.cuda.device_count() < settings.world_size:
            print(f"run_gpu_matrix: error: --device gpu --world_size {settings.world_size} needs "
                  f"{settings.world_size} CUDA GPUs, this machine has {torch.cuda.device_count()}; "
                  "use --device cpu", file=sys.stderr)
            return 2
    results: dict[str, Result] = {}
    started = time.perf_counter()
    seed_s = 0.0
    runnable = [p for p in plans if p.not_run is None]
    interrupted = False
    seed_problem = ""
    try:
        if runnable and not args.reuse:
            print(f"run_gpu_matrix: seed checkpoint: {shlex.join(seed_command(settings, root))}", file=sys.stderr)
            ok, seed_problem, seed_s = make_seed(settings, root, args.verbose)
            print(f"run_gpu_matrix: seed checkpoint {'written' if ok else seed_problem} in {seed_s:.0f} s",
                  file=sys.stderr)
        ordered = order_for_running(plans)
        for i, plan in enumerate(ordered, 1):
            lay = plan.layout
            if plan.layout.name in reused:
                results[lay.name] = reused[lay.name]
                continue
            if plan.not_run:
                results[lay.name] = Result(lay.name, plan.title, lay.world, lay.baseline, plan.tolerance,
                                           plan.not_run, None)
                continue
            base = Result(lay.name, plan.title, lay.world, lay.baseline, plan.tolerance, "", False,
                          command=plan.launch.shell(), dump=bm._repo_relative(plan.dump))
            if seed_problem:
                base.status = f"not run: {seed_problem}"
                results[lay.name] = base
                continue
            refusal = preflight(plan)
            if refusal:
                base.status = f"refused by the trainer: {refusal}"
                results[lay.name] = base
                print(f"run_gpu_matrix: [{i}/{len(ordered)}] {lay.name}: {base.status}", file=sys.stderr)
                continue
            print(f"run_gpu_matrix: [{i}/{len(ordered)}] {lay.name}: {plan.launch.shell()}", file=sys.stderr)
            res = run_plan(plan, settings, results, args.verbose, args.keep_checkpoints)
            results[lay.name] = res
            print(f"run_gpu_matrix: [{i}/{len(ordered)}] {lay.name}: {res.status} in {res.wall_s:.0f} s",
                  file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
        print("run_gpu_matrix: interrupted", file=sys.stderr)
    rows = [results[p.layout.name] for p in plans if p.layout.name in results]
    total = time.perf_counter() - started
    seed_note = " (reused)" if args.reuse else f" ({seed_s:.0f} s)"
    table = format_table(rows, settings, header_line(settings, seed_note))
    passed = [r for r in rows if r.ok]
    counted = [r for r in rows if r.ok is not None]
    summary = (f"{len(passed)}/{len(counted)} run layouts passed, "
               f"{len(rows) - len(counted)} not run here; total wall time {total:.0f} s")
    table += "\n\n" + summary
    print(table)
    write_outputs(rows, settings, table, root, args.output,
                  {"seed_checkpoint": bm._repo_relative(seed), "seed_s": seed_s, "total_s": total,
                   "extra_for": extra_for})
    if interrupted:
        return 130
    return 0 if all(r.ok for r in counted) and len(rows) == len(plans) else 1


if __name__ == "__main__":
    sys.exit(main())
