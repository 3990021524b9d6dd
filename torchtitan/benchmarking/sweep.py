"""The sweep file of a benchmark run: named training configurations, validated up front.

A sweep is TOML (format in docs/benchmarking.md): a ``[defaults]`` table and one
``[[benchmark]]`` table per entry. :func:`load_sweep` checks every key and parses each entry's
trainer options with the trainer's own ``ConfigManager``, so a typo in the last entry fails
before the first one runs. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from torchtitan.config import ConfigError, ConfigManager, JobConfig

__all__ = [
    "ENTRY_KEYS",
    "REPO",
    "RESERVED",
    "Entry",
    "SweepError",
    "config_path",
    "load_sweep",
    "logged_steps",
    "parallel_layout",
    "parse_job",
    "repo_relative",
    "select",
]

# The checkout the runs start in: run_train.sh, train_configs/ and outputs/ live there.
REPO = Path(__file__).resolve().parents[2]

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


def parallel_layout(job: JobConfig, world: int) -> tuple[str, str | None]:
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
        entry.job = parse_job(entry, where, extra)
        kept = [s for s in logged_steps(entry.steps, entry.log_freq) if s > entry.warmup_steps]
        if not kept:
            raise SweepError(
                f"{where}: no logged window ends after warmup_steps = {entry.warmup_steps} "
                f"(steps {entry.steps}, log_freq {entry.log_freq}); raise steps or lower warmup_steps"
            )
        _, error = parallel_layout(entry.job, entry.world)
        if error:
            raise SweepError(f"{where}: {error}; change ngpu/nnodes or the parallelism overrides")
        entries.append(entry)
    return entries


def config_path(config_file: str) -> Path:
    p = Path(config_file)
    return p if p.is_absolute() else REPO / p


def parse_job(entry: Entry, where: str, extra: list[str]) -> JobConfig:
    manager = ConfigManager()
    try:
        for setting in manager._parse_cli(entry.overrides):  # canonical names, aliases resolved
            fix = RESERVED.get(setting.option.canonical)
            if fix:
                raise SweepError(
                    f"{where}: overrides set {setting.spelled}, which the harness sets; use {fix}"
                )
        argv = ["--job.config_file", str(config_path(entry.config_file))]
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


def repo_relative(path: Path) -> str:
    """``path`` relative to the checkout when it is inside it (shorter commands and logs)."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)
