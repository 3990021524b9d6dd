"""Running one layout of the GPU matrix and judging it: the seed checkpoint, the trainer's own
layout checks before launching, the launch itself, and its per-step losses against its
baseline's (``|a - b| <= rtol * |baseline|``); ``--reuse`` of an earlier run's baselines."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from torchtitan.benchmarking.gpu_matrix import (
    MatrixError,
    Plan,
    Settings,
    device_env,
    is_reference,
    seed_command,
    seed_dir,
)
from torchtitan.benchmarking.launch import Launch, run_launch
from torchtitan.benchmarking.loss_compare import compare as compare_curves
from torchtitan.benchmarking.results import is_oom, last_error_line, read_jsonl, summarize
from torchtitan.benchmarking.sweep import REPO, repo_relative
from torchtitan.config import ConfigError

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
    for record in read_jsonl(path):
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
    cmp = compare_curves(ours, theirs)
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
                 command=plan.launch.shell(), dump=repo_relative(plan.dump))
    jsonl_dir = plan.dump / plan.entry.job.metrics.save_jsonl_folder
    for stale in jsonl_dir.glob("rank_*.jsonl"):
        stale.unlink()
    if (plan.dump / "checkpoint").is_dir():  # a checkpoint there would be resumed instead of the seed
        shutil.rmtree(plan.dump / "checkpoint")
    log_path = plan.dump / "matrix.log"
    start = time.perf_counter()
    code = run_launch(plan.launch, log_path, settings.timeout, verbose)
    res.wall_s = time.perf_counter() - start
    res.exit_code = code
    res.losses = read_losses(jsonl_dir)
    first = settings.ckpt_step + 1 if layout.resume_from else 1
    expected = list(range(first, settings.steps + 1))
    try:
        figures = summarize(jsonl_dir, warmup_steps=first)  # the first window holds start-up
        res.tokens_per_s_per_gpu, res.peak_mem_gib = figures.tps, figures.mem_gib
    except (ValueError, KeyError, OSError):
        pass
    cleanup_checkpoints(plan, settings, keep_checkpoints)
    if code is None:
        res.status, res.ok = f"timed out after {settings.timeout:.0f} s (log: {log_path})", False
        return res
    if code != 0:
        line = last_error_line(log_path.read_text(errors="replace"))
        what = "out of memory" if is_oom(line) else f"failed (exit {code})"
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
    from torchtitan.models import check_model_config

    try:
        validate_layout(plan.entry.job, plan.layout.world)
        check_model_config(plan.entry.job)
    except ConfigError as e:
        return str(e)
    return None


def make_seed(settings: Settings, root: Path, verbose: bool) -> tuple[bool, str, float]:
    launch = Launch(device_env(settings), seed_command(settings, root))
    if seed_dir(root).exists():
        shutil.rmtree(seed_dir(root))
    start = time.perf_counter()
    code = run_launch(launch, seed_dir(root) / "matrix.log", settings.timeout, verbose)
    took = time.perf_counter() - start
    if code != 0:
        text = (seed_dir(root) / "matrix.log").read_text(errors="replace")
        why = "timed out" if code is None else f"exit {code}: {last_error_line(text)}"
        return False, f"seed checkpoint failed ({why})", took
    return True, "", took


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
