"""Activation offload: what chosen blocks keep for backward waits in pinned host memory.

At long sequences the activations a block keeps for backward (with full AC its input: at
65,536 tokens on the 3B shape 0.75 GiB in fp32) are what stops a faster AC policy from
fitting, while the block's compute dwarfs moving them (a 3B block's forward at 65k tokens
takes ~90 ms; its input crosses PCIe 5.0 in ~15-30 ms). ``activation_checkpoint.
cpu_offload_layers = N`` keeps the saved tensors of blocks 0..N-1 on the host from their
forward to their backward: the first blocks, whose activations wait longest.

How: each chosen block's forward runs under ``torch.autograd.graph.saved_tensors_hooks``.
Every tensor autograd saves there passes through ``pack``: a compiled block's saved tensors
(AOTAutograd saves them all at the end of the block's forward) and an eager block's, the
checkpoint's input included (measured: the non-reentrant checkpoint's input reaches the outer
hooks). Parameters and small tensors are kept as they are. The rest is copied into pinned
host memory (in the same layout: a compiled backward checks its saved tensors' strides) on a
side stream, after the compute stream's work so far; ``record_stream`` keeps the allocator
from handing the device memory out again before the copy has read it, and as each block's
forward begins the host waits for the copies of the block two back (``throttle``), so the
memory the copies hold stays near the two blocks the planner counts. In backward the first
``unpack`` of a block (a compiled block unpacks all at once) also starts copying the
previous block's tensors back on the side stream, into memory of the compute stream, so the
next block's transfer overlaps this block's backward; the compute stream waits on an event
for each tensor it takes. On a CPU the "host copy" is a plain copy (the path is the same;
tests use it). Measured on the H200 (3B, 65,536 tokens, 21 of 28 blocks offloaded, compile):
8,879 tokens/s at 70.2 GiB, where the fastest policy that fits without offload ran 7,865.
Under pipeline parallelism several microbatches' forwards are in flight, so the block packed
before is not always the next one backward: correct, but the prefetch may fetch early (the
chooser does not score offload under PP).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchtitan.config import ConfigError
from torchtitan.tools.logging import logger

__all__ = ["ActivationOffload", "apply_activation_offload"]

MIN_BYTES = 1 << 20  # smaller saved tensors stay on the device (norm statistics, scalars)


@dataclass(eq=False)
class _Packed:
    host: torch.Tensor
    device: torch.device
    group: int
    stride: tuple[int, ...]  # the saved tensor's: a compiled backward asserts it on what it gets back
    copied: Any = None  # CUDA event: the device -> host copy is done
    fetched: torch.Tensor | None = None  # the copy back, once started
    ready: Any = None  # CUDA event: ``fetched`` is complete

    def __del__(self) -> None:
        # A prefetched tensor dropped unread (its graph freed without backward): the compute
        # stream, whose memory it is, must not reuse it before the copy into it is done.
        if self.fetched is not None and self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)


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
        self._tick = 0  # block forwards begun, offloaded or not
        self.offloaded_bytes = 0  # in total, for tests

    def throttle(self) -> None:
        """Called as any block's forward begins: the host waits until the copies of the blocks
        offloaded two or more blocks ago are done. The host runs ahead of the device; without
        this it would enqueue many blocks while their copies wait, and the allocator, which
        frees a copied tensor only once its copy is done, would hold all of them (measured on
        the H200 at 65k tokens: ~1.5 blocks over the two the memory model counts). Waiting
        two blocks back keeps the next block queued while the device computes."""
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
        if self.cuda:
            if self.stream is None:
                self.stream = torch.cuda.Stream(t.device)
            host = torch.empty_strided(t.size(), host_stride, dtype=t.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.stream)
            t.record_stream(self.stream)
        else:
            host, copied = torch.empty_strided(t.size(), host_stride, dtype=t.dtype).copy_(t), None
        p = _Packed(host, t.device, gid, t.stride(), copied)
        self.groups[gid].packed.append(weakref.ref(p))
        self.groups[gid].copied = copied
        self.offloaded_bytes += t.numel() * t.element_size()
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


def apply_activation_offload(model: nn.Module, n_layers: int, device_type: str) -> ActivationOffload | None:
    """Offload the saved tensors of blocks 0..n_layers-1 of ``model.layers`` (global layer
    indices: a pipeline stage offloads those of its blocks that are below ``n_layers``).
    Registers forward hooks on the blocks; returns the offloader (None when no block is
    chosen). Call after AC and compile, before FSDP."""
    if n_layers <= 0:
        return None
    if device_type not in ("cuda", "cpu"):
        raise ConfigError(f"activation_checkpoint.cpu_offload_layers runs on CUDA (and the CPU, for tests), not {device_type}; set it to 0")
    offload = ActivationOffload(device_type)
    chosen = 0
    for i, (name, block) in enumerate(model.layers.named_children()):
        layer = int(name) if name.isdigit() else i
        block.register_forward_pre_hook(lambda module, args: offload.throttle())
        if layer >= n_layers:
            continue
        contexts: list = []

        def enter(module: nn.Module, args: tuple, contexts: list = contexts) -> None:
            ctx = offload.block()
            ctx.__enter__()
            contexts.append(ctx)

        def leave(module: nn.Module, args: tuple, output: Any, contexts: list = contexts) -> None:
            if contexts:
                contexts.pop().__exit__(None, None, None)

        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave, always_call=True)
        chosen += 1
    if chosen:
        logger.info(f"activation offload: the saved tensors of {chosen} blocks wait in pinned host memory")
    return offload if chosen else None
