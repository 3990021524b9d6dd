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
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import importlib.metadata
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from torchtitan.config import ConfigError, ConfigManager, JobConfig  # noqa: E402  (no torch import)

RDZV_PORT = 29500
# Options the harness sets itself: an entry sets them through its own keys (or not at all).
RESERVED = {
    "training.steps": "the entry's steps key",
    "metrics.log_freq": "the entry's log_freq key",
    "job.dump_folder": "--dump_root",
    "metrics.enable_jsonl": "nothing (the harness turns it on)",
    "metrics.rank_0_only": "nothing (the harness logs on every rank for peak memory)",
}


class SweepError(ValueError):
    """A bad sweep file or command line: one line naming the file, entry and fix."""


# ---- the sweep file --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    tp: type
    required: bool
    help: str
    low: int | None = None


ENTRY_KEYS: dict[str, _Key] = {
    "name": _Key(str, True, "short unique name: letters, digits, - _ ."),
    "description": _Key(str, False, "what the entry is, shown in the table"),
    "ngpu": _Key(int, True, "GPUs (processes) per node", low=1),
    "nnodes": _Key(int, False, "nodes (more than 1 needs SLURM)", low=1),
    "config_file": _Key(str, True, "base TOML file, relative to the repository root"),
    "overrides": _Key(list, False, "trainer options, e.g. [\"--model.flavor 3B\"]"),
    "steps": _Key(int, True, "training steps of the run", low=1),
    "log_freq": _Key(int, True, "steps per logged window", low=1),
    "warmup_steps": _Key(int, True, "windows ending at or before this step are dropped", low=0),
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Entry:
    """One benchmark configuration, validated against the trainer's own config parser."""

    name: str
    description: str
    ngpu: int
    nnodes: int
    config_file: str
    overrides: list[str]
    steps: int
    log_freq: int
    warmup_steps: int
    job: JobConfig = field(repr=False, default_factory=JobConfig)

    @property
    def world(self) -> int:
        return self.ngpu * self.nnodes

    def trainer_args(self, dump_folder: str, extra: list[str]) -> list[str]:
        """Everything after the config file: the entry's overrides, the harness's, then --extra."""
        return [
            *self.overrides,
            "--training.steps", str(self.steps),
            "--metrics.log_freq", str(self.log_freq),
            "--job.dump_folder", dump_folder,
            "--metrics.enable_jsonl",
            "--metrics.no-rank_0_only",
            "--metrics.no-enable_color_printing",
            *extra,
        ]


def _check_keys(table: dict[str, Any], where: str, allowed: dict[str, _Key]) -> None:
    for key, value in table.items():
        spec = allowed.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(allowed)}"
            raise SweepError(f"{where}: unknown key '{key}'; {hint}")
        ok = isinstance(value, spec.tp) and not (spec.tp is int and isinstance(value, bool))
        if spec.tp is list:
            ok = ok and all(isinstance(v, str) for v in value)
        if not ok:
            kind = {int: "an integer", str: "a string", list: "a list of strings"}[spec.tp]
            raise SweepError(f"{where}: '{key}' must be {kind} ({spec.help})")
        if spec.low is not None and value < spec.low:
            raise SweepError(f"{where}: '{key}' = {value} must be >= {spec.low} ({spec.help})")


def _parallel_layout(job: JobConfig, world: int) -> tuple[str, str | None]:
    """('FSDP 2 x TP 2'-style layout, or an error) from the degrees, as ParallelDims fills them."""
    p = job.parallelism
    rep, tp, pp, cp = (
        p.data_parallel_replicate_degree, p.tensor_parallel_degree,
        p.pipeline_parallel_degree, p.context_parallel_degree,
    )
    shard = p.data_parallel_shard_degree
    rest = rep * tp * pp * cp
    if shard == -1:
        if world % rest:
            return "", f"replicate x tp x pp x cp = {rest} does not divide ngpu x nnodes = {world}"
        shard = world // rest
    elif rest * shard != world:
        return "", f"parallel degrees multiply to {rest * shard}, not ngpu x nnodes = {world}"
    parts = []
    if pp > 1:
        parts.append(f"PP {pp} {p.pipeline_parallel_schedule}")
    if rep > 1:
        parts.append(f"HSDP {rep}x{shard}" if shard > 1 else f"DDP {rep}")
    elif shard > 1:
        parts.append(f"FSDP {shard}")
    if cp > 1:
        parts.append(f"CP {cp}")
    if tp > 1:
        parts.append(f"TP {tp}")
    return " x ".join(parts) or "single device", None


