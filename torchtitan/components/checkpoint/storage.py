"""Reading DCP checkpoints with one-line errors, and model-only checkpoints for scripts.

DCP reports a bad checkpoint as a multi-rank traceback, often from inside a collective. The
manager checks the load template against the checkpoint's metadata first (missing states,
missing keys, shape mismatches) so the common mistakes read as one line naming the key.
"""

from __future__ import annotations

import os
import secrets
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from torchtitan.components.checkpoint.folder import CheckpointError, finalize

__all__ = [
    "MODEL",
    "describe_error",
    "read_metadata",
    "flatten",
    "check_template",
    "unexpected_model_keys",
    "load_state",
    "read_model_state",
    "write_model_state",
]

MODEL = "model"

_HINTS = {
    MODEL: "was it saved from another model.flavor or tokenizer?",
    "dataloader": "the data layout differs (training.dataset_shards, data parallel degree): keep "
    "it, or add dataloader to checkpoint.exclude_from_loading",
}


def describe_error(e: BaseException) -> str:
    """One line for an exception; for DCP's multi-rank CheckpointException, the first
    failing rank's underlying error."""
    if isinstance(e, CheckpointException) and e.failures:
        rank = min(e.failures)
        inner, _ = e.failures[rank]
        return f"rank {rank}: {describe_error(inner)}"
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    first = text[0] if len(text[0]) <= 200 else text[0][:200] + "..."
    return f"{type(e).__name__}: {first}"


def read_metadata(path: str) -> Metadata:
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(
            f"{path} is not a complete DCP checkpoint (no .metadata file); for Hugging Face or "
            "Meta weights run scripts/convert_hf_to_dcp.py or scripts/convert_meta_to_dcp.py first"
        )
    try:
        return FileSystemReader(path).read_metadata()
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: cannot read .metadata ({describe_error(e)})"
        ) from e


def flatten(state: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(key, leaf)`` pairs with DCP's key names: nested dict keys joined with dots.
    Empty dicts have no leaves, as in DCP."""
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, name + ".")
        else:
            yield name, value


def check_template(template: Mapping[str, Any], metadata: Metadata, path: str) -> str | None:
    """The first problem loading ``template`` from the checkpoint would hit, as one line;
    None when every key is there with the same global shape."""
    stored = metadata.state_dict_metadata
    present = sorted({key.split(".", 1)[0] for key in stored})
    for group in template:
        if group not in present:
            return (
                f"checkpoint {path} holds no {group} state (only {', '.join(present)}); add "
                f"{group} to checkpoint.exclude_from_loading or load a full checkpoint"
            )
    for key, value in flatten(template):
        group = key.split(".", 1)[0]
        if key not in stored:
            hint = _HINTS.get(group, "was it saved by another version or configuration?")
            return f"checkpoint {path} lacks {key}: {hint}"
        if isinstance(value, torch.Tensor):
            meta = stored[key]
            if not isinstance(meta, TensorStorageMetadata):
                return f"checkpoint {path} holds {key} as an object, not a tensor"
            if tuple(meta.size) != tuple(value.shape):
                return (
                    f"checkpoint {path} does not fit this model: {key} is "
                    f"{tuple(meta.size)} there but {tuple(value.shape)} here; "
                    f"{_HINTS.get(group, '')}".rstrip("; ")
                )
    return None


def unexpected_model_keys(template: Mapping[str, Any], metadata: Metadata) -> set[str]:
    """Model tensors of the checkpoint that this rank's template lacks (with pipeline
    parallelism each rank holds a part: only keys that no rank has are unexpected)."""
    ours = {key for key, _ in flatten({MODEL: template.get(MODEL, {})})}
    return {
        key
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(MODEL + ".") and isinstance(meta, TensorStorageMetadata)
    } - ours


def load_state(template: dict[str, Any], path: str, *, no_dist: bool = False) -> None:
    """``dcp.load`` into ``template`` in place; any failure becomes one CheckpointError line."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(template, checkpoint_id=path, no_dist=no_dist)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(
            f"cannot load checkpoint {path} ({describe_error(e)}): it is corrupt or truncated, "
            "or from an incompatible torch version"
        ) from e


def read_model_state(path: str) -> dict[str, torch.Tensor]:
    """All model weights of a checkpoint (full or weights-only), as full tensors on the CPU
    in their stored dtype, keyed by parameter name. Needs no model and no process group."""
    metadata = read_metadata(path)
    prefix = MODEL + "."
    template = {
        key[len(prefix) :]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not template:
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    load_state({MODEL: template}, path, no_dist=True)
    return template


def write_model_state(state: Mapping[str, torch.Tensor], path: str, step: int = 0) -> None:
    """Write a model-weights-only checkpoint (what conversions produce) to ``path``, with
    the completion marker, so it works as ``checkpoint.initial_load_path`` or, named
    ``step-0`` inside a checkpoint folder, as a seed checkpoint."""
    path = os.path.abspath(path)
    if os.path.lexists(path):
        raise CheckpointError(f"{path} already exists: choose a new output path or remove it")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({MODEL: dict(state)}, checkpoint_id=tmp, no_dist=True)
    finalize(tmp, path, step, [MODEL])
