"""CPU staging for asynchronous saves: copy the state, then let a thread write the copy.

Training may change parameters as soon as ``stage`` returns, so the copy must be real even
for CPU tensors (``tensor.to("cpu")`` would alias them). The CPU copies are kept between
saves (one save is in flight at most), so each save is one device-to-host copy into memory
allocated once: page-locked with ``checkpoint.async_mode = "async_with_pinned_mem"`` when
CUDA is there, pageable with ``async``.

How that memory is obtained decides what the first save costs (measured on an H200 host,
torch 2.11, docs/checkpoint.md). Fresh pageable buffers fault their pages in during the
copy (the 3B flavor's 38 GB: 32 s blocked); torch's pinned allocator (``cudaHostAlloc``)
pins at 1.9 GB/s and stalls every other thread's CUDA calls while it runs (the 8B flavor's
first save: 30 s). So the buffers are views into one host arena that a background thread
allocates, touches and, for the pinned mode, page-locks in place with ``cudaHostRegister``
(8.4 GB/s, training undisturbed) as soon as the state's shapes are known (``reserve``, after
the first step); a save then only copies (~50 GB/s pinned, ~9 GB/s pageable).
"""

from __future__ import annotations

import copy
import ctypes
import math
import threading
import time
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from torchtitan.components.checkpoint.checksum import ChecksumWriter
from torchtitan.tools.logging import logger

__all__ = ["HostArena", "StateStager", "StagedWriter"]

_ALIGN = 64  # bytes between buffers in the arena: every dtype's alignment
_PAGE = 4096
_REGION = 256 << 20  # page-lock about 256 MiB per call, so no call holds the driver for long


