"""Hugging Face safetensors folders through DCP: read into any layout, write from any layout.

Both directions go through ``torch.distributed.checkpoint`` with its Hugging Face storage
reader and writer, and through the model family's state-dict adapter
(``ModelSpec.state_dict_adapter``: ``to_hf`` / ``from_hf`` / ``hf_config``), so no model
family is named here and nothing hand-writes safetensors.

Loading: the model's own state dict (DTensors under FSDP/TP/EP, this rank's stages under PP)
is mapped to Hugging Face names with ``to_hf``; that mapped dict is the load template, so each
rank reads only the slices its shards need (resharding on load), then ``from_hf`` maps the
values back and they are set into the model. Writing: the same mapping, then every rank
writes its shards and the coordinator consolidates them into ``model-0000i-of-0000N.safetensors``
files with ``model.safetensors.index.json``; ``config.json`` comes from ``hf_config()``.

The adapters are written for full tensors. Applied to a DTensor, a row permutation (the
rotary layout of ``wq``/``wk``) runs sharded when every rank holds whole heads; when it does
not (e.g. 6 heads over 4 FSDP ranks) DTensor refuses the view and that tensor alone is
replicated for the conversion (all-gathered; costs its full size on each rank).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from torchtitan.components.checkpoint.folder import CheckpointError
from torchtitan.components.checkpoint.storage import SafeLoadPlanner, read_model_state, write_model_state

__all__ = [
    "HF_INDEX",
    "HF_MAX_SHARD_BYTES",
    "hf_storage",
    "is_hf_folder",
    "read_hf_index",
    "to_hf_state",
    "from_hf_state",
    "load_hf",
    "read_hf_state",
    "save_hf",
    "hf_to_dcp",
    "dcp_to_hf",
]

HF_INDEX = "model.safetensors.index.json"
HF_MAX_SHARD_BYTES = 5 * 2**30  # largest safetensors file written (Hugging Face's default is 5 GB)
_SHARDED = "sharded"  # the per-rank files' subfolder, removed once consolidated
_IGNORED_HF_KEYS = ("rotary_emb.inv_freq",)  # buffers some old exports hold


def hf_storage() -> tuple[type, type]:
    """DCP's ``(HuggingFaceStorageReader, HuggingFaceStorageWriter)``; a one-line error on a
    torch without them, or whose writer cannot save distributed and consolidate (torch 2.9+:
    the API this module uses, checked on torch 2.11 and 2.13)."""
    try:
        from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
    except ImportError:
        try:
            from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
        except ImportError:
            raise CheckpointError(
                f"torch {torch.__version__} has no torch.distributed.checkpoint.HuggingFaceStorageReader/"
                "Writer: Hugging Face weights in the training loop need torch >= 2.9 (or convert "
                "offline with scripts/convert_hf_to_dcp.py on a newer torch)"
            ) from None
    params = inspect.signature(HuggingFaceStorageWriter.__init__).parameters
    missing = [p for p in ("fqn_to_index_mapping", "save_distributed", "enable_consolidation") if p not in params]
    if missing:
        raise CheckpointError(
            f"torch {torch.__version__}'s HuggingFaceStorageWriter lacks {', '.join(missing)}: "
            "writing Hugging Face weights from a sharded run needs torch >= 2.9"
        )
    return HuggingFaceStorageReader, HuggingFaceStorageWriter


def is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and any(name.endswith(".safetensors") for name in os.listdir(path))


def read_hf_index(path: str) -> dict[str, int] | None:
    """``{hf_key: file number}`` from a folder's ``model.safetensors.index.json`` (file names
    ``model-0000i-of-0000N.safetensors``, Hugging Face's convention), or None."""
    file = os.path.join(path, HF_INDEX)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        weight_map = json.load(f).get("weight_map", {})
    names = sorted(set(weight_map.values()))
    number = {name: i + 1 for i, name in enumerate(names)}
    return {key: number[name] for key, name in weight_map.items()}


# ---- the adapter on (possibly sharded) tensors ----------------------------------------------
def _replicated(value: torch.Tensor) -> torch.Tensor:
    if isinstance(value, DTensor) and not all(p.is_replicate() for p in value.placements):
        return value.redistribute(value.device_mesh, [Replicate()] * value.device_mesh.ndim)
    return value


