"""Activation offload: the chosen blocks' saved tensors wait on the host, and training is
unchanged. On the CPU the host copy is a clone, so these check the hooks' bookkeeping and
that every kind of block (eager, full AC, per-op AC, compiled) sends its saved activations
through them; the side stream and the overlap are the GPU test's (tests/gpu)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from small_trainer import small_trainer_config
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.activation_offload import ActivationOffload, apply_activation_offload, offloaded_layers

DIM = 512  # 16 x 512 fp32 activations: 32 KiB; the tests lower the size floor to 1 KiB


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(DIM, 2 * DIM, bias=False)
        self.w2 = nn.Linear(2 * DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w2(torch.nn.functional.silu(self.w1(x)))


def _model(n: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleDict({str(i): Block() for i in range(n)})
    return model


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    h = x
    for block in model.layers.values():
        h = block(h)
    loss = h.square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("ac", ["none", "full", "op", "compiled full AC"])
def test_saved_tensors_go_to_the_host_and_gradients_are_unchanged(ac: str) -> None:
    x = torch.randn(16, DIM)
    runs = []
    for offload_layers in (0, 2):
        model = _model()
        if ac != "none":
            apply_ac(model, "full" if ac != "op" else "selective", "op")
        if ac.startswith("compiled"):
            for name, block in list(model.layers.named_children()):
                model.layers.register_module(name, torch.compile(block, backend="aot_eager", fullgraph=True))
        offload = apply_activation_offload(model, offload_layers, "cpu")
        if offload is not None:
            offload.min_bytes = 1024
        runs.append((_step(model, x.clone().requires_grad_()), offload))
    (loss0, grads0), _ = runs[0]
    (loss1, grads1), offload = runs[1]
    assert torch.equal(loss0, loss1)
    for a, b in zip(grads0, grads1):
        assert torch.equal(a, b)
    # at least each offloaded block's input (16 x DIM fp32) went to the host; nothing is left
    assert offload.offloaded_bytes >= 2 * 16 * DIM * 4
    assert offload.groups == {}


def test_parameters_and_small_tensors_stay_and_the_previous_block_is_fetched_first() -> None:
    """Parameters are never copied; a block's first unpack starts bringing back the block
    whose backward comes next (the one packed before it)."""
    offload = ActivationOffload("cpu", min_bytes=1024)
    w = nn.Parameter(torch.randn(DIM, DIM))
    small = torch.randn(4, requires_grad=True)
    x = torch.randn(16, DIM, requires_grad=True)
    with offload.block():
        h1 = (x @ w).relu() * small.sum()
    with offload.block():
        h2 = (h1 @ w).relu()
    assert sorted(offload.groups) == [0, 1]
    packed_sizes = [p.host.numel() for g in offload.groups.values() for p in g.alive()]
    assert DIM * DIM not in packed_sizes  # the parameter stayed
    assert all(n >= 256 for n in packed_sizes)  # small stayed
    seen = []  # when block 2's backward is done and block 1's not begun: block 1 already fetched
    hook = h1.register_hook(lambda g: seen.append([p.fetched is not None for p in offload.groups[0].alive()]))
    h2.sum().backward(retain_graph=True)
    hook.remove()
    assert seen and seen[0] and all(seen[0])
    assert offload.groups == {}
    g1 = x.grad.clone()
    x.grad = None
    h2.sum().backward()  # a retained graph unpacks again: fetched on demand
    assert torch.equal(x.grad, g1)


def test_a_graph_dropped_without_backward_frees_its_host_copies() -> None:
    offload = ActivationOffload("cpu", min_bytes=1024)
    x = torch.randn(16, DIM, requires_grad=True)
    with offload.block():
        y = x.exp()
    assert len(offload.groups) == 1
    del y  # e.g. an evaluation forward with gradients on, never run backward
    with offload.block():
        z = x.exp()
    assert list(offload.groups) == [1]
    z.sum().backward()
    assert offload.groups == {}


def test_saved_tensors_come_back_with_their_strides() -> None:
    """A compiled backward asserts the strides of what it saved (on CUDA, flash attention's
    output is saved transposed): dense layouts and views with gaps come back as they left."""
    offload = ActivationOffload("cpu", min_bytes=1024)
    base = torch.randn(2, 64, 4, 32, requires_grad=True)
    seen = {}

    class Keep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return a.sum() + b.sum()

        @staticmethod
        def backward(ctx, g):
            a, b = ctx.saved_tensors
            seen["a"], seen["b"] = a.stride(), b.stride()
            return torch.ones_like(a) * g, torch.ones_like(b) * g

    with offload.block():
        t = base.transpose(1, 2) * 1.0  # dense, transposed
        gaps = (base * 1.0)[:, :, :, :16]  # a view with gaps
        loss = Keep.apply(t, gaps)
    assert offload.offloaded_bytes == (t.numel() + gaps.numel()) * 4
    loss.backward()
    assert seen == {"a": t.stride(), "b": gaps.stride()}


@pytest.mark.parametrize("n_blocks, n_offload, waits_expected", [
    (5, 5, [(2, 0), (3, 1), (4, 2)]),  # consecutive: each waits for the one two back
    (8, 3, [(4, 0)]),  # blocks 0, 2, 4: block 4 waits for block 0's copies, block 2 for none
    (8, 2, []),  # blocks 0, 3: never more than two in flight
])
def test_the_host_waits_for_the_copies_of_all_offloaded_blocks_but_the_last(n_blocks, n_offload, waits_expected):
    """As an offloaded block's forward begins, the host waits for the copies of the offloaded
    blocks before the previous one, once each, so the allocator gets their memory back while
    the device still has the blocks since to compute; the blocks between wait for nothing."""
    model = _model(n_blocks)
    offload = apply_activation_offload(model, n_offload, "cpu")
    offload.min_bytes = 1024
    picked = offloaded_layers(n_offload, n_blocks)
    assert picked == sorted(set(picked)) and len(picked) == n_offload and picked[0] == 0
    waits: list[tuple[int, int]] = []  # (block whose forward begins, offloaded block waited for)
    entering = [0]

    class Event:
        def __init__(self, block: int) -> None:
            self.block = block

        def synchronize(self) -> None:
            waits.append((entering[0], self.block))

    def fake_events(module, args, i):
        entering[0] = i
        for gid, group in offload.groups.items():  # the CPU path has no events: give them some
            if group.packed and group.copied is None and gid not in given:
                group.copied = Event(picked[gid])
                given.add(gid)

    given: set[int] = set()
    for i, block in enumerate(model.layers.values()):
        block.register_forward_pre_hook(lambda m, a, i=i: fake_events(m, a, i), prepend=True)
    h = torch.randn(16, DIM, requires_grad=True)
    for block in model.layers.values():
        h = block(h)
    assert waits == waits_expected
    h.sum().backward()
    assert offload.groups == {}


def test_offloaded_layers_spread_from_the_first_and_leave_the_last_two_until_asked() -> None:
    assert offloaded_layers(0, 28) == [] and offloaded_layers(-1, 28) == []
    assert offloaded_layers(7, 28) == [0, 3, 7, 11, 14, 18, 22]
    assert offloaded_layers(27, 28) == list(range(27))
    assert offloaded_layers(28, 28) == offloaded_layers(40, 28) == list(range(28))
    for n in (1, 2, 5, 28, 61):
        for k in range(1, n + 1):
            ids = offloaded_layers(k, n)
            assert len(set(ids)) == k and ids == sorted(ids) and ids[0] == 0
            assert (n - 1 in ids) == (k == n)
            assert n < 2 or (n - 2 in ids) == (k >= n - 1)
            gaps = [b - a for a, b in zip(ids, ids[1:])]
            assert not gaps or max(gaps) - min(gaps) <= 1  # even


def test_no_grad_forward_packs_nothing() -> None:
    model = _model()
    offload = apply_activation_offload(model, 3, "cpu")
    with torch.no_grad():
        h = torch.randn(16, DIM)
        for block in model.layers.values():
            h = block(h)
    assert offload.offloaded_bytes == 0 and offload.groups == {}


def test_trainer_with_offloaded_blocks_trains_exactly_as_without(tmp_path, monkeypatch) -> None:
    import torchtitan.distributed.activation_offload as module
    from torchtitan.trainer import Trainer

    monkeypatch.setattr(module, "MIN_BYTES", 1024)  # the debug model's activations are small
    packed = []
    pack = module.ActivationOffload._pack

    def counting_pack(self, t, gid):
        out = pack(self, t, gid)
        packed.append(out is not t)
        return out

    monkeypatch.setattr(module.ActivationOffload, "_pack", counting_pack)

    def run(folder: str, *extra: str) -> list[float]:
        cfg = small_trainer_config(tmp_path / folder, "--training.seq_len", "64", "--training.steps", "3",
                                   "--activation_checkpoint.mode", "full", *extra)
        trainer = Trainer(cfg)
        try:
            return trainer.train()
        finally:
            trainer.close()

    base = run("a")
    assert not packed
    offloaded = run("b", "--activation_checkpoint.cpu_offload_layers", "2")
    assert offloaded == base
    assert sum(packed) >= 2 * 3  # both blocks' inputs, every step
    # with FSDP (over one rank, as its CPU offload runs) the same again
    n = sum(packed)
    fsdp = run("c", "--activation_checkpoint.cpu_offload_layers", "2", "--training.enable_cpu_offload")
    assert fsdp == base
    assert sum(packed) - n >= 2 * 3


def test_bad_value_is_one_line_exit_2(tmp_path) -> None:
    from torchtitan.config import ConfigError, ConfigManager

    with pytest.raises(ConfigError, match="activation_checkpoint.cpu_offload_layers"):
        ConfigManager().parse_args(["--activation_checkpoint.cpu_offload_layers", "-1"]).validate()


def test_host_buffers_are_exact_and_reused_from_step_to_step() -> None:
    """The host copies take exactly the offloaded bytes (torch's pinned allocator would round
    each up to a power of two), and the next step reuses them: the pool does not grow."""
    model = _model(4)
    offload = apply_activation_offload(model, 4, "cpu")
    offload.min_bytes = 1024
    x = torch.randn(16, DIM)
    held = []
    for _ in range(3):
        before = offload.offloaded_bytes
        _step(model, x.clone().requires_grad_())
        per_step = offload.offloaded_bytes - before
        held.append(offload.pool.bytes)
        assert sum(b.numel() for bufs in offload.pool.free.values() for b in bufs) == offload.pool.bytes
    assert per_step > 0 and held == [per_step] * 3


def test_pinned_buffers_register_whole_pages_of_their_own(monkeypatch) -> None:
    """On CUDA each host buffer is registered as whole pages inside its own allocation (two
    registrations overlapping a page would fail), exact in size; a failed registration stops
    with one line naming the option. (A stand-in for the CUDA runtime records the calls.)"""
    import os

    from torchtitan.distributed.activation_offload import _PinnedPool

    page = os.sysconf("SC_PAGE_SIZE")
    calls: list[tuple[str, int, int]] = []

    class Runtime:
        result = 0

        def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 (the runtime's name)
            calls.append(("register", ptr, size))
            return self.result

        def cudaHostUnregister(self, ptr):  # noqa: N802
            calls.append(("unregister", ptr, 0))
            return 0

    runtime = Runtime()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: runtime)
    pool = _PinnedPool(pin=True)
    sizes = [1000, 3 * page + 17, 5 * page, 1000]
    bufs = [pool.take(n) for n in sizes]
    assert [b.numel() for b in bufs] == sizes and pool.bytes == sum(sizes)
    spans = sorted((ptr, ptr + size) for kind, ptr, size in calls if kind == "register")
    assert len(spans) == len(sizes)
    for (lo, hi), b in zip(sorted((c[1], c[1] + c[2]) for c in calls), sorted(bufs, key=lambda t: t.data_ptr())):
        assert lo % page == 0 and (hi - lo) % page == 0 and lo == b.data_ptr() and hi - lo >= b.numel()
        storage = b.untyped_storage()
        assert storage.data_ptr() <= lo and hi <= storage.data_ptr() + storage.nbytes()  # its own allocation
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two overlap
    pool.give(bufs[0])
    assert pool.take(1000) is bufs[0] and len(calls) == len(sizes)  # reused, not registered again
    del pool
    assert sorted(c[1] for c in calls if c[0] == "unregister") == [s[0] for s in spans]
    runtime.result = 2  # cudaErrorMemoryAllocation
    with pytest.raises(RuntimeError, match="activation_checkpoint.cpu_offload_layers"):
        _PinnedPool(pin=True).take(page)
