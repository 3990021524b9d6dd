"""Convert a DCP checkpoint (full or weights-only) to Hugging Face Llama format.

    python scripts/convert_dcp_to_hf.py outputs/checkpoint/step-1000 outputs/hf --flavor 8B
    python scripts/convert_dcp_to_hf.py CKPT OUT --hf-config original/config.json --dtype bfloat16

Writes ``config.json`` and ``model.safetensors`` (or shards plus
``model.safetensors.index.json`` above ``--max-shard-gb``), loadable with
``transformers.LlamaForCausalLM.from_pretrained(OUT)``. The model shape comes from one of
our flavors (``--flavor``; the vocabulary size is read from the checkpoint) or from an
existing Hugging Face ``config.json`` (``--hf-config``, copied as is). Copy the tokenizer
files yourself. Only model weights are read: optimizer state in a full checkpoint is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from torchtitan.components.checkpoint import CheckpointError, read_model_state
from torchtitan.distributed.utils import TORCH_DTYPE_MAP
from torchtitan.models import get_model_args
from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter


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


def convert(
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
        state = convert(
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


if __name__ == "__main__":
    main()
