"""Convert a Hugging Face Llama 3.x checkpoint (safetensors + config.json) to a DCP checkpoint.

    python scripts/convert_hf_to_dcp.py path/to/Llama-3.1-8B outputs/llama3_8b_dcp
    python -m torchtitan.train --job.config_file train_configs/llama3_8b.toml \
        --checkpoint.enable --checkpoint.initial_load_path outputs/llama3_8b_dcp

The output holds the model weights only (under ``model.``, with our names and Meta's
interleaved rotary layout for ``wq``/``wk``), marked complete: use it as
``checkpoint.initial_load_path``, or name it ``<checkpoint folder>/step-0`` to make it the
run's seed checkpoint. The whole model is read into CPU memory (about 2 bytes per parameter
in bf16).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from torchtitan.components.checkpoint import CheckpointError, write_model_state
from torchtitan.distributed.utils import TORCH_DTYPE_MAP
from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint."""
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{hf_dir} has no *.safetensors files (only safetensors checkpoints are read)"
        )
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(str(hf_dir / name)))
    return weights


def convert(hf_dir: str, output: str, dtype: str | None = None) -> dict[str, torch.Tensor]:
    """Read ``hf_dir``, write the DCP checkpoint ``output``; return the converted weights."""
    root = Path(hf_dir)
    config_file = root / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} does not exist: pass a Hugging Face model folder")
    adapter = Llama3StateDictAdapter(
        Llama3StateDictAdapter.args_from_hf_config(json.loads(config_file.read_text()))
    )
    state = adapter.from_hf(read_hf_weights(root))
    if dtype is not None:
        state = {k: v.to(TORCH_DTYPE_MAP[dtype]) for k, v in state.items()}
    adapter.check(state)
    write_model_state(state, output)
    return state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("hf_dir", help="folder with config.json and *.safetensors")
    parser.add_argument("output", help="DCP checkpoint directory to create")
    parser.add_argument(
        "--dtype", choices=sorted(TORCH_DTYPE_MAP), default=None, help="cast the weights (default: keep)"
    )
    args = parser.parse_args(argv)
    try:
        state = convert(args.hf_dir, args.output, args.dtype)
    except (CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(f"convert_hf_to_dcp: error: {e}")
    n = sum(v.numel() for v in state.values())
    print(f"wrote {len(state)} tensors ({n:,} parameters) to {args.output}")


if __name__ == "__main__":
    main()
