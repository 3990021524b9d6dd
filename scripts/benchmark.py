"""Run a sweep of named training configurations and print one markdown table of the figures.

    python scripts/benchmark.py train_configs/benchmarks/standard.toml
    python scripts/benchmark.py train_configs/benchmarks/standard.toml --only A,B --dry
    python scripts/benchmark.py SWEEP.toml --launcher srun --output results.md \
        --extra "--comm.train_timeout_seconds 300"

The harness is torchtitan.benchmarking (``--help`` and docs/benchmarking.md describe it).
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from torchtitan.benchmarking.cli import main  # noqa: E402  (no torch import)

if __name__ == "__main__":
    sys.exit(main())
