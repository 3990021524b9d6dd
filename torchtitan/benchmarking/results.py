"""What a finished run left behind: its metrics (the trainer's JSONL sink, one file per rank)
reduced to a benchmark row's figures, and the worker's own error line from its log."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchtitan.benchmarking.sweep import Entry

__all__ = ["Figures", "Row", "is_oom", "last_error_line", "read_jsonl", "summarize"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PREFIX = re.compile(r"^\s*\[(?:rank|default)?\d+\]:\s?")
_ERROR = re.compile(r"[\w.]*(?:Error|Exception)\b:?.*|torchtitan: error: .*", re.IGNORECASE)


def is_oom(line: str) -> bool:
    return "OutOfMemoryError" in line or "out of memory" in line.lower()


def last_error_line(log_text: str) -> str:
    """The worker's own error (an out-of-memory line first), not torchrun's summary."""
    lines = [_PREFIX.sub("", _ANSI.sub("", l)).strip() for l in log_text.splitlines()]
    lines = [l for l in lines if l]
    oom = [l for l in lines if is_oom(l)]
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