def logged_steps(steps: int, log_freq: int) -> list[int]:
    """Steps the trainer logs at: step 1 and every multiple of log_freq."""
    return sorted({1, *range(log_freq, steps + 1, log_freq)})


def load_sweep(path: str | Path, extra: list[str] | None = None) -> list[Entry]:
    """Parse and validate a sweep file; every entry's trainer options are parsed as the
    trainer will parse them, so a typo in the last entry fails before the first one runs."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise SweepError(f"{path}: cannot read the sweep file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"{path}: invalid TOML: {e}") from None
    for key in data:
        if key not in ("defaults", "benchmark"):
            raise SweepError(f"{path}: unknown top-level key '{key}'; use [defaults] and [[benchmark]]")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise SweepError(f"{path}: 'defaults' must be a table: [defaults]")
    shared = {k: v for k, v in ENTRY_KEYS.items() if k not in ("name", "description")}
    _check_keys(defaults, f"{path}: [defaults]", shared)
    tables = data.get("benchmark")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise SweepError(f"{path}: no entries; add at least one [[benchmark]] table")
    entries: list[Entry] = []
    extra = extra or []
    for i, table in enumerate(tables, 1):
        label = f"entry '{table['name']}'" if isinstance(table.get("name"), str) else f"entry #{i}"
        where = f"{path}: {label}"
        _check_keys(table, where, ENTRY_KEYS)
        merged = {"description": "", "nnodes": 1, **defaults, **table}
        merged["overrides"] = [*defaults.get("overrides", []), *table.get("overrides", [])]
        missing = [k for k, spec in ENTRY_KEYS.items() if spec.required and k not in merged]
        if missing:
            raise SweepError(
                f"{where}: missing {', '.join(missing)}; set it in the entry or in [defaults] "
                f"({ENTRY_KEYS[missing[0]].help})"
            )
        if not _NAME.match(merged["name"]):
            raise SweepError(f"{where}: name must be letters, digits, - _ . (it names a folder)")
        if any(e.name == merged["name"] for e in entries):
            raise SweepError(f"{where}: the name is used twice; names must be unique")
        try:
            merged["overrides"] = [tok for item in merged["overrides"] for tok in shlex.split(item)]
        except ValueError as e:
            raise SweepError(f"{where}: overrides: {e}") from None
        entry = Entry(**merged)
        entry.job = _parse_job(entry, where, extra)
        kept = [s for s in logged_steps(entry.steps, entry.log_freq) if s > entry.warmup_steps]
        if not kept:
            raise SweepError(
                f"{where}: no logged window ends after warmup_steps = {entry.warmup_steps} "
                f"(steps {entry.steps}, log_freq {entry.log_freq}); raise steps or lower warmup_steps"
            )
        _, error = _parallel_layout(entry.job, entry.world)
        if error:
            raise SweepError(f"{where}: {error}; change ngpu/nnodes or the parallelism overrides")
        entries.append(entry)
    return entries


def _config_path(config_file: str) -> Path:
    p = Path(config_file)
    return p if p.is_absolute() else REPO / p


def _parse_job(entry: Entry, where: str, extra: list[str]) -> JobConfig:
    manager = ConfigManager()
    try:
        for setting in manager._parse_cli(entry.overrides):  # canonical names, aliases resolved
            fix = RESERVED.get(setting.option.canonical)
            if fix:
                raise SweepError(
                    f"{where}: overrides set {setting.spelled}, which the harness sets; use {fix}"
                )
        argv = ["--job.config_file", str(_config_path(entry.config_file))]
        return manager.parse_args(argv + entry.trainer_args("benchmark_dump", extra))
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from None


def select(entries: list[Entry], only: str | None) -> list[Entry]:
    if not only:
        return entries
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = [e.name for e in entries]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SweepError(f"--only: no entry named {', '.join(unknown)}; the sweep has {', '.join(known)}")
    return [e for e in entries if e.name in names]


# ---- launching -------------------------------------------------------------------------------


@dataclass
class Launch:
    """A command and the environment variables it adds; ``shell()`` is what --dry prints."""

    env: dict[str, str]
    argv: list[str]

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.argv)}".strip()


def slurm_hosts() -> list[str] | None:
    """The allocation's host names, first = head; None outside an allocation."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.split() or None


