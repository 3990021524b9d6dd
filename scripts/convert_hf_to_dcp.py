"""Convert a Hugging Face checkpoint (safetensors + config.json) to a DCP checkpoint.

    python scripts/convert_hf_to_dcp.py path/to/Llama-3.1-8B outputs/llama3_8b_dcp
    python scripts/convert_hf_to_dcp.py path/to/Qwen3-0.6B outputs/qwen3_dcp --model qwen3
    python -m torchtitan.train --job.config_file train_configs/llama3_8b.toml \\
        --checkpoint.enable --checkpoint.initial_load_path outputs/llama3_8b_dcp

The output holds the model weights only (under ``model.``, with our names and layouts),
marked complete: use it as ``checkpoint.initial_load_path``, or name it
``<checkpoint folder>/step-0`` to make it the run's seed checkpoint. The folder is read with
DCP's Hugging Face storage reader and mapped by the model family's state-dict adapter, the
same path as ``checkpoint.initial_load_in_hf`` (which reads such a folder directly, without
this conversion). The whole model is read into CPU memory.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from torchtitan.components.checkpoint import CheckpointError  # noqa: E402
from torchtitan.components.checkpoint.hf import hf_to_dcp  # noqa: E402
from torchtitan.distributed.utils import TORCH_DTYPE_MAP  # noqa: E402
from torchtitan.models import get_model_spec  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", help="folder with config.json and *.safetensors")
    parser.add_argument("output", help="DCP checkpoint directory to create")
    parser.add_argument("--model", default="llama3", help="model family (model.name), default llama3")
    parser.add_argument(
        "--dtype", choices=sorted(TORCH_DTYPE_MAP), default=None, help="cast the weights (default: keep)"
    )
    args = parser.parse_args(argv)
    try:
        adapter_cls = get_model_spec(args.model).state_dict_adapter
        if adapter_cls is None:
            raise ValueError(f"model {args.model} has no state-dict adapter for Hugging Face weights")
        dtype = TORCH_DTYPE_MAP[args.dtype] if args.dtype else None
        state = hf_to_dcp(args.hf_dir, args.output, adapter_cls, dtype)
    except (CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(f"convert_hf_to_dcp: error: {e}")
    n = sum(v.numel() for v in state.values())
    print(f"wrote {len(state)} tensors ({n:,} parameters) to {args.output}")


if __name__ == "__main__":
    main()
