"""Sample text from a checkpoint, on one device or tensor-parallel over several.

    python scripts/generate.py --checkpoint outputs/checkpoint/step-1000 --flavor debugmodel \
        --tokenizer tests/assets/test_tiktoken.model --prompt "Once upon a time" \
        --max-new-tokens 64 --temperature 0.8 --top-k 50 --seed 0
    python scripts/generate.py --model.name qwen3 --flavor debugmodel_moe --checkpoint ...
    torchrun --nproc_per_node 8 scripts/generate.py --checkpoint ... --flavor 70B ...

The logic is torchtitan.generate (``--help`` lists the options).
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from torchtitan.generate import main  # noqa: E402

if __name__ == "__main__":
    main()
