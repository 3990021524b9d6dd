"""Convert Meta's original Llama 3.x checkpoint (params.json + consolidated.NN.pth) to DCP.

    python scripts/convert_meta_to_dcp.py path/to/Meta-Llama-3.1-8B/original outputs/llama3_8b_dcp

Several ``consolidated.NN.pth`` files are Meta's tensor-parallel shards; they are joined
along each weight's split dimension. The names and the rotary layout are already ours. The
output holds model weights only, marked complete: use it as ``checkpoint.initial_load_path``
(or as ``step-0`` of a checkpoint folder). Files are read with ``torch.load(...,
weights_only=True, mmap=True)``.
The logic is torchtitan.models.llama3.convert.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from torchtitan.models.llama3.convert import meta_to_dcp_main as main  # noqa: E402

if __name__ == "__main__":
    main()