def _storable(out: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> bool:
    """Whether DCP can store each DTensor of ``out`` as it is: every rank's piece one block
    of the global tensor. Plain Shard/Replicate placements are; a strided shard only when it
    is the input's own layout (a permutation that kept whole heads on each rank). A row
    permutation across a strided shard (FSDP over TP holding half a head) is not."""
    layouts = {(v.device_mesh, tuple(v.placements)) for v in state.values() if isinstance(v, DTensor)}
    for v in out.values():
        if not isinstance(v, DTensor):
            continue
        if (v.device_mesh, tuple(v.placements)) in layouts:
            continue
        if not all(p.is_replicate() or type(p).__name__ == "Shard" for p in v.placements):
            return False
    return True


def _convert(fn: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``fn(state)``; when DTensor cannot run the adapter's ops sharded, or gives a layout
    DCP cannot store, again on replicas. (How DTensor fails differs between torch versions:
    torch 2.11 runs a head-splitting view on the local shard with the global shape and
    raises a plain shape error, so any failure is retried; one that is the adapter's own
    comes back from the replicas.)"""
    if not any(isinstance(v, DTensor) for v in state.values()):
        return fn(state)
    try:
        out = fn(state)
    except (RuntimeError, NotImplementedError, AssertionError, ValueError):
        out = None
    if out is not None and _storable(out, state):
        return out
    return fn({k: _replicated(v) for k, v in state.items()})


def to_hf_state(adapter: Any, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our state dict in Hugging Face names, key by key, and ``{hf_key: our key}``. Keys the
    adapter drops (tied output, MoE load-balancing buffers) have no Hugging Face key."""
    hf_state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        for hf_key, hf_value in _convert(adapter.to_hf, {key: value}).items():
            hf_state[hf_key] = hf_value
            origin[hf_key] = key
    return hf_state, origin


def from_hf_state(
    adapter: Any, hf_state: Mapping[str, torch.Tensor], origin: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Hugging Face values back to ours: each of our keys from the Hugging Face keys it was
    mapped to; a key whose Hugging Face tensors are absent (e.g. a tied ``lm_head``) from
    what the adapter derives from the others (the embedding)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for hf_key, value in hf_state.items():
        groups.setdefault(origin[hf_key], {})[hf_key] = value
    ours: dict[str, torch.Tensor] = {}
    derived: dict[str, torch.Tensor] = {}
    for key, group in groups.items():
        for k, v in _convert(adapter.from_hf, group).items():
            if k == key:
                ours[k] = v
            else:
                derived.setdefault(k, v)
    for k, v in derived.items():
        ours.setdefault(k, v)
    return ours


def _like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` laid out as the model's ``target`` (same mesh and placements, or plain)."""
    if isinstance(target, DTensor):
        if isinstance(value, DTensor):
            if value.device_mesh == target.device_mesh and tuple(value.placements) == tuple(target.placements):
                return value
            value = value.full_tensor()
        return distribute_tensor(value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
    return value.full_tensor() if isinstance(value, DTensor) else value


def _model_state(model_parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for part in model_parts:
        state.update(get_model_state_dict(part))
    return state


def _gather_union(items: Any, distributed: bool) -> list[Any]:
    if not distributed:
        return [items]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return gathered


def _describe(e: BaseException) -> str:
    if isinstance(e, CheckpointException) and e.failures:
        rank = min(e.failures)
        return f"rank {rank}: {_describe(e.failures[rank][0])}"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


# ---- loading ----------------------------------------------------------------------------
def load_hf(path: str, model_parts: list[nn.Module], adapter: Any) -> None:
    """Read the Hugging Face folder ``path`` into the (possibly sharded) model. Collective
    when a process group exists. Shapes and names are checked first (one-line errors)."""
    reader_cls, _ = hf_storage()
    if not is_hf_folder(path):
        raise CheckpointError(
            f"Hugging Face folder {path} holds no *.safetensors files (checkpoint.initial_load_in_hf reads "
            "the model's weights from it: download them, or turn the option off)"
        )
    distributed = dist.is_available() and dist.is_initialized()
    state = _model_state(model_parts)
    template, origin = to_hf_state(adapter, state)
    stored = reader_cls(path).read_metadata().state_dict_metadata
    problem = None
    for hf_key, value in template.items():
        if hf_key in stored and tuple(stored[hf_key].size) != tuple(value.shape):
            problem = (
                f"Hugging Face folder {path} does not fit this model: {hf_key} is {tuple(stored[hf_key].size)} "
                f"there but {tuple(value.shape)} here (is model.flavor the folder's config.json?)"
            )
            break
    missing = {k for k in template if k not in stored}
    for hf_key in missing:
        del template[hf_key]
    # Tensors the model has no place for by design (DeepSeek-V3's multi-token-prediction layer).
    ignored = getattr(adapter, "ignores_hf_key", lambda key: False)
    extra = {
        k for k in stored
        if k not in template and k not in missing and not k.endswith(_IGNORED_HF_KEYS) and not ignored(k)
    }
    # PP: a rank holds its stages only; a stored key is unexpected if no rank wants it.
    reports = _gather_union((problem, extra), distributed)
    problem = next((p for p, _ in reports if p is not None), None)
    extra = set.intersection(*(e for _, e in reports))
    if problem:
        raise CheckpointError(problem)
    if extra:
        raise CheckpointError(
            f"Hugging Face folder {path} has {min(extra)}, which this model lacks: is model.flavor the "
            "folder's config.json?"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                template, storage_reader=reader_cls(path), planner=SafeLoadPlanner(), no_dist=not distributed
            )
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"cannot read Hugging Face folder {path} ({_describe(e)})") from e
    ours = from_hf_state(adapter, template, origin)
    kept_hf = {our for hf, our in origin.items()}  # our keys that have a Hugging Face tensor
    absent = sorted(k for k in state if k in kept_hf and k not in ours)
    if absent:
        wanted = sorted(hf for hf, our in origin.items() if our == absent[0])
        raise CheckpointError(f"Hugging Face folder {path} lacks {wanted[0]} (this model's {absent[0]})")
    options = StateDictOptions(strict=False)  # each pipeline stage takes its own keys
    values = {k: _like(v, state[k]) for k, v in ours.items() if k in state}
    for part in model_parts:
        set_model_state_dict(part, values, options=options)


def read_hf_state(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder, full, on the CPU, in its stored dtype, with
    Hugging Face's names (for the offline conversion: no model, no process group)."""
    reader_cls, _ = hf_storage()
    if not is_hf_folder(path):
        raise CheckpointError(f"{path} holds no *.safetensors files (expected a Hugging Face model folder)")
    stored = reader_cls(path).read_metadata().state_dict_metadata
    template = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in stored.items()}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(template, storage_reader=reader_cls(path), planner=SafeLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"cannot read Hugging Face folder {path} ({_describe(e)})") from e
    return template


# ---- writing ----------------------------------------------------------------------------
def _file_index(sizes: list[tuple[str, int]], max_shard_bytes: int) -> dict[str, int]:
    """Keys (in order) to file numbers 1..N, each file at most ``max_shard_bytes`` (a
    tensor larger than that gets a file of its own)."""
    index: dict[str, int] = {}
    number, used = 1, 0
    for key, nbytes in sizes:
        if used and used + nbytes > max_shard_bytes:
            number, used = number + 1, 0
        index[key] = number
        used += nbytes
    return index


def save_hf(
    path: str,
    model_parts: list[nn.Module],
    adapter: Any,
    *,
    dtype: torch.dtype | None = None,
    file_index: Mapping[str, int] | None = None,
    max_shard_bytes: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> list[str]:
    """Write the model (or ``state``, full or sharded tensors with our names) as a Hugging
    Face folder at ``path`` (created; must not exist): safetensors files numbered as
    ``file_index`` says (else cut at ``max_shard_bytes``), ``model.safetensors.index.json``
    and ``config.json``. Collective when a process group exists; returns the files (on
    rank 0; an empty list elsewhere)."""
    _, writer_cls = hf_storage()
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    if state is None:
        state = _model_state(model_parts)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    hf_state, _ = to_hf_state(adapter, state)
    sizes = [(k, v.numel() * v.element_size()) for k, v in hf_state.items()]
    all_sizes: list[tuple[str, int]] = []
    seen: set[str] = set()
    for rank_sizes in _gather_union(sizes, distributed):
        for key, nbytes in rank_sizes:
            if key not in seen:
                seen.add(key)
                all_sizes.append((key, nbytes))
    if file_index is None or set(file_index) != seen:
        file_index = _file_index(all_sizes, HF_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes)
    writer = writer_cls(
        path, fqn_to_index_mapping=dict(file_index), save_distributed=True, enable_consolidation=True
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(hf_state, storage_writer=writer, no_dist=not distributed)
    files: list[str] = []
    if rank == 0:
        shutil.rmtree(os.path.join(path, _SHARDED), ignore_errors=True)
        stored = next((v.dtype for v in hf_state.values() if v.is_floating_point()), torch.float32)
        config = adapter.hf_config(torch_dtype=str(stored).removeprefix("torch."))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        files = sorted(os.listdir(path))
    if distributed:
        dist.barrier()  # the folder is complete for every rank (rank 0 may rename it next)
    return files


# ---- offline conversion (scripts/convert_hf_to_dcp.py, convert_dcp_to_hf.py) -------------
def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def hf_to_dcp(hf_dir: str, output: str, adapter_cls: Any, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A Hugging Face folder to a weights-only DCP checkpoint (our names, marked complete:
    usable as ``checkpoint.initial_load_path`` or as a seed checkpoint). The model's args come
    from the folder's config.json through ``adapter_cls.args_from_hf_config``."""
    config_file = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} does not exist: pass a Hugging Face model folder")
    with open(config_file) as f:
        adapter = adapter_cls(adapter_cls.args_from_hf_config(json.load(f)))
    state = _cast(adapter.from_hf(read_hf_state(hf_dir)), dtype)
    if hasattr(adapter, "check"):
        adapter.check(state)
    write_model_state(state, output)
    return state


def dcp_to_hf(
    checkpoint: str,
    output: str,
    adapter: Any,
    *,
    config: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
) -> list[str]:
    """A DCP checkpoint's model weights (full or weights-only checkpoint) to a Hugging Face
    folder, through the same writer as ``checkpoint.last_save_in_hf``; ``config`` replaces
    the adapter's config.json. Returns the files written."""
    state = _cast(read_model_state(checkpoint), dtype)
    if hasattr(adapter, "check"):
        adapter.check(state)
    if os.path.isdir(output) and os.listdir(output):
        raise CheckpointError(f"{output} exists and is not empty: choose a new output folder")
    files = save_hf(output, [], adapter, state=state, max_shard_bytes=max_shard_bytes)
    if config is not None:
        with open(os.path.join(output, "config.json"), "w") as f:
            json.dump(dict(config), f, indent=2)
            f.write("\n")
    return files
