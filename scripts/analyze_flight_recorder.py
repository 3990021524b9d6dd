"""Which collective hung, which ranks never joined it, at what sequence number.

    python scripts/analyze_flight_recorder.py <dump_folder>/comm_traces

Prints our one-screen summary (torchtitan.tools.flight_recorder), then the verdict of
PyTorch's own analyzer (torch.distributed.flight_recorder.fr_trace) run on the same dumps.
Gloo dumps carry no process-group membership; the files are completed with what the dumps
themselves imply before PyTorch's analyzer sees them. Exit code 1 when a desync is found.
The logic is torchtitan.tools.flight_recorder.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from torchtitan.tools.flight_recorder import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
