"""Run a sweep of named training configurations and print one markdown table of the figures.

    python scripts/benchmark.py train_configs/benchmarks/standard.toml
    python scripts/benchmark.py train_configs/benchmarks/standard.toml --only A,B --dry
    python scripts/benchmark.py SWEEP.toml --launcher srun --output results.md \
        --extra "--comm.train_timeout_seconds 300"

Each entry of the sweep file (format in docs/benchmarking.md) runs for its fixed number of
steps with the trainer's JSONL metrics sink on (``metrics.enable_jsonl``, every rank) and a
dump folder of its own. Figures come from those records, never from the console: tokens/s
per GPU, TFLOP/s and MFU are the medians of rank 0's logged windows after the entry's
warm-up steps; peak memory is the largest reserved memory of any window on any rank. A run
that fails (non-zero exit, out of memory, timeout) becomes a row saying so; the sweep goes
on. Launch: ``run_train.sh`` on one node (``torchrun``), or ``srun ... torchrun`` inside a
SLURM allocation. ``--dry`` prints the exact commands and runs nothing.

Exit code: 0 when every entry ran, 1 when one failed, 2 for a bad sweep file or option.

The logic lives in torchtitan.benchmarking (sweep, launch, results, report); this module
runs a sweep (``scripts/benchmark.py`` is its command line).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

from torchtitan.benchmarking.launch import Launch, build_launch, run_launch, slurm_hosts
from torchtitan.benchmarking.report import format_table
from torchtitan.benchmarking.results import Row, is_oom, last_error_line, summarize
from torchtitan.benchmarking.sweep import REPO, Entry, SweepError, load_sweep, parallel_layout, repo_relative, select

__all__ = ["main", "run_entry"]

def run_entry(entry: Entry, launch: Launch, dump: Path, timeout: float | None, verbose: bool) -> Row:
    layout, _ = parallel_layout(entry.job, entry.world)
    jsonl_dir = dump / entry.job.metrics.save_jsonl_folder
    for stale in jsonl_dir.glob("rank_*.jsonl"):  # an earlier run into the same folder
        stale.unlink()
    log_path = dump / "benchmark.log"
    code = run_launch(launch, log_path, timeout, verbose)
    if code is None:
        return Row(entry, layout, f"timed out after {timeout:.0f} s (log: {log_path})")
    if code != 0:
        line = last_error_line(log_path.read_text(errors="replace"))
        what = "out of memory" if is_oom(line) else f"failed (exit {code})"
        return Row(entry, layout, f"{what}: {line}")
    try:
        figures = summarize(jsonl_dir, entry.warmup_steps)
    except (ValueError, KeyError, OSError) as e:
        return Row(entry, layout, f"no figures: {e}")
    status = f"ok ({figures.windows} windows)"
    if figures.ranks < entry.world:
        status += f", memory of {figures.ranks}/{entry.world} ranks"
    return Row(entry, layout, status, figures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("sweep", help="sweep TOML file, e.g. train_configs/benchmarks/standard.toml")
    add("--only", help="comma-separated entry names to run (default: all)")
    add("--dry", action="store_true", help="print the commands and exit")
    add("--launcher", default="auto", choices=("auto", "torchrun", "srun", "slurm"),
        help="auto: srun inside a SLURM allocation (SLURM_JOB_ID set), else torchrun; slurm = srun")
    add("--output", help="also write the table to this markdown file")
    add("--dump_root", help="parent of the entries' dump folders (default outputs/benchmarks/<sweep>_<time>)")
    add("--extra", action="append", default=[], help="trainer options added to every entry (repeatable)")
    add("--srun_args", default="", help="extra srun options, e.g. '--gpus-per-node 8'")
    add("--timeout", type=float, default=0, help="seconds per entry before it is stopped; 0 = none")
    add("--verbose", action="store_true", help="echo each run's output to stderr")
    args = parser.parse_args(argv)
    launcher = {"slurm": "srun"}.get(args.launcher, args.launcher)
    if launcher == "auto":
        launcher = "srun" if os.environ.get("SLURM_JOB_ID") else "torchrun"
    try:
        if args.timeout < 0:
            raise SweepError(f"--timeout {args.timeout}: must be >= 0 (0 = no limit)")
        extra = [tok for item in args.extra for tok in shlex.split(item)]
        entries = select(load_sweep(args.sweep, extra), args.only)
        stem = Path(args.sweep).stem
        root = Path(args.dump_root).resolve() if args.dump_root else (
            REPO / "outputs" / "benchmarks" / f"{stem}_{datetime.datetime.now():%Y%m%d_%H%M%S}")
        hosts = slurm_hosts() if launcher == "srun" else None
        if launcher == "srun" and hosts is None and not args.dry:
            raise SweepError(
                "--launcher srun needs a SLURM allocation (SLURM_JOB_NODELIST and scontrol): "
                "run inside salloc or sbatch"
            )
        srun_args = shlex.split(args.srun_args)
        plans: list[tuple[Entry, Path, Launch | SweepError]] = []
        for e in entries:
            dump = root / e.name
            try:
                plan: Launch | SweepError = build_launch(
                    e, launcher, repo_relative(dump), extra, hosts, srun_args
                )
            except SweepError as err:
                if args.dry:
                    raise
                plan = err
            plans.append((e, dump, plan))
    except SweepError as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        return 2
    if args.dry:
        if launcher == "srun" and hosts is None:
            print("# outside a SLURM allocation: <head_node> stands for the entry's first node")
        for e, _, launch in plans:
            layout, _ = parallel_layout(e.job, e.world)
            about = f"{e.name}: {e.description}" if e.description else e.name
            print(f"# {about} ({e.world} ranks, {layout})")
            print(launch.shell())  # type: ignore[union-attr]
        return 0

    rows: list[Row] = []
    interrupted = False
    for i, (e, dump, plan) in enumerate(plans, 1):
        if isinstance(plan, SweepError):
            rows.append(Row(e, parallel_layout(e.job, e.world)[0], f"not run: {plan}"))
            continue
        print(f"benchmark: [{i}/{len(plans)}] {e.name}: {plan.shell()}", file=sys.stderr)
        start = time.perf_counter()
        try:
            row = run_entry(e, plan, dump, args.timeout or None, args.verbose)
        except KeyboardInterrupt:  # the run is stopped; show what finished
            print(f"benchmark: interrupted during {e.name}", file=sys.stderr)
            interrupted = True
            break
        took = time.perf_counter() - start
        figures = f", {row.figures.tps:,.0f} tokens/s/GPU" if row.figures else ""
        print(f"benchmark: [{i}/{len(plans)}] {e.name}: {row.status}{figures} in {took:.0f} s",
              file=sys.stderr)
        rows.append(row)
    table = format_table(rows, args.sweep, launcher)
    print(table)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.md").write_text(table + "\n")
    if args.output:
        Path(args.output).write_text(table + "\n")
    if interrupted:
        return 130
    return 0 if all(r.ok for r in rows) else 1

