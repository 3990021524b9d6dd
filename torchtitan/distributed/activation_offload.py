"""Activation offload: what chosen blocks keep for backward waits in pinned host memory.

At long sequences the activations a block keeps for backward (with full AC its input: at
65,536 tokens on the 3B shape 0.75 GiB in fp32) are what stops a faster AC policy from
fitting, while the block's compute dwarfs moving them (a 3B block's forward at 65k tokens
takes ~90 ms; its input crosses PCIe 5.0 in ~15-30 ms). ``activation_checkpoint.
cpu_offload_layers = N`` keeps the saved tensors of N blocks on the host from their forward
to their backward, spread evenly from block 0 (:func:`offloaded_layers`): at short
sequences one block's copy outlasts its forward (3B at 16k tokens: ~1 GiB, ~20 ms over
PCIe against ~9 ms of compute), and spread out each copy has the forwards of the blocks up
to the next offloaded one to hide behind, where N consecutive blocks would stall on their
copies. The last two blocks, whose backward follows their forward at once, go only when
more than the others are asked for. The host copies are exact-size pinned buffers, kept
for the next step (:class:`_PinnedPool`; torch's pinned allocator rounds each up to a power
of two: measured 75 GiB pinned for 54 GiB offloaded).

How: each chosen block's forward runs under ``torch.autograd.graph.saved_tensors_hooks``.
Every tensor autograd saves there passes through ``pack``: a compiled block's saved tensors
(AOTAutograd saves them all at the end of the block's forward) and an eager block's, the
checkpoint's input included (measured: the non-reentrant checkpoint's input reaches the outer
hooks). Parameters and small tensors are kept as they are. The rest is copied into pinned
host memory (in the same layout: a compiled backward checks its saved tensors' strides) on a
side stream, after the compute stream's work so far; ``record_stream`` keeps the allocator
from handing the device memory out again before the copy has read it, and as each offloaded
block's forward begins the host waits for the copies of all offloaded blocks but the last
one (``throttle``), so the memory the copies hold stays near the two blocks the planner
counts. In backward the first ``unpack`` of a block (a compiled block unpacks all at once)
also starts copying the previous offloaded block's tensors back on the side stream, into
memory of the compute stream, so the next block's transfer overlaps this block's backward;
the compute stream waits on an event for each tensor it takes. On a CPU the "host copy" is a plain copy (the path is the same;
tests use it). Measured on the H200 (3B, 65,536 tokens, 21 of 28 blocks offloaded, compile):
8,879 tokens/s at 70.2 GiB, where the fastest policy that fits without offload ran 7,865.
Under pipeline parallelism several microbatches' forwards are in flight, so the block packed
before is not always the next one backward: correct, but the prefetch may fetch early (the
chooser does not score offload under PP).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchtitan.config import ConfigError
from torchtitan.tools.logging import logger

__all__ = ["ActivationOffload", "apply_activation_offload", "layer_ranges", "offloaded_layers"]

MIN_BYTES = 1 << 20  # smaller saved tensors stay on the device (norm statistics, scalars)


def offloaded_layers(n_offload: int, n_layers: int) -> list[int]:
    """The blocks ``cpu_offload_layers = n_offload`` sends to the host, of ``n_layers``:
    spread evenly over the first ``n_layers - 2`` (every other one for half of those), the last
    two only when more are asked for. A block offloaded at the end of the forward would still
    be copying out when its backward fetches it back: both copies on the device at once
    (measured at 131k tokens: 2 blocks over the two the memory model counts). The planner's
    memory and cost models count these."""
    k = min(max(n_offload, 0), n_layers)
    span = max(k, n_layers - 2)
    return [i * span // k for i in range(k)]


class _PinnedPool:
    """Exact-size host buffers, pinned with ``cudaHostRegister`` (plain memory on a CPU run),
    reused from step to step: a buffer comes back when the packed tensor holding it is
    dropped (its backward has run, or its graph was freed). Reuse needs no wait: every copy
    into or out of a buffer runs on the offloader's one side stream, in order. Each buffer
    registers whole pages inside its own allocation, so no two registrations overlap."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.free: dict[int, list[torch.Tensor]] = {}
        self.registered: list[torch.Tensor] = []  # pinned from their first byte; alive until unregistered
        self.bytes = 0  # held in all, in use or free

    def take(self, nbytes: int) -> torch.Tensor:
        free = self.free.get(nbytes)
        if free:
            return free.pop()
        if not self.pin:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        else:
            page = os.sysconf("SC_PAGE_SIZE")
            raw = torch.empty(nbytes + 2 * page, dtype=torch.uint8)
            start = -raw.data_ptr() % page
            buf = raw[start : start + nbytes]  # keeps ``raw`` alive
            size = -(-nbytes // page) * page
            err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), size, 0))
            if err != 0:
                raise RuntimeError(
                    f"activation offload: pinning {size} bytes of host memory failed (CUDA error {err}); "
                    "lower activation_checkpoint.cpu_offload_layers"
                )
            self.registered.append(buf)
        self.bytes += nbytes
        return buf

    def give(self, buf: torch.Tensor) -> None:
        self.free.setdefault(buf.numel(), []).append(buf)

    def __del__(self) -> None:
        try:
            for buf in self.registered:
                torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
        except Exception:  # noqa: BLE001 (interpreter shutdown: the process frees it all)
            pass


