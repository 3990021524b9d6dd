"""Distributed checkpointing (DCP): the manager, the folder layout and model-only I/O.

See docs/checkpoint.md for what is saved, the on-disk layout and the conversion scripts.
"""

from torchtitan.components.checkpoint.folder import (
    MARKER,
    CheckpointError,
    CheckpointInfo,
    list_checkpoints,
)
from torchtitan.components.checkpoint.manager import (
    CheckpointManager,
    Stateful,
)
from torchtitan.components.checkpoint.storage import read_model_state, write_model_state

__all__ = [
    "MARKER",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "Stateful",
    "list_checkpoints",
    "read_model_state",
    "write_model_state",
]
