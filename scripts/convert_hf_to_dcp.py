"""Convert a Hugging Face Llama 3.x checkpoint (safetensors + config.json) to a DCP checkpoint.

    python scripts/convert_hf_to_dcp.py path/to/Llama-3.1-8B outputs/llama3_8b_dcp
    python -m torchtitan.train --job.config_file train_configs/llama3_8b.toml \
        --checkpoint.enable --checkpoint.initial_load_path outputs/llama3_8b_dcp

The output holds the model weights only (under ``model.``, with our names and Meta's
interleaved rotary layout for ``wq``/``wk``), marked complete: use it as
``checkpoint.initial_load_path``, or name it ``<checkpoint folder>/step-0`` to make it the
run's seed checkpoint. The whole model is read into CPU memory (about 2 bytes per parameter
in bf16).
The logic is torchtitan.models.llama3.convert.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from torchtitan.models.llama3.convert import hf_to_dcp_main as main  # noqa: E402

if __name__ == "__main__":
    main()
