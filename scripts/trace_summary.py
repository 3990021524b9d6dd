"""Where the GPU time of profiled steps went: busy/idle, compute, exposed communication,
kernel time by kind (matmul, attention, fused triton, NCCL, ...) and the top kernels.

    python scripts/trace_summary.py <dump_folder>/profile_traces/iteration_10/rank0_trace.json [more ...] [--top 15]

Traces come from ``--profiling.enable_profiling`` (docs/debugging.md). Exit code 1 when a
file holds no GPU kernels (a CPU run, or the profiler recorded no CUDA activity). The logic
is torchtitan.tools.trace_summary.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from torchtitan.tools.trace_summary import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
