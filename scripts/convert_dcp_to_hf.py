"""Convert a DCP checkpoint (full or weights-only) to a Hugging Face folder.

    python scripts/convert_dcp_to_hf.py outputs/checkpoint/step-1000 outputs/hf --flavor 8B
    python scripts/convert_dcp_to_hf.py CKPT OUT --hf-config original/config.json --dtype bfloat16
    python scripts/convert_dcp_to_hf.py CKPT OUT --model qwen3 --flavor 0.6B

Writes ``config.json``, ``model-0000i-of-0000N.safetensors`` (a new file past
``--max-shard-gb``) and ``model.safetensors.index.json``, loadable with transformers'
``from_pretrained(OUT)``: the same writer (DCP's Hugging Face storage writer) and the same
mapping (the family's state-dict adapter) as ``checkpoint.last_save_in_hf``. The model shape
comes from one of our flavors (``--flavor``; the vocabulary size is read from the checkpoint)
or from an existing Hugging Face ``config.json`` (``--hf-config``, copied as is). Copy the
tokenizer files yourself. Only model weights are read: optimizer state is skipped.
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from torchtitan.components.checkpoint import CheckpointError, read_model_state  # noqa: E402
from torchtitan.components.checkpoint.hf import dcp_to_hf  # noqa: E402
from torchtitan.distributed.utils import TORCH_DTYPE_MAP  # noqa: E402
from torchtitan.models import get_model_args, get_model_spec  # noqa: E402


def convert(checkpoint: str, output: str, *, model: str = "llama3", flavor: str | None = None,
            hf_config: str | None = None, dtype: str | None = None, max_shard_gb: float = 5.0) -> list[str]:
    if (flavor is None) == (hf_config is None):
        raise ValueError("give exactly one of --flavor and --hf-config")
    adapter_cls = get_model_spec(model).state_dict_adapter
    if adapter_cls is None:
        raise ValueError(f"model {model} has no state-dict adapter for Hugging Face weights")
    config = None
    if hf_config is not None:
        config = json.loads(Path(hf_config).read_text())
        args = adapter_cls.args_from_hf_config(config)
    else:
        args = get_model_args(model, flavor)
        if getattr(args, "vocab_size", 0) <= 0:  # a flavor that takes it from the tokenizer
            embedding = read_model_state(checkpoint).get("tok_embeddings.weight")
            args.vocab_size = embedding.shape[0] if embedding is not None else -1
    return dcp_to_hf(
        checkpoint, output, adapter_cls(args), config=config,
        dtype=TORCH_DTYPE_MAP[dtype] if dtype else None, max_shard_bytes=int(max_shard_gb * 2**30),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="DCP checkpoint directory (e.g. outputs/checkpoint/step-1000)")
    parser.add_argument("output", help="folder to write config.json and safetensors into")
    parser.add_argument("--model", default="llama3", help="model family (model.name), default llama3")
    parser.add_argument("--flavor", help="the flavor the checkpoint was trained with")
    parser.add_argument("--hf-config", help="a Hugging Face config.json describing the model")
    parser.add_argument(
        "--dtype", choices=sorted(TORCH_DTYPE_MAP), default=None, help="cast the weights (default: keep)"
    )
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file")
    args = parser.parse_args(argv)
    try:
        files = convert(
            args.checkpoint, args.output, model=args.model, flavor=args.flavor, hf_config=args.hf_config,
            dtype=args.dtype, max_shard_gb=args.max_shard_gb,
        )
    except (CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(f"convert_dcp_to_hf: error: {e}")
    print(f"wrote {', '.join(files)} to {args.output}")


if __name__ == "__main__":
    main()
