"""Meta's original Llama 3.x checkpoint (``params.json`` + ``consolidated.NN.pth``) to DCP.

Several ``consolidated.NN.pth`` files are Meta's tensor-parallel shards; they are joined
along each weight's split dimension. The names and the rotary layout are already ours. The
output holds model weights only, marked complete: use it as ``checkpoint.initial_load_path``
(or as ``step-0`` of a checkpoint folder). Files are read with ``torch.load(...,
weights_only=True, mmap=True)``. ``scripts/convert_meta_to_dcp.py`` is the command line
(``torchtitan.convert.meta_to_dcp_main``); Hugging Face folders go through
``components/checkpoint/hf.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from torchtitan.components.checkpoint import write_model_state
from torchtitan.models.llama3.state_dict_adapter import (
    Llama3StateDictAdapter,
    args_from_meta_params,
    merge_meta_shards,
)

__all__ = ["meta_to_dcp"]


def meta_to_dcp(meta_dir: str, output: str) -> dict[str, torch.Tensor]:
    """Join Meta's tensor-parallel shards of ``meta_dir`` and write the DCP checkpoint ``output``."""
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
