"""Helpers for test_resilience.py, on the trainer side and the test side.

Imported by the trainer through ``--experimental.custom_import resilience_driver`` (with
tests/distributed on PYTHONPATH), it registers a Llama 3 flavor small enough that a step
takes milliseconds on a CPU, so a launch costs little more than its start-up. The test
side reads a whole DCP checkpoint back in one process to compare runs bit for bit.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from torchtitan.models.llama3 import TransformerModelArgs, llama3_configs

FLAVOR = "resilience_test"

llama3_configs.setdefault(
    FLAVOR, TransformerModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16)
)


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
