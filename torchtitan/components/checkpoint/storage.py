"""Reading DCP checkpoints with one-line errors, and model-only checkpoints for scripts.

DCP reports a bad checkpoint as a multi-rank traceback, often from inside a collective. The
manager checks the load template against the checkpoint's metadata first (missing states,
missing keys, shape mismatches) so the common mistakes read as one line naming the key.

Loading runs no code from the checkpoint. DCP itself unpickles ``.metadata`` with plain
``pickle`` and every non-tensor entry (step, data position, optimizer hyper-parameters)
with ``torch.load(weights_only=False)``, so a crafted file would run whatever it names.
``SafeFileSystemReader`` and ``SafeLoadPlanner`` read the same files with an allowlist of
DCP's own record types and with ``weights_only=True``; every load goes through them.
``.metadata`` also names the file each entry is read from: a name that leaves the
checkpoint folder (absolute, ``..``, a symlink out) is refused, so a crafted file cannot
make a load read another run's weights.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import os
import pickle
import re
import secrets
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from torchtitan.components.checkpoint.checksum import ChecksumWriter
from torchtitan.components.checkpoint.folder import CheckpointError, finalize

__all__ = [
    "MODEL",
    "SafeFileSystemReader",
    "SafeLoadPlanner",
    "UnsafeCheckpoint",
    "check_storage_paths",
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


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``, refusing every global but the record types it holds:
    DCP's dataclasses and enums, torch sizes, dtypes and layouts, and paths. The check is
    made before the named module is imported, so a crafted file imports nothing either."""

    _ALLOWED = {
        "torch": {"Size"},
        "torch.serialization": {"_get_layout"},
        "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
        "collections": {"OrderedDict"},
        "builtins": {"set", "frozenset"},
    }

    def find_class(self, module: str, name: str) -> Any:
        if name in self._ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("torch.distributed.checkpoint.") and "." not in name:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise pickle.UnpicklingError(
            f"it names {module}.{name}, which a DCP checkpoint never holds (refused: loading it could run code)"
        )


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint that no fallback should touch: its ``.metadata`` reads outside the folder."""


def check_storage_paths(metadata: Metadata, path: str) -> None:
    """Refuse a ``.metadata`` whose entries are read from outside checkpoint ``path``."""
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise UnsafeCheckpoint(f"checkpoint {path} refused: its .metadata has no file table")
    root = os.path.realpath(path)
    checked: set[str] = set()
    for info in storage.values():
        name = getattr(info, "relative_path", None)
        if name in checked:
            continue
        text = os.fspath(name) if isinstance(name, (str, os.PathLike)) else None
        inside = (
            isinstance(text, str)
            and text not in ("", ".")
            and not os.path.isabs(text)
            and ".." not in re.split(r"[\\/]", text)
            and os.path.dirname(os.path.realpath(os.path.join(root, text))) == root
        )
        if not inside:
            raise UnsafeCheckpoint(
                f"checkpoint {path} refused: its .metadata reads {name!r}, which is not a file of "
                "the checkpoint folder (a crafted or damaged .metadata)"
            )
        checked.add(name)


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, with ``.metadata`` read by ``_MetadataUnpickler`` and its file
    names checked to stay in the folder. (No ``rank`` argument: DCP then never falls back
    to per-rank metadata, which these checkpoints lack.)"""

    def read_metadata(self) -> Metadata:
        with self.fs.create_stream(self.fs.concat_path(self.path, ".metadata"), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"it holds a {type(metadata).__name__}, not DCP Metadata")
        check_storage_paths(metadata, os.fspath(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor entries are unpickled with
    ``torch.load(weights_only=True)`` (plain data only) instead of ``weights_only=False``.

    The checked object is serialized again for the default implementation, which then
    files it into the state dict exactly as before (flattened keys included), so this
    does not depend on the planner's internals."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            named = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the global it refused
            what = f"names {named.group(1)}" if named else "is not plain data"
            raise CheckpointError(
                f"entry {read_item.dest_index.fqn} {what} (refused: loading it could run code)"
            ) from None
        checked = io.BytesIO()
        torch.save(obj, checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)


def read_metadata(path: str) -> Metadata:
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(
            f"{path} is not a complete DCP checkpoint (no .metadata file); for Hugging Face or "
            "Meta weights run scripts/convert_hf_to_dcp.py or scripts/convert_meta_to_dcp.py first"
        )
    try:
        return SafeFileSystemReader(path).read_metadata()
    except CheckpointError:
        raise
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
        if group not in stored and not any(key.startswith(group + ".") for key in stored):
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
            dcp.load(
                template,
                checkpoint_id=path,
                storage_reader=SafeFileSystemReader(path),
                planner=SafeLoadPlanner(),
                no_dist=no_dist,
            )
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
        writer = ChecksumWriter(tmp)
        dcp.save({MODEL: dict(state)}, checkpoint_id=tmp, storage_writer=writer, no_dist=True)
    finalize(tmp, path, step, [MODEL], writer.checksums)