def build_launch(entry: Entry, launcher: str, dump_folder: str, extra: list[str],
                 hosts: list[str] | None, srun_args: list[str]) -> Launch:
    """The command for one entry. torchrun: run_train.sh with its NGPU/CONFIG_FILE/LOG_RANK
    variables (one node). srun: one torchrun per node as in multinode_trainer.slurm, with a
    c10d rendezvous at the entry's first node (placeholder when the hosts are unknown)."""
    args = entry.trainer_args(dump_folder, extra)
    if launcher == "torchrun":
        if entry.nnodes > 1:
            raise SweepError(
                f"entry '{entry.name}' has nnodes = {entry.nnodes}: use --launcher srun inside a "
                "SLURM allocation"
            )
        env = {"NGPU": str(entry.ngpu), "CONFIG_FILE": entry.config_file, "LOG_RANK": "0",
               "MAX_RESTARTS": "0"}
        return Launch(env, ["./run_train.sh", *args])
    if hosts is not None and len(hosts) < entry.nnodes:
        raise SweepError(f"entry '{entry.name}' needs {entry.nnodes} nodes; the allocation has {len(hosts)}")
    nodes = hosts[: entry.nnodes] if hosts else ["<head_node>"]
    env = {
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
        "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0"),
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3"),
    }
    n = str(entry.nnodes)
    srun = ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1"]
    if hosts:
        srun.append(f"--nodelist={','.join(nodes)}")
    rdzv_id = f"{os.environ.get('SLURM_JOB_ID', 'benchmark')}_{entry.name}"
    return Launch(env, [
        *srun, *srun_args,
        "torchrun", "--nnodes", n, "--nproc_per_node", str(entry.ngpu),
        "--rdzv_id", rdzv_id, "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{nodes[0]}:{RDZV_PORT}",
        "--max-restarts", "0", "--local-ranks-filter", "0", "--role", "rank", "--tee", "3",
        "-m", "torchtitan.train", "--job.config_file", entry.config_file, *args,
    ])


def run_launch(launch: Launch, log_path: Path, timeout: float | None, verbose: bool) -> int | None:
    """Run from the repository root, output to ``log_path`` (and stderr when verbose).
    Returns the exit code, or None after a timeout (the whole process group is stopped)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        log.write(f"$ {launch.shell()}\n")
        log.flush()
        proc = subprocess.Popen(
            launch.argv, cwd=REPO, env={**os.environ, **launch.env}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
        )

        def copy() -> None:
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    log.write(line)
                    if verbose:
                        sys.stderr.write(line)
            except ValueError:  # the log was closed: a straggler outlived the join below
                pass

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            code = None
        except KeyboardInterrupt:
            _stop(proc)
            raise
        reader.join(timeout=10)
    return code


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the launched process group (torchrun passes it on), SIGKILL if it lingers."""
    for sig, grace in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


# ---- figures ---------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PREFIX = re.compile(r"^\s*\[(?:rank|default)?\d+\]:\s?")
_ERROR = re.compile(r"[\w.]*(?:Error|Exception)\b:?.*|torchtitan: error: .*", re.IGNORECASE)


def _is_oom(line: str) -> bool:
    return "OutOfMemoryError" in line or "out of memory" in line.lower()


