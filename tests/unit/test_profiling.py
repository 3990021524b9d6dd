"""Profiler traces from a real trainer run; memory snapshots (CUDA only)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from small_trainer import small_trainer_config
from torchtitan.tools.profiling import MemorySnapshotter
from torchtitan.trainer import Trainer


def _trainer(tmp_path, *overrides) -> Trainer:
    cfg = small_trainer_config(
        tmp_path,
        "--training.seq_len", "32",
        "--training.local_batch_size", "1",
        "--activation_checkpoint.mode", "none",
        *overrides,
    )
    return Trainer(cfg)


def test_profiled_run_writes_chrome_trace(tmp_path, monkeypatch):
    from torchtitan.distributed import utils as dist_utils

    calls = []
    real = dist_utils.set_pg_timeout
    monkeypatch.setattr(dist_utils, "set_pg_timeout", lambda s, mesh=None: (calls.append(s), real(s, mesh)))
    trainer = _trainer(
        tmp_path,
        "--comm.train_timeout_seconds", "77",
        "--training.steps", "2",
        "--profiling.enable_profiling",
        "--profiling.profile_freq", "2",
        "--profiling.profiler_warmup", "1",
        "--profiling.profiler_active", "1",
    )
    try:
        trainer.train()
    finally:
        trainer.close()
    assert calls == [77]  # comm.train_timeout_seconds replaces the init timeout after step 1
    # One (warmup 1, active 1) cycle ends at step 2 and is written under that step's name.
    trace_file = tmp_path / "profile_traces" / "iteration_2" / "rank0_trace.json"
    trace = json.loads(trace_file.read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert "ProfilerStep#1" in names  # the recorded (second) step; profiler counts from 0
    assert "ProfilerStep#0" not in names  # the warmup step is not recorded
    assert {"aten::mm", "aten::embedding"} <= names  # forward matmuls and the lookup
    assert any("backward" in n.lower() for n in names)
    assert any(n.startswith("Optimizer.step") for n in names)


def test_memory_snapshot_is_cuda_only(tmp_path):
    snap = MemorySnapshotter(enable=True, folder=str(tmp_path / "snap"), rank=0, at_step=1)
    if torch.cuda.is_available():
        pytest.skip("covered by the gpu test")
    assert not snap.enabled and snap.dump("x") is None and not (tmp_path / "snap").exists()


@pytest.mark.gpu
def test_memory_snapshot_on_cuda(tmp_path):
    snap = MemorySnapshotter(enable=True, folder=str(tmp_path), rank=3, at_step=2)
    x = torch.empty(1 << 20, device="cuda")
    snap.step(1)
    assert not list(tmp_path.iterdir())
    snap.step(2)
    (path,) = tmp_path.iterdir()
    assert path.name == "iteration_2_rank3_memory_snapshot.pickle"
    data = pickle.loads(path.read_bytes())
    assert data["segments"] and data["device_traces"]
    sizes = [b["size"] for seg in data["segments"] for b in seg["blocks"] if b["state"] == "active_allocated"]
    assert x.numel() * 4 in sizes
    torch.cuda.memory._record_memory_history(enabled=None)
