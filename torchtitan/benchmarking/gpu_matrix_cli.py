"""The GPU matrix's command line (``scripts/run_gpu_matrix.py``; docs/gpu_matrix.md): which
layouts to run, the run itself in dependency order, and its markdown table and JSON record."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from torchtitan.benchmarking.gpu_matrix import (
    BY_NAME,
    DEFAULTS,
    FLOAT8_VS_BF16_TOLERANCE,
    GLOBAL_BATCH,
    TOLERANCE,
    WORLD_SIZES,
    MatrixError,
    Settings,
    make_plans,
    order_for_running,
    seed_command,
    seed_path,
    select,
)
from torchtitan.benchmarking.gpu_matrix_run import Result, load_reuse, make_seed, preflight, run_plan
from torchtitan.benchmarking.report import local_card
from torchtitan.benchmarking.sweep import REPO, repo_relative

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
    card = "CPU (gloo)" if settings.device == "cpu" else local_card()
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(
        "The 3D/4D integration matrix: every layout of one world size trains the same few steps "
        "from the same weights and must give its baseline's losses (docs/gpu_matrix.md)."))
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
              f"rtol {settings.tolerance:g}; dump root {repo_relative(root)}")
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
                          command=plan.launch.shell(), dump=repo_relative(plan.dump))
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
                  {"seed_checkpoint": repo_relative(seed), "seed_s": seed_s, "total_s": total,
                   "extra_for": extra_for})
    if interrupted:
        return 130
    return 0 if all(r.ok for r in counted) and len(rows) == len(plans) else 1
