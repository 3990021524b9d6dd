"""The checkpoint converters' command lines: Hugging Face <-> DCP for any model family with a
state-dict adapter, and Meta's original Llama 3 shards -> DCP.

``scripts/convert_hf_to_dcp.py``, ``scripts/convert_dcp_to_hf.py`` and
``scripts/convert_meta_to_dcp.py`` call :func:`hf_to_dcp_main`, :func:`dcp_to_hf_main` and
:func:`meta_to_dcp_main`. The conversions themselves are ``components/checkpoint/hf.py`` (the
same path as ``checkpoint.initial_load_in_hf`` / ``last_save_in_hf``) and
``models/llama3/convert.py``; this module, above the model registry, picks the family.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torchtitan.components.checkpoint import CheckpointError
from torchtitan.components.checkpoint.hf import dcp_to_hf, hf_to_dcp
from torchtitan.components.checkpoint.storage import read_metadata
from torchtitan.distributed.utils import TORCH_DTYPE_MAP
from torchtitan.models import get_model_args, get_model_spec
from torchtitan.models.llama3.convert import meta_to_dcp

__all__ = ["convert_dcp_to_hf", "dcp_to_hf_main", "hf_to_dcp_main", "meta_to_dcp_main"]

HF_TO_DCP_HELP = """Convert a Hugging Face checkpoint (safetensors + config.json) to a DCP checkpoint.

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

DCP_TO_HF_HELP = """Convert a DCP checkpoint (full or weights-only) to a Hugging Face folder.

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

META_TO_DCP_HELP = "Convert Meta's original Llama 3.x checkpoint (params.json + consolidated.*.pth) to DCP."


def hf_to_dcp_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=HF_TO_DCP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def convert_dcp_to_hf(
    checkpoint: str,
    output: str,
    *,
    model: str = "llama3",
    flavor: str | None = None,
    hf_config: str | None = None,
    dtype: str | None = None,
    max_shard_gb: float = 5.0,
) -> list[str]:
    """Write ``checkpoint``'s model weights as a Hugging Face folder ``output``; the files written."""
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
        vocab = _stored_vocab(checkpoint)
        if vocab is not None:  # the flavor's shape with the run's vocabulary (its tokenizer's)
            args.vocab_size = vocab
        elif getattr(args, "vocab_size", 0) <= 0:
            args.vocab_size = -1
    return dcp_to_hf(
        checkpoint, output, adapter_cls(args), config=config,
        dtype=TORCH_DTYPE_MAP[dtype] if dtype else None, max_shard_bytes=int(max_shard_gb * 2**30),
    )


def _stored_vocab(checkpoint: str) -> int | None:
    """Rows of the checkpoint's token embedding, read off its metadata (no tensor is loaded)."""
    meta = read_metadata(checkpoint).state_dict_metadata.get("model.tok_embeddings.weight")
    return int(meta.size[0]) if isinstance(meta, TensorStorageMetadata) else None


def dcp_to_hf_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=DCP_TO_HF_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        files = convert_dcp_to_hf(
            args.checkpoint, args.output, model=args.model, flavor=args.flavor, hf_config=args.hf_config,
            dtype=args.dtype, max_shard_gb=args.max_shard_gb,
        )
    except (CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(f"convert_dcp_to_hf: error: {e}")
    print(f"wrote {', '.join(files)} to {args.output}")


def meta_to_dcp_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=META_TO_DCP_HELP)
    parser.add_argument("meta_dir", help="folder with params.json and consolidated.*.pth")
    parser.add_argument("output", help="DCP checkpoint directory to create")
    args = parser.parse_args(argv)
    try:
        state = meta_to_dcp(args.meta_dir, args.output)
    except pickle.UnpicklingError as e:
        # torch.load(weights_only=True) refused a pickle that would run code or build objects
        # other than tensors: a doctored file, never a real Meta shard.
        why = next((line.strip().rstrip(".") for line in str(e).splitlines() if "unsupported" in line.lower()), "")
        _meta_fail(f"{args.meta_dir}: a consolidated.*.pth file holds more than tensors and was refused "
                   f"(torch.load weights_only=True){': ' + why if why else ''}; a real Meta shard holds only tensors")
    except json.JSONDecodeError as e:  # the only JSON read is params.json
        _meta_fail(f"{Path(args.meta_dir) / 'params.json'}: not valid JSON ({e})")
    except (CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        _meta_fail(_first_line(e))
    except (RuntimeError, EOFError) as e:  # a truncated or non-PyTorch .pth
        _meta_fail(f"{args.meta_dir}: cannot load a consolidated.*.pth file: {_first_line(e)}")
    n = sum(v.numel() for v in state.values())
    print(f"wrote {len(state)} tensors ({n:,} parameters) to {args.output}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _meta_fail(message: str) -> None:
    """Bad input to the Meta conversion: one line on stderr, exit code 2 (as the trainer)."""
    print(f"convert_meta_to_dcp: error: {message}", file=sys.stderr)
    sys.exit(2)
