"""Convert Meta's original Llama 3.x checkpoint (params.json + consolidated.NN.pth) to DCP.

    python scripts/convert_meta_to_dcp.py path/to/Meta-Llama-3.1-8B/original outputs/llama3_8b_dcp

Several ``consolidated.NN.pth`` files are Meta's tensor-parallel shards; they are joined
along each weight's split dimension. The names and the rotary layout are already ours. The
output holds model weights only, marked complete: use it as ``checkpoint.initial_load_path``
(or as ``step-0`` of a checkpoint folder). Files are read with ``torch.load(...,
weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from torchtitan.components.checkpoint import CheckpointError, write_model_state
from torchtitan.models.llama3.state_dict_adapter import (
    Llama3StateDictAdapter,
    args_from_meta_params,
    merge_meta_shards,
)


def convert(meta_dir: str, output: str) -> dict[str, torch.Tensor]:
    root = Path(meta_dir)
    params_file = root / "params.json"
    if not params_file.exists():
        raise FileNotFoundError(f"{params_file} does not exist: pass Meta's 'original' folder")
    files = sorted(root.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{root} has no consolidated.*.pth files")
    args = args_from_meta_params(json.loads(params_file.read_text()))
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    state = merge_meta_shards(shards, n_kv_heads=args.n_kv_heads or args.n_heads)
    Llama3StateDictAdapter(args).check(state)
    write_model_state(state, output)
    return state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("meta_dir", help="folder with params.json and consolidated.*.pth")
    parser.add_argument("output", help="DCP checkpoint directory to create")
    args = parser.parse_args(argv)
    try:
        state = convert(args.meta_dir, args.output)
    except (CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(f"convert_meta_to_dcp: error: {e}")
    n = sum(v.numel() for v in state.values())
    print(f"wrote {len(state)} tensors ({n:,} parameters) to {args.output}")


if __name__ == "__main__":
    main()
