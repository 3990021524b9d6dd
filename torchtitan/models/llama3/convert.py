"""Llama 3 checkpoints to and from DCP: Hugging Face safetensors and Meta's original shards.

- :func:`hf_to_dcp`: a Hugging Face folder (``config.json`` + ``*.safetensors``) to a DCP
  checkpoint of model weights only, with our names and Meta's interleaved rotary layout for
  ``wq``/``wk``, marked complete (usable as ``checkpoint.initial_load_path``);
- :func:`dcp_to_hf`: a DCP checkpoint (full or weights-only) to ``config.json`` and
  ``model.safetensors`` (sharded with an index above ``max_shard_gb``), loadable with
  ``transformers.LlamaForCausalLM.from_pretrained``;
- :func:`meta_to_dcp`: Meta's ``params.json`` + ``consolidated.NN.pth`` (tensor-parallel shards,
  joined along each weight's split dimension) to DCP.

The ``*_main`` functions are the command lines of ``scripts/convert_hf_to_dcp.py``,
``scripts/convert_dcp_to_hf.py`` and ``scripts/convert_meta_to_dcp.py``: one line on stderr
and exit code 1 for a bad input. Names and shapes are checked by the state-dict adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from torchtitan.components.checkpoint import CheckpointError, read_model_state, write_model_state
from torchtitan.distributed.utils import TORCH_DTYPE_MAP
from torchtitan.models import get_model_args
from torchtitan.models.llama3.state_dict_adapter import (
    Llama3StateDictAdapter,
    args_from_meta_params,
    merge_meta_shards,
)

__all__ = [
    "dcp_to_hf",
    "dcp_to_hf_main",
    "hf_to_dcp",
    "hf_to_dcp_main",
    "meta_to_dcp",
    "meta_to_dcp_main",
    "read_hf_weights",
    "write_hf_weights",
]


# ---- Hugging Face -> DCP ----------------------------------------------------------------------
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


def hf_to_dcp(hf_dir: str, output: str, dtype: str | None = None) -> dict[str, torch.Tensor]:
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


# ---- DCP -> Hugging Face ----------------------------------------------------------------------
def write_hf_weights(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    """Save as one safetensors file, or as shards with an index when it is too large."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        index = {
            "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
            "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
    return names


def dcp_to_hf(
    checkpoint: str,
    output: str,
    *,
    flavor: str | None = None,
    hf_config: str | None = None,
    dtype: str | None = None,
    max_shard_gb: float = 5.0,
) -> dict[str, torch.Tensor]:
    """Write the Hugging Face checkpoint ``output``; return the tensors written."""
    if (flavor is None) == (hf_config is None):
        raise ValueError("give exactly one of --flavor and --hf-config")
    state = read_model_state(checkpoint)
    if dtype is not None:
        state = {k: v.to(TORCH_DTYPE_MAP[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    if hf_config is not None:
        config = json.loads(Path(hf_config).read_text())
        args = Llama3StateDictAdapter.args_from_hf_config(config)
    else:
        args = get_model_args("llama3", flavor)
        args.vocab_size = state["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in state else -1
    adapter = Llama3StateDictAdapter(args)
    adapter.check(state)
    if hf_config is None:
        stored = next(iter(state.values())).dtype
        config = adapter.hf_config(torch_dtype=str(stored).removeprefix("torch."))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    hf_state = adapter.to_hf(state)
    write_hf_weights(hf_state, out, int(max_shard_gb * 2**30))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return hf_state


# ---- Meta's originals -> DCP ------------------------------------------------------------------
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


# ---- command lines ----------------------------------------------------------------------------
def hf_to_dcp_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Convert a Hugging Face Llama 3.x checkpoint (safetensors + config.json) to DCP."
    )
    parser.add_argument("hf_dir", help="folder with config.json and *.safetensors")
    parser.add_argument("output", help="DCP checkpoint directory to create")
    parser.add_argument(
        "--dtype", choices=sorted(TORCH_DTYPE_MAP), default=None, help="cast the weights (default: keep)"
    )
    args = parser.parse_args(argv)
    try:
        state = hf_to_dcp(args.hf_dir, args.output, args.dtype)
    except (CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(f"convert_hf_to_dcp: error: {e}")
    n = sum(v.numel() for v in state.values())
    print(f"wrote {len(state)} tensors ({n:,} parameters) to {args.output}")


def dcp_to_hf_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Convert a DCP checkpoint (full or weights-only) to Hugging Face Llama format."
    )
    parser.add_argument("checkpoint", help="DCP checkpoint directory (e.g. outputs/checkpoint/step-1000)")
    parser.add_argument("output", help="folder to write config.json and safetensors into")
    parser.add_argument("--flavor", help="llama3 flavor the checkpoint was trained with")
    parser.add_argument("--hf-config", help="a Hugging Face config.json describing the model")
    parser.add_argument(
        "--dtype", choices=sorted(TORCH_DTYPE_MAP), default=None, help="cast the weights (default: keep)"
    )
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file")
    args = parser.parse_args(argv)
    try:
        state = dcp_to_hf(
            args.checkpoint,
            args.output,
            flavor=args.flavor,
            hf_config=args.hf_config,
            dtype=args.dtype,
            max_shard_gb=args.max_shard_gb,
        )
    except (CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(f"convert_dcp_to_hf: error: {e}")
    print(f"wrote {len(state)} tensors to {args.output}")


def meta_to_dcp_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Convert Meta's original Llama 3.x checkpoint (params.json + consolidated.*.pth) to DCP."
    )
    parser.add_argument("meta_dir", help="folder with params.json and consolidated.*.pth")
    parser.add_argument("output", help="DCP checkpoint directory to create")
    args = parser.parse_args(argv)
    try:
        state = meta_to_dcp(args.meta_dir, args.output)
    except (CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(f"convert_meta_to_dcp: error: {e}")
    n = sum(v.numel() for v in state.values())
    print(f"wrote {len(state)} tensors ({n:,} parameters) to {args.output}")
