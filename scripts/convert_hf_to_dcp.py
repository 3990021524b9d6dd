"""Convert a Hugging Face checkpoint (safetensors + config.json) to a DCP checkpoint.

    python scripts/convert_hf_to_dcp.py path/to/Llama-3.1-8B outputs/llama3_8b_dcp
    python scripts/convert_hf_to_dcp.py path/to/Qwen3-0.6B outputs/qwen3_dcp --model qwen3
    python -m torchtitan.train --job.config_file train_configs/llama3_8b.toml \\
        --checkpoint.enable --checkpoint.initial_load_path outputs/llama3_8b_dcp

The logic and the full --help: torchtitan.convert.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from torchtitan.convert import hf_to_dcp_main as main  # noqa: E402

if __name__ == "__main__":
    main()
