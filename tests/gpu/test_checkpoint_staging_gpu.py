"""Asynchronous-save staging on a real GPU: the page-locked host arena (needs CUDA).

    python -m pytest tests/gpu/test_checkpoint_staging_gpu.py -q

On CPU the arena is plain memory and these paths do not exist: here the buffers must be
page-locked (``is_pinned``), receive non-blocking device-to-host copies that land intact,
including tensors larger than a registration region next to small ones (the layout that
failed on an H200 with "CUDA error: invalid argument" before regions stopped splitting
tensors), and the same buffers must take the next save. A training thread's CUDA work must
keep running while the arena is registered in the background.
"""

from __future__ import annotations

import time

import pytest
import torch

from torchtitan.components.checkpoint import staging
from torchtitan.components.checkpoint.staging import StateStager

pytestmark = pytest.mark.gpu


def _state(scale: float) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    big = torch.randn(3 * 1024 * 1024, device="cuda", generator=g) * scale  # 12 MiB: > 2 regions
    return {
        "model": {"emb": big, "norm": torch.full((7,), scale, device="cuda")},
        "optimizer": {"state": {"emb": {"exp_avg": big * 2, "step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]},
    }


def test_pinned_arena_takes_non_blocking_copies_across_regions(monkeypatch):
    monkeypatch.setattr(staging, "_REGION", 4 << 20)  # 4 MiB regions: the 12 MiB tensors span 3
    stager = StateStager(("model", "optimizer"), pin_memory=True)
    live = _state(1.0)
    stager.reserve(live)
    stager.wait_reserved()
    assert stager._arena is not None and stager._arena.pinned
    assert len(stager._arena.regions) >= 3
    first = stager.stage(live)
    for name in ("emb", "norm"):
        assert first["model"][name].is_pinned()
        assert torch.equal(first["model"][name], live["model"][name].cpu())
    assert torch.equal(first["optimizer"]["state"]["emb"]["exp_avg"], live["optimizer"]["state"]["emb"]["exp_avg"].cpu())
    ptr = first["model"]["emb"].data_ptr()
    live = _state(3.0)
    second = stager.stage(live)
    assert second["model"]["emb"].data_ptr() == ptr  # the same memory, new contents
    assert torch.equal(second["model"]["emb"], live["model"]["emb"].cpu())
    stager.close()
    assert stager._arena is None


def test_training_thread_keeps_running_while_the_arena_is_registered():
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def batch() -> float:
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        return time.perf_counter() - t

    base = sorted(batch() for _ in range(20))[10]
    big = {"model": {f"w{i}": torch.empty(256 << 20, dtype=torch.uint8, device="cuda") for i in range(8)}}  # 2 GiB
    stager = StateStager(("model",), pin_memory=True)
    stager.reserve(big)
    during = []
    while stager._reserving is not None and stager._reserving.is_alive():
        during.append(batch())
    stager.wait_reserved()
    assert stager._arena.pinned and len(during) >= 3, len(during)
    # cudaHostAlloc froze this loop for the whole allocation; registration must not.
    assert sorted(during)[len(during) // 2] < 3 * base, (base, sorted(during))
    stager.close()
