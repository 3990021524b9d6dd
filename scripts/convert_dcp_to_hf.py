"""Convert a DCP checkpoint (full or weights-only) to Hugging Face Llama format.

    python scripts/convert_dcp_to_hf.py outputs/checkpoint/step-1000 outputs/hf --flavor 8B
    python scripts/convert_dcp_to_hf.py CKPT OUT --hf-config original/config.json --dtype bfloat16

Writes ``config.json`` and ``model.safetensors`` (or shards plus
``model.safetensors.index.json`` above ``--max-shard-gb``), loadable with
``transformers.LlamaForCausalLM.from_pretrained(OUT)``. The model shape comes from one of
our flavors (``--flavor``; the vocabulary size is read from the checkpoint) or from an
existing Hugging Face ``config.json`` (``--hf-config``, copied as is). Copy the tokenizer
files yourself. Only model weights are read: optimizer state in a full checkpoint is skipped.
The logic is torchtitan.models.llama3.convert.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from torchtitan.models.llama3.convert import dcp_to_hf_main as main  # noqa: E402

if __name__ == "__main__":
    main()