class HostArena:
    """One host allocation carved into tensors, page-locked in place when ``pin``, one
    ``regions`` entry (start, end) per ``cudaHostRegister`` call: a copy must not span two
    registrations (CUDA rejects it as an invalid argument), so no tensor crosses a region."""

    def __init__(self, nbytes: int, regions: list[tuple[int, int]], pin: bool):
        self.regions = regions
        nbytes = -(-max(nbytes, 1) // _PAGE) * _PAGE
        raw = torch.empty(nbytes + _PAGE, dtype=torch.uint8)
        start = -raw.data_ptr() % _PAGE  # page-aligned, so register chunks never share a page
        self.data = raw[start : start + nbytes]
        self.data.zero_()  # fault every page in now rather than during a save's copy
        self._registered: list[int] = []
        if pin:
            self._register()

    def _register(self) -> None:
        cudart = torch.cuda.cudart()
        base = self.data.data_ptr()
        for start, end in self.regions:
            ptr = base + start
            began = time.perf_counter()
            err = cudart.cudaHostRegister(ptr, end - start, 0)
            # Registering holds a driver lock the training thread's CUDA calls wait on (back
            # to back calls stalled training for ~4 of the 4.6 s 40 GiB took): pause as long
            # as the call took. Measured: no step slowed, the arena ready in 15 s not 6.7.
            time.sleep(time.perf_counter() - began)
            if int(err) != 0:
                logger.warning(f"checkpoint: cudaHostRegister failed ({err}); staging into pageable memory")
                self.release()
                return
            self._registered.append(ptr)

    @property
    def pinned(self) -> bool:
        return bool(self._registered)

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor on ``nbytes`` of the arena with a storage of its own size: DCP's writer
        clones any tensor whose storage is larger than the tensor (a plain slice would be)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        raw = (ctypes.c_uint8 * nbytes).from_address(self.data.data_ptr() + offset)
        raw.arena = self.data  # the memory lives as long as any view of it
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(shape)

    def release(self) -> None:
        if self._registered:
            cudart = torch.cuda.cudart()
            for ptr in self._registered:
                cudart.cudaHostUnregister(ptr)
            self._registered = []


class StateStager:
    """Copies a save state dict to CPU memory, tensors in ``tensor_groups`` into buffers
    kept between saves; other groups are small Python objects and are
    deep-copied (the data loader mutates its token lists in place).

    Each tensor costs exactly one device-to-host copy into a buffer allocated for it. torch's
    ``_create_cpu_state_dict`` was measured 20x slower on the 8B flavor (57-65 s for 45 GiB
    per rank): it first moves every DTensor to the CPU only to throw that copy away, and pins
    through a second host copy."""

    def __init__(self, tensor_groups: tuple[str, ...], pin_memory: bool):
        self.tensor_groups = tensor_groups
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._buffers: dict[str, Any] | None = None
        self._arena: HostArena | None = None
        self._reserving: threading.Thread | None = None
        self.reserve_seconds: float | None = None  # how long the background allocation took

    def reserve(self, state: dict[str, Any]) -> None:
        """Start allocating the buffers ``state``'s tensors will be staged into, on a thread;
        ``stage`` waits for it. Only shapes are read here, on the caller's thread."""
        if self._buffers is not None or self._reserving is not None:
            return
        layout = _Layout()
        shapes = {k: layout.add(v) for k, v in state.items() if k in self.tensor_groups}

        def allocate() -> None:
            started = time.perf_counter()
            self._arena = HostArena(layout.nbytes, layout.regions(), pin=self.pin_memory)
            self._buffers = {k: _carve(v, self._arena) for k, v in shapes.items()}
            self.reserve_seconds = time.perf_counter() - started
            logger.info(
                f"checkpoint: {layout.nbytes / 2**30:.1f} GiB of {'page-locked' if self._arena.pinned else 'pageable'} "
                f"staging memory ready in {self.reserve_seconds:.1f}s (allocated in the background)"
            )

        self._reserving = threading.Thread(target=allocate, name="checkpoint-reserve", daemon=True)
        self._reserving.start()

    def wait_reserved(self) -> None:
        if self._reserving is not None:
            self._reserving.join()
            self._reserving = None

    def stage(self, state: dict[str, Any]) -> dict[str, Any]:
        if self._buffers is None:
            self.reserve(state)
        self.wait_reserved()
        staged: dict[str, Any] = {}
        previous = self._buffers or {}
        for key, value in state.items():
            if key in self.tensor_groups:
                staged[key] = self._copy(value, previous.get(key))
            else:
                staged[key] = copy.deepcopy(value)
        if self.pin_memory:
            torch.cuda.synchronize()  # the non-blocking copies must land before writing
        self._buffers = {k: v for k, v in staged.items() if k in self.tensor_groups}
        return staged

    def _copy(self, value: Any, buffer: Any) -> Any:
        """A CPU copy of ``value`` with the same structure, written into ``buffer`` (the
        previous save's copy) wherever its leaf still has the same shape and dtype."""
        if isinstance(value, dict):
            old = buffer if isinstance(buffer, dict) else {}
            return {k: self._copy(v, old.get(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            fits = isinstance(buffer, (list, tuple)) and len(buffer) == len(value)
            old = buffer if fits else [None] * len(value)
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
            # A tensor the reserved layout did not foresee: pageable (pinning it on the spot
            # would stall the GPU), kept for later saves all the same.
            buffer = torch.empty_like(tensor, device="cpu")
        return buffer.copy_(tensor, non_blocking=self.pin_memory)

    def close(self) -> None:
        self.wait_reserved()
        self._buffers = None
        if self._arena is not None:
            self._arena.release()
            self._arena = None


class _Slot:
    """Where one tensor's copy lives in the arena, and how to rebuild it (DTensor spec)."""

    def __init__(self, tensor: torch.Tensor, offset: int):
        self.spec = None
        if isinstance(tensor, DTensor):
            self.spec, tensor = tensor._spec, tensor._local_tensor
        self.shape, self.dtype, self.offset = tuple(tensor.shape), tensor.dtype, offset
        self.nbytes = tensor.numel() * tensor.element_size()


class _Layout:
    """Assigns each tensor of a state tree an aligned offset in one arena, grouped into
    page-aligned regions of about ``_REGION`` bytes (a larger tensor gets one to itself)."""

    def __init__(self) -> None:
        self.nbytes = 0
        self._starts = [0]

    def regions(self) -> list[tuple[int, int]]:
        ends = self._starts[1:] + [-(-self.nbytes // _PAGE) * _PAGE]
        return [(a, b) for a, b in zip(self._starts, ends) if b > a]

    def add(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self.add(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.add(v) for v in value]
        if isinstance(value, torch.Tensor):
            slot = _Slot(value, self.nbytes)
            if self.nbytes > self._starts[-1] and self.nbytes + slot.nbytes - self._starts[-1] > _REGION:
                self.nbytes = -(-self.nbytes // _PAGE) * _PAGE  # start a new region
                self._starts.append(self.nbytes)
                slot.offset = self.nbytes
            self.nbytes += -(-slot.nbytes // _ALIGN) * _ALIGN
            return slot
        return None


def _carve(value: Any, arena: HostArena) -> Any:
    if isinstance(value, dict):
        return {k: _carve(v, arena) for k, v in value.items()}
    if isinstance(value, list):
        return [_carve(v, arena) for v in value]
    if isinstance(value, _Slot):
        local = arena.view(value.offset, value.shape, value.dtype)
        return local if value.spec is None else DTensor(local, value.spec, requires_grad=False)
    return None


class StagedWriter(ChecksumWriter):
    """A (checksumming) FileSystemWriter for state that ``StateStager`` already copied:
    DCP's own staging step (``async_save`` asks the writer to stage) passes it through
    untouched."""

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        return state_dict