@dataclass(eq=False)
class _Packed:
    host: torch.Tensor
    device: torch.device
    group: int
    stride: tuple[int, ...]  # the saved tensor's: a compiled backward asserts it on what it gets back
    copied: Any = None  # CUDA event: the device -> host copy is done
    fetched: torch.Tensor | None = None  # the copy back, once started
    ready: Any = None  # CUDA event: ``fetched`` is complete
    pool: _PinnedPool | None = None  # where ``buffer`` goes back
    buffer: torch.Tensor | None = None  # the bytes behind ``host``

    def __del__(self) -> None:
        # A prefetched tensor dropped unread (its graph freed without backward): the compute
        # stream, whose memory it is, must not reuse it before the copy into it is done.
        if self.fetched is not None and self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        if self.pool is not None and self.buffer is not None:
            self.pool.give(self.buffer)


@dataclass
class _Group:
    """The packed tensors of one block forward not yet brought back, in order (weak: a graph
    dropped without backward frees its host copies)."""

    packed: list[weakref.ref] = field(default_factory=list)
    fetching: bool = False
    tick: int = 0  # the block forward (any block's) it was packed in
    copied: Any = None  # the event of its last device -> host copy, until the host waited on it

    def alive(self) -> list[_Packed]:
        return [p for p in (r() for r in self.packed) if p is not None]


