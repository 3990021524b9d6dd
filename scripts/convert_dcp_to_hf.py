"""Convert a DCP checkpoint (full or weights-only) to a Hugging Face folder.

    python scripts/convert_dcp_to_hf.py outputs/checkpoint/step-1000 outputs/hf --flavor 8B
    python scripts/convert_dcp_to_hf.py CKPT OUT --hf-config original/config.json --dtype bfloat16
    python scripts/convert_dcp_to_hf.py CKPT OUT --model qwen3 --flavor 0.6B

The logic and the full --help: torchtitan.convert.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from torchtitan.convert import dcp_to_hf_main as main  # noqa: E402

if __name__ == "__main__":
    main()
