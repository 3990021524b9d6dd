"""Where a profiled step's GPU time went, from the profiler's Chrome trace.

A trace answers "why is this run at 55% MFU" only after someone scrolls through it; this
reduces it to the figures that decide the next optimisation: how much of each step the GPU
was busy, how much went to matmuls, attention and the rest, and how much communication
was *exposed* (NCCL kernels running while no compute kernel ran: overlapped traffic costs
nothing, exposed traffic is step time). Intervals are merged per device, so kernels that
overlap on several streams are counted once.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DeviceSummary", "categorize", "format_summary", "load_trace", "main", "summarize_trace"]

COMM = "communication"
_CATEGORIES = (  # first match wins; names of NCCL, cuDNN/flash, cuBLAS/CUTLASS and inductor kernels
    (COMM, re.compile(r"nccl|all_?gather|reduce_?scatter|all_?reduce|cross_device|multimem|symm_mem", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|_mha_|cudnn", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|matmul|scaled_mm|sm90_|sm80_", re.I)),
    ("triton (fused)", re.compile(r"^triton_", re.I)),
)
_MEMORY_CATS = {"gpu_memcpy": "memcpy", "gpu_memset": "memset"}

Interval = tuple[float, float]


def categorize(name: str, cat: str = "kernel") -> str:
    if cat in _MEMORY_CATS:
        return _MEMORY_CATS[cat]
    for label, pattern in _CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def _merge(intervals: Iterable[Interval]) -> list[Interval]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _length(merged: list[Interval]) -> float:
    return sum(e - s for s, e in merged)


def _minus(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """Parts of the merged intervals ``a`` not covered by the merged intervals ``b``."""
    out: list[Interval] = []
    j = 0
    for start, end in a:
        cur = start
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < end:
            out.append((cur, end))
    return out


def _clip(intervals: Iterable[Interval], window: list[Interval]) -> list[Interval]:
    """The parts of ``intervals`` inside the merged ``window``: A - (A - W)."""
    merged = _merge(intervals)
    return _minus(merged, _minus(merged, window))


@dataclass
class DeviceSummary:
    device: str
    steps: int  # ProfilerStep annotations on this device's timeline (0: the whole trace)
    window_us: float  # the time looked at: the profiled steps, or first to last kernel
    busy_us: float  # some kernel running
    compute_us: float  # some non-communication kernel running
    comm_us: float  # some communication kernel running
    exposed_comm_us: float  # communication while no compute ran
    category_us: dict[str, float] = field(default_factory=dict)  # summed kernel time
    top: list[tuple[str, str, int, float]] = field(default_factory=list)  # name, category, count, us

    @property
    def idle_us(self) -> float:
        return self.window_us - self.busy_us


def load_trace(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def summarize_trace(trace: dict[str, Any], top: int = 10) -> list[DeviceSummary]:
    """One summary per GPU in the trace (a rank's trace normally holds one)."""
    kernels: dict[str, list[dict[str, Any]]] = defaultdict(list)
    steps: dict[str, list[Interval]] = defaultdict(list)
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X" or "dur" not in e:
            continue
        cat = e.get("cat", "")
        device = str(e.get("args", {}).get("device", e.get("pid")))
        if cat in ("kernel", *_MEMORY_CATS):
            kernels[device].append(e)
        elif cat == "gpu_user_annotation" and str(e.get("name", "")).startswith("ProfilerStep#"):
            steps[device].append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    out = []
    for device, events in sorted(kernels.items()):
        spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events]
        window = _merge(steps.get(device, [])) or [(min(s for s, _ in spans), max(e for _, e in spans))]
        by_cat: dict[str, list[Interval]] = defaultdict(list)
        totals: dict[str, float] = defaultdict(float)
        per_kernel: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
        for e, span in zip(events, spans):
            inside = _clip([span], window)
            if not inside:
                continue
            label = categorize(str(e.get("name", "")), e.get("cat", "kernel"))
            by_cat[label].extend(inside)
            totals[label] += _length(inside)
            entry = per_kernel[(str(e.get("name", "")), label)]
            entry[0] += 1
            entry[1] += _length(inside)
        comm = _merge(by_cat.get(COMM, []))
        compute = _merge(s for label, ss in by_cat.items() if label != COMM for s in ss)
        ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:top]
        out.append(
            DeviceSummary(
                device=device,
                steps=len(steps.get(device, [])),
                window_us=_length(window),
                busy_us=_length(_merge(comm + compute)),
                compute_us=_length(compute),
                comm_us=_length(comm),
                exposed_comm_us=_length(_minus(comm, compute)),
                category_us=dict(sorted(totals.items(), key=lambda kv: -kv[1])),
                top=[(name, label, int(n), us) for (name, label), (n, us) in ranked],
            )
        )
    return out


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:5.1f}%" if whole > 0 else "   n/a"


def format_summary(s: DeviceSummary, name_width: int = 70) -> str:
    w = s.window_us
    per = f" over {s.steps} profiled steps ({w / max(s.steps, 1) / 1e3:.1f} ms each)" if s.steps else " (first to last kernel)"
    lines = [
        f"device {s.device}: {w / 1e3:.1f} ms{per}",
        f"  busy            {s.busy_us / 1e3:10.1f} ms {_pct(s.busy_us, w)}   idle {s.idle_us / 1e3:.1f} ms {_pct(s.idle_us, w)}",
        f"  compute         {s.compute_us / 1e3:10.1f} ms {_pct(s.compute_us, w)}",
        f"  communication   {s.comm_us / 1e3:10.1f} ms {_pct(s.comm_us, w)}   exposed (no compute running) "
        f"{s.exposed_comm_us / 1e3:.1f} ms {_pct(s.exposed_comm_us, w)}",
        "  kernel time by kind (summed; streams may overlap):",
    ]
    lines += [f"    {label:<16}{us / 1e3:10.1f} ms {_pct(us, w)}" for label, us in s.category_us.items()]
    lines.append("  top kernels:")
    for name, label, count, us in s.top:
        short = name if len(name) <= name_width else name[: name_width - 3] + "..."
        lines.append(f"    {us / 1e3:9.1f} ms {count:6d}x  {label:<15} {short}")
    return "\n".join(lines)


# ---- command line (scripts/trace_summary.py) -------------------------------------------------
_CLI_DOC = (
    "Where the GPU time of profiled steps went: busy/idle, compute, exposed communication, "
    "kernel time by kind and the top kernels, per Chrome trace of --profiling.enable_profiling. "
    "Exit code 1 when a file holds no GPU kernels, 2 when one cannot be read."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=_CLI_DOC)
    parser.add_argument("traces", nargs="+", help="Chrome trace files (.json or .json.gz)")
    parser.add_argument("--top", type=int, default=10, help="kernels to list per device")
    args = parser.parse_args(argv)
    status = 0
    for path in args.traces:
        try:
            summaries = summarize_trace(load_trace(path), top=args.top)
        except (OSError, ValueError) as e:
            print(f"{path}: cannot read the trace: {e}", file=sys.stderr)
            return 2
        print(f"== {path}")
        if not summaries:
            print("  no GPU kernels in this trace (a CPU-only run, or no CUDA activity was recorded)")
            status = 1
        for summary in summaries:
            print(format_summary(summary))
    return status

