"""Where the GPU time of profiled steps went: busy/idle, compute, exposed communication,
kernel time by kind (matmul, attention, fused triton, NCCL, ...) and the top kernels.

    python scripts/trace_summary.py <dump_folder>/profile_traces/iteration_10/rank0_trace.json [more ...] [--top 15]

Traces come from ``--profiling.enable_profiling`` (docs/debugging.md). Exit code 1 when a
file holds no GPU kernels (a CPU run, or the profiler recorded no CUDA activity).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from torchtitan.tools.trace_summary import format_summary, load_trace, summarize_trace  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
