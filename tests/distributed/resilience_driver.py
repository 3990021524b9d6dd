"""Helpers for test_resilience.py, on the trainer side and the test side.

Imported by the trainer through ``--experimental.custom_import resilience_driver`` (with
tests/distributed on PYTHONPATH), it registers a Llama 3 flavor small enough that a step
takes milliseconds on a CPU, so a launch costs little more than its start-up (plus a deeper
one, to resume a checkpoint into the wrong shape). The test side writes the
plain-text data the runs train on and reads a whole DCP checkpoint back in one process to
compare runs bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from torchtitan.models.llama3 import TransformerModelArgs, llama3_configs

FLAVOR = "resilience_test"
FLAVOR_DEEP = "resilience_test_deep"  # 3 layers instead of 2: a checkpoint of FLAVOR does not fit

for _name, _layers in ((FLAVOR, 2), (FLAVOR_DEEP, 3)):
    llama3_configs.setdefault(
        _name, TransformerModelArgs(dim=64, n_layers=_layers, n_heads=4, n_kv_heads=2, multiple_of=16)
    )

BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "bundled" / "part-00000.jsonl"


def write_text_data(folder: Path, files: int, docs_per_file: int) -> list[Path]:
    """``files`` plain-text files of ``docs_per_file`` bundled documents each, one per line
    (``training.dataset = "text"``: read line by line while training, no Arrow cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(BUNDLED, encoding="utf-8") as f:
        docs = [json.loads(line)["text"].replace("\n", " ") for _, line in zip(range(files * docs_per_file), f)]
    paths = []
    for i in range(files):
        path = folder / f"part-{i}.txt"
        path.write_text("".join(d + "\n" for d in docs[i * docs_per_file : (i + 1) * docs_per_file]), encoding="utf-8")
        paths.append(path)
    return paths


def read_checkpoint(path: str) -> dict[str, Any]:
    """Every state of the DCP checkpoint at ``path``, as full tensors, without a process group."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(
        state, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True
    )
    return state


def flat_tensors(state: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """``{"model.layers.0...": tensor}`` for every tensor of a nested state dict."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_tensors(value, name + "."))
        elif isinstance(value, torch.Tensor):
            out[name] = value
    return out


def weights_and_optimizer(path: str) -> dict[str, torch.Tensor]:
    """The model and optimizer tensors of a checkpoint: what bit-exact resume must reproduce."""
    state = read_checkpoint(path)
    return {k: v for k, v in flat_tensors(state).items() if k.split(".")[0] in ("model", "optimizer")}


def complete_steps(folder: str) -> list[int]:
    """Steps with a complete (``COMPLETE``-marked) checkpoint in ``folder``."""
    if not os.path.isdir(folder):
        return []
    steps = []
    for name in os.listdir(folder):
        if name.startswith("step-") and name[5:].isdigit():
            if os.path.isfile(os.path.join(folder, name, "COMPLETE")):
                steps.append(int(name[5:]))
    return sorted(steps)
