"""Convert Meta's original Llama 3.x checkpoint (params.json + consolidated.NN.pth) to DCP.

    python scripts/convert_meta_to_dcp.py path/to/Meta-Llama-3.1-8B/original outputs/llama3_8b_dcp

The logic and the full --help: torchtitan.convert.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from torchtitan.convert import meta_to_dcp_main as main  # noqa: E402

if __name__ == "__main__":
    main()