def last_error_line(log_text: str) -> str:
    """The worker's own error (an out-of-memory line first), not torchrun's summary."""
    lines = [_PREFIX.sub("", _ANSI.sub("", l)).strip() for l in log_text.splitlines()]
    lines = [l for l in lines if l]
    oom = [l for l in lines if _is_oom(l)]
    errors = [l for l in lines if _ERROR.fullmatch(l) and "ChildFailedError" not in l]
    line = (oom or errors or lines or ["(no output)"])[-1]
    return line if len(line) <= 160 else line[:157] + "..."


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of one rank in step order; a repeated step (appended by a rerun) keeps the last."""
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


@dataclass
class Figures:
    card: str
    tps: float
    tflops: float
    mfu: float | None
    peak_tflops: float | None  # what MFU is measured against: 100 * tflops / mfu
    mem_gib: float
    mem_pct: float
    windows: int
    ranks: int


def summarize(jsonl_dir: Path, warmup_steps: int) -> Figures:
    """Medians of rank 0's windows after warm-up; peak reserved memory over every window of
    every rank (the first windows hold compilation and the allocator's growth)."""
    rank0 = jsonl_dir / "rank_0.jsonl"
    if not rank0.is_file():
        raise ValueError(f"no metrics: {rank0} is missing")
    records = read_jsonl(rank0)
    kept = [r for r in records if r["step"] > warmup_steps]
    if not kept:
        raise ValueError(f"no logged window after warm-up step {warmup_steps}")
    mfus = [r.get("mfu(%)") for r in kept]
    mem = (0.0, 0.0)
    ranks = sorted(jsonl_dir.glob("rank_*.jsonl"))
    for path in ranks:
        for r in read_jsonl(path):
            mem = max(mem, (r["memory/max_reserved(GiB)"] or 0.0, r["memory/max_reserved(%)"] or 0.0))
    return Figures(
        card="CPU" if records[0]["device"] == "cpu" else records[0]["device"],
        tps=statistics.median(r["throughput(tps)"] for r in kept),
        tflops=statistics.median(r["tflops"] for r in kept),
        mfu=statistics.median(mfus) if all(m is not None for m in mfus) else None,
        peak_tflops=100 * kept[0]["tflops"] / mfus[0] if mfus[0] else None,
        mem_gib=mem[0],
        mem_pct=mem[1],
        windows=len(kept),
        ranks=len(ranks),
    )


@dataclass
class Row:
    entry: Entry
    layout: str
    status: str
    figures: Figures | None = None

    @property
    def ok(self) -> bool:
        return self.figures is not None


def local_card() -> str:
    """This machine's accelerator, for rows whose run wrote no metrics."""
    try:
        import torch
    except ImportError:
        return "?"
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


COLUMNS = ["config", "GPUs and card", "layout", "tokens/s/GPU (median)", "TFLOP/s", "MFU",
           "peak mem (GiB, max over ranks)", "status"]


def format_table(rows: list[Row], sweep: str, launcher: str) -> str:
    cards = [r.figures.card for r in rows if r.figures]
    card = cards[0] if cards else local_card()
    peaks = sorted({f"{r.figures.peak_tflops:.1f}" for r in rows if r.figures and r.figures.peak_tflops})
    peak = f"{' / '.join(peaks)} TFLOP/s" if peaks else "the card's dense bf16 peak"
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "?"
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    out = [
        f"Benchmark `{sweep}`: {now}, torch {torch_version}, {card}, launcher {launcher}.",
        "tokens/s/GPU, TFLOP/s, MFU: median of rank 0's logged windows after each entry's "
        f"warm-up steps (MFU vs {peak}); peak mem: reserved, max over windows and ranks.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        e, f = row.entry, row.figures
        config = f"{e.name}: {e.description}" if e.description else e.name
        cells = [config, f"{e.world} × {f.card if f else card}", row.layout]
        if f:
            cells += [
                f"{f.tps:,.0f}",
                f"{f.tflops:.1f}" if f.tflops >= 1 else f"{f.tflops:.3f}",
                "n/a" if f.mfu is None else f"{f.mfu:.1f}%",
                f"{f.mem_gib:.1f} ({f.mem_pct:.0f}%)",
            ]
        else:
            cells += ["", "", "", ""]
        out.append("| " + " | ".join(_cell(c) for c in [*cells, row.status]) + " |")
    return "\n".join(out)


# ---- the sweep -------------------------------------------------------------------------------


def run_entry(entry: Entry, launch: Launch, dump: Path, timeout: float | None, verbose: bool) -> Row:
    layout, _ = _parallel_layout(entry.job, entry.world)
    jsonl_dir = dump / entry.job.metrics.save_jsonl_folder
    for stale in jsonl_dir.glob("rank_*.jsonl"):  # an earlier run into the same folder
        stale.unlink()
    log_path = dump / "benchmark.log"
    code = run_launch(launch, log_path, timeout, verbose)
    if code is None:
        return Row(entry, layout, f"timed out after {timeout:.0f} s (log: {log_path})")
    if code != 0:
        line = last_error_line(log_path.read_text(errors="replace"))
        what = "out of memory" if _is_oom(line) else f"failed (exit {code})"
        return Row(entry, layout, f"{what}: {line}")
    try:
        figures = summarize(jsonl_dir, entry.warmup_steps)
    except (ValueError, KeyError, OSError) as e:
        return Row(entry, layout, f"no figures: {e}")
    status = f"ok ({figures.windows} windows)"
    if figures.ranks < entry.world:
        status += f", memory of {figures.ranks}/{entry.world} ranks"
    return Row(entry, layout, status, figures)


def _repo_relative(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


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
                    e, launcher, _repo_relative(dump), extra, hosts, srun_args
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
            layout, _ = _parallel_layout(e.job, e.world)
            about = f"{e.name}: {e.description}" if e.description else e.name
            print(f"# {about} ({e.world} ranks, {layout})")
            print(launch.shell())  # type: ignore[union-attr]
        return 0

    rows: list[Row] = []
    interrupted = False
    for i, (e, dump, plan) in enumerate(plans, 1):
        if isinstance(plan, SweepError):
            rows.append(Row(e, _parallel_layout(e.job, e.world)[0], f"not run: {plan}"))
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


if __name__ == "__main__":
    sys.exit(main())
