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


def _argv() -> list[str]:
    """Without matplotlib the text and assert modes still work: no plot unless --png asks."""
    argv = sys.argv[1:]
    if any(a == "--png" or a.startswith("--png=") for a in argv) or "-h" in argv or "--help" in argv:
        return argv
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("note: matplotlib is not installed, so no plot (pass --png FILE after installing it)", file=sys.stderr)
        return [*argv, "--png", ""]
    return argv


if __name__ == "__main__":
    sys.exit(main(_argv()))
