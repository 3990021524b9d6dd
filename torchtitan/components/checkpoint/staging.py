"""CPU staging for asynchronous saves: copy the state, then let a thread write the copy.

Training may change parameters as soon as ``stage`` returns, so the copy must be real even
for CPU tensors (``tensor.to("cpu")`` would alias them). ``reuse_buffers`` keeps the CPU
copies between saves, pinned when CUDA is there, so each save is one device-to-host copy
into memory allocated once (``checkpoint.async_mode = "async_with_pinned_mem"``); without
CUDA the buffers are plain CPU memory, reused the same way.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint import FileSystemWriter

__all__ = ["StateStager", "StagedWriter"]


class StateStager:
    """Copies a save state dict to CPU memory, tensors in ``tensor_groups`` into buffers
    kept between saves when ``reuse_buffers``; other groups are small Python objects and are
    deep-copied (the data loader mutates its token lists in place)."""

    def __init__(self, tensor_groups: tuple[str, ...], reuse_buffers: bool):
        self.tensor_groups = tensor_groups
        self.reuse_buffers = reuse_buffers
        self.pin_memory = reuse_buffers and torch.cuda.is_available()
        self._buffers: dict[str, Any] | None = None

    def stage(self, state: dict[str, Any]) -> dict[str, Any]:
        tensors = {k: v for k, v in state.items() if k in self.tensor_groups}
        staged: dict[str, Any] = {k: copy.deepcopy(v) for k, v in state.items() if k not in tensors}
        if not self.reuse_buffers:
            copies = _create_cpu_state_dict(tensors)
            _copy_state_dict(tensors, copies)
        else:
            copies = self._copy_into_buffers(tensors)
            if self.pin_memory:
                torch.cuda.synchronize()  # the non-blocking copies must land before writing
        staged.update(copies)
        return staged

    def _copy_into_buffers(self, tensors: dict[str, Any]) -> dict[str, Any]:
        if self._buffers is not None:
            try:
                return _copy_state_dict(tensors, self._buffers, non_blocking=self.pin_memory)
            except Exception:  # the structure changed (new keys or shapes): allocate anew
                self._buffers = None
        self._buffers = _create_cpu_state_dict(tensors, pin_memory=self.pin_memory)
        return _copy_state_dict(tensors, self._buffers, non_blocking=self.pin_memory)

    def close(self) -> None:
        self._buffers = None


class StagedWriter(FileSystemWriter):
    """A FileSystemWriter for state that ``StateStager`` already copied: DCP's own staging
    step (``async_save`` asks the writer to stage) passes it through untouched."""

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        return state_dict
