"""The 3D/4D integration matrix (issue #13): every layout of one world size trains the same
few steps from the same weights on the same data, and must give the losses of its baseline.

    python scripts/run_gpu_matrix.py --list                        # 8 GPUs: layouts and commands
    python scripts/run_gpu_matrix.py --output matrix.md            # 8 GPUs, debug model
    python scripts/run_gpu_matrix.py --flavor 8B --output m8b.md   # 8 GPUs, Llama 3 8B shapes
    python scripts/run_gpu_matrix.py --world_size 4 --device cpu   # 4 CPU processes (gloo)
    python scripts/run_gpu_matrix.py --world_size 8 --device cpu --only fsdp4_tp2

The runner is torchtitan.benchmarking.gpu_matrix (docs/gpu_matrix.md).
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from torchtitan.benchmarking.gpu_matrix_cli import main  # noqa: E402  (no torch import)

if __name__ == "__main__":
    sys.exit(main())
