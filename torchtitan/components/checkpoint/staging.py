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
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.tensor import DTensor

__all__ = ["StateStager", "StagedWriter"]


class StateStager:
    """Copies a save state dict to CPU memory, tensors in ``tensor_groups`` into buffers
    kept between saves when ``reuse_buffers``; other groups are small Python objects and are
    deep-copied (the data loader mutates its token lists in place).

    Each tensor costs exactly one device-to-host copy into a buffer allocated for it (pinned
    straight from the host allocator when reused). torch's ``_create_cpu_state_dict`` was
    measured 20x slower on the 8B flavor (57-65 s for 45 GiB per rank): it first moves every
    DTensor to the CPU only to throw that copy away, and pins through a second host copy."""

    def __init__(self, tensor_groups: tuple[str, ...], reuse_buffers: bool):
        self.tensor_groups = tensor_groups
        self.reuse_buffers = reuse_buffers
        self.pin_memory = reuse_buffers and torch.cuda.is_available()
        self._buffers: dict[str, Any] | None = None

    def stage(self, state: dict[str, Any]) -> dict[str, Any]:
        staged: dict[str, Any] = {}
        previous = self._buffers or {}
        for key, value in state.items():
            if key in self.tensor_groups:
                staged[key] = self._copy(value, previous.get(key) if self.reuse_buffers else None)
            else:
                staged[key] = copy.deepcopy(value)
        if self.pin_memory:
            torch.cuda.synchronize()  # the non-blocking copies must land before writing
        if self.reuse_buffers:
            self._buffers = {k: v for k, v in staged.items() if k in self.tensor_groups}
        return staged

    def _copy(self, value: Any, buffer: Any) -> Any:
        """A CPU copy of ``value`` with the same structure, written into ``buffer`` (the
        previous save's copy) wherever its leaf still has the same shape and dtype."""
        if isinstance(value, dict):
            old = buffer if isinstance(buffer, dict) else {}
            return {k: self._copy(v, old.get(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            old = buffer if isinstance(buffer, type(value)) and len(buffer) == len(value) else [None] * len(value)
            return type(value)(self._copy(v, b) for v, b in zip(value, old))
        if isinstance(value, DTensor):
            old_local = buffer._local_tensor if isinstance(buffer, DTensor) else None
            local = self._copy_tensor(value._local_tensor, old_local)
            return DTensor(local, value._spec, requires_grad=False)  # same placement, CPU data
        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value, buffer if isinstance(buffer, torch.Tensor) else None)
        return copy.deepcopy(value)

    def _copy_tensor(self, tensor: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
        tensor = tensor.detach()
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pin = self.pin_memory and tensor.numel() > 0
            buffer = torch.empty_like(tensor, device="cpu", pin_memory=pin)
        return buffer.copy_(tensor, non_blocking=self.pin_memory)

    def close(self) -> None:
        self._buffers = None


class StagedWriter(FileSystemWriter):
    """A FileSystemWriter for state that ``StateStager`` already copied: DCP's own staging
    step (``async_save`` asks the writer to stage) passes it through untouched."""

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        return state_dict