class ActivationOffload:
    """Pack and unpack hooks for the chosen blocks of one model (one side stream)."""

    def __init__(self, device_type: str, min_bytes: int | None = None) -> None:
        self.device_type = device_type
        self.cuda = device_type == "cuda"
        self.stream: torch.cuda.Stream | None = None  # made at the first copy (on the tensor's device)
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self.groups: dict[int, _Group] = {}  # block forwards whose tensors are still on the host
        self._next = 0
        self._tick = 0  # offloaded block forwards begun
        self.offloaded_bytes = 0  # in total, for tests
        self.pool = _PinnedPool(pin=self.cuda)

    def throttle(self) -> None:
        """Called as an offloaded block's forward begins: the host waits until the copies of
        the offloaded blocks before the previous one are done. The host runs ahead of the
        device; without this it would enqueue many blocks while their copies wait, and the
        allocator, which frees a copied tensor only once its copy is done, would hold all of
        them (measured on the H200 at 65k tokens: ~1.5 blocks over the two the memory model
        counts). Waiting for the one before the previous keeps the next blocks queued while the
        device computes, and leaves each copy the forwards up to the next offloaded block."""
        self._tick += 1
        for group in self.groups.values():
            if group.copied is not None and group.tick <= self._tick - 2:
                group.copied.synchronize()
                group.copied = None

    @contextlib.contextmanager
    def block(self):
        """Run one block's forward under this context: what it saves goes to the host."""
        for stale in [g for g, group in self.groups.items() if not group.alive()]:
            del self.groups[stale]  # graphs dropped without backward
        gid, self._next = self._next, self._next + 1
        self.groups[gid] = _Group(tick=self._tick)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(t, gid), self._unpack):
            yield
        if not self.groups[gid].packed:
            del self.groups[gid]

    def _pack(self, t: torch.Tensor, gid: int) -> Any:
        if isinstance(t, nn.Parameter) or t.device.type != self.device_type or t.numel() * t.element_size() < self.min_bytes:
            return t
        # The host copy keeps a dense tensor's layout (a transposed attention output stays
        # transposed: the copies are plain memcpys); a tensor with gaps is packed densely.
        host_stride = torch.empty_like(t, device="meta").stride()
        nbytes = t.numel() * t.element_size()
        buffer = self.pool.take(nbytes)
        host = buffer.view(t.dtype).as_strided(t.size(), host_stride)
        if self.cuda:
            if self.stream is None:
                self.stream = torch.cuda.Stream(t.device)
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.stream)
            t.record_stream(self.stream)
        else:
            host, copied = host.copy_(t), None
        p = _Packed(host, t.device, gid, t.stride(), copied, pool=self.pool, buffer=buffer)
        self.groups[gid].packed.append(weakref.ref(p))
        self.groups[gid].copied = copied
        self.offloaded_bytes += nbytes
        return p

    def _fetch(self, p: _Packed) -> None:
        if not self.cuda:
            p.fetched = torch.empty_strided(p.host.size(), p.stride, dtype=p.host.dtype).copy_(p.host)
            return
        # Allocated on the compute stream and written on the side stream once the compute
        # stream's work so far is done (that memory may have served it a moment ago). No
        # ``record_stream``: the compute stream waits for the copy before it reads the tensor,
        # so once freed the memory is the compute stream's again at once. (With it, a freed
        # tensor would wait for every copy queued on the side stream by then, the next
        # block's prefetch included: three blocks' worth on the device instead of two.)
        current = torch.cuda.current_stream(p.device)
        t = torch.empty_strided(p.host.size(), p.stride, dtype=p.host.dtype, device=p.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(p.copied)
            t.copy_(p.host, non_blocking=True)
            p.ready = torch.cuda.Event()
            p.ready.record(self.stream)
        p.fetched = t

    def _fetch_group(self, gid: int) -> None:
        group = self.groups.get(gid)
        if group is None or group.fetching:
            return
        group.fetching = True
        for p in group.alive():
            if p.fetched is None:
                self._fetch(p)

    def _unpack(self, p: Any) -> torch.Tensor:
        if not isinstance(p, _Packed):
            return p
        self._fetch_group(p.group)
        earlier = [g for g in self.groups if g < p.group]
        if earlier:  # the block whose backward comes next: start bringing it back now
            self._fetch_group(max(earlier))
        if p.fetched is None:  # unpacked again (a retained graph's second backward)
            self._fetch(p)
        t, p.fetched = p.fetched, None
        if self.cuda:
            torch.cuda.current_stream(p.device).wait_event(p.ready)
        group = self.groups.get(p.group)
        if group is not None:
            group.packed = [r for r in group.packed if r() is not None and r() is not p]
            if not group.packed:
                del self.groups[p.group]
        return t


def apply_activation_offload(
    model: nn.Module, n_offload: int, device_type: str, n_layers: int | None = None
) -> ActivationOffload | None:
    """Offload the saved tensors of the blocks :func:`offloaded_layers` picks of ``model.layers``
    (global layer indices of a model of ``n_layers`` blocks, ``model.n_layers`` by default: a
    pipeline stage offloads those of its blocks that are picked). Registers forward hooks on
    the blocks; returns the offloader (None when no block is chosen). Call after AC and
    compile, before FSDP."""
    if n_offload <= 0:
        return None
    if device_type not in ("cuda", "cpu"):
        raise ConfigError(f"activation_checkpoint.cpu_offload_layers runs on CUDA (and the CPU, for tests), not {device_type}; set it to 0")
    total = n_layers if n_layers is not None else getattr(model, "n_layers", len(model.layers))
    picked = set(offloaded_layers(n_offload, total))
    offload = ActivationOffload(device_type)
    chosen = []
    for i, (name, block) in enumerate(model.layers.named_children()):
        layer = int(name) if name.isdigit() else i
        if layer not in picked:
            continue
        contexts: list = []

        def enter(module: nn.Module, args: tuple, contexts: list = contexts) -> None:
            offload.throttle()
            ctx = offload.block()
            ctx.__enter__()
            contexts.append(ctx)

        def leave(module: nn.Module, args: tuple, output: Any, contexts: list = contexts) -> None:
            if contexts:
                contexts.pop().__exit__(None, None, None)

        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave, always_call=True)
        chosen.append(layer)
    if chosen:
        logger.info(f"activation offload: the saved tensors of {len(chosen)} blocks ({layer_ranges(chosen)}) wait in pinned host memory")
    return offload if chosen else None


def layer_ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 4, 8, 9]`` -> ``"0-2, 4, 8-9"``."""
    out: list[str] = []
    for i in ids:
        if out and int(out[-1].split("-")[-1]) == i - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ", ".join(out)
