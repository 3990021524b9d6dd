"""Dry-run planner: check and size a layout for any world size, or search the best one.

    python scripts/plan.py --job.config_file train_configs/llama3_405b.toml --world_size 512 \
        --parallelism.pipeline_parallel_degree 8 --training.local_batch_size 8
    python scripts/plan.py --job.config_file train_configs/llama3_8b.toml --world_size 128 --search

Runs on a CPU in seconds to minutes; see docs/planning.md and ``--help``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchtitan.planner.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
