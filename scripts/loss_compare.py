"""Compare the loss curves of two training runs, step by step.

    # two existing logs
    python scripts/loss_compare.py --logs a.log b.log --assert-equal
    # or run two commands (their stdout+stderr is the log)
    python scripts/loss_compare.py --commands "./run_train.sh ..." "NGPU=2 ./run_train.sh ..." --rtol 1e-4

The logic is torchtitan.benchmarking.loss_compare (``--help`` lists the options).
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from torchtitan.benchmarking.loss_compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
