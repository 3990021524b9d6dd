"""Profiler traces and memory snapshots from real trainer runs on a CUDA GPU (needs a GPU).

What a user opens after a slow or out-of-memory run: the Chrome trace must hold the GPU
kernels (not only the CPU ops), and the snapshots must load in PyTorch's memory visualizer
tooling, both the one asked for at a step and the one written by an OOM.

    python -m pytest tests/gpu/test_profiling_gpu.py -q
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch.cuda import _memory_viz

from torchtitan.config import ConfigManager
from torchtitan.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def _train(tmp_path: Path, *overrides: str) -> None:
    cfg = ConfigManager().parse_args(
        [
            "--job.config_file", str(REPO / "train_configs" / "debug_model.toml"),
            "--job.dump_folder", str(tmp_path),
            "--model.tokenizer_path", str(REPO / "tests/assets/test_tiktoken.model"),
            "--metrics.no-enable_color_printing",
            *overrides,
        ]
    )
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
        torch.cuda.memory._record_memory_history(enabled=None)
        torch.cuda.set_per_process_memory_fraction(1.0)


def _check_snapshot(path: Path) -> None:
    data = pickle.loads(path.read_bytes())
    assert data["segments"] and any(data["device_traces"])
    assert "<html" in _memory_viz.trace_plot(data).lower()  # what memory_viz renders
    assert "<html" in _memory_viz.segment_plot(data).lower()


@pytest.mark.gpu
def test_profiled_run_has_cuda_kernels_and_step_snapshot(tmp_path):
    _train(
        tmp_path,
        "--training.steps", "3",
        "--profiling.enable_profiling",
        "--profiling.profile_freq", "3",
        "--profiling.profiler_warmup", "1",
        "--profiling.profiler_active", "1",
        "--profiling.enable_memory_snapshot",
        "--profiling.memory_snapshot_step", "2",
    )
    trace = json.loads((tmp_path / "profile_traces" / "iteration_3" / "rank0_trace.json").read_text())
    events = trace["traceEvents"]
    kernels = [e["name"] for e in events if e.get("cat") == "kernel"]
    assert len(kernels) > 50, kernels[:5]  # the step's GPU kernels, with device timestamps
    assert any("gemm" in k.lower() or "nvjet" in k.lower() or "sm90" in k.lower() for k in kernels), sorted(set(kernels))[:20]
    assert any(e.get("name") == "cudaLaunchKernel" or "LaunchKernel" in e.get("name", "") for e in events)
    assert any(e.get("name") == "ProfilerStep#2" for e in events)
    (snap,) = (tmp_path / "memory_snapshot").iterdir()
    assert snap.name == "iteration_2_rank0_memory_snapshot.pickle"
    _check_snapshot(snap)


@pytest.mark.gpu
def test_oom_writes_a_snapshot_and_raises(tmp_path):
    with pytest.raises(torch.OutOfMemoryError):
        _train(
            tmp_path,
            "--training.steps", "2",
            "--training.seq_len", "2048",
            "--training.local_batch_size", "64",
            "--activation_checkpoint.mode", "none",
            "--training.device_memory_limit_gib", "0.5",
            "--profiling.enable_memory_snapshot",
        )
    (snap,) = (tmp_path / "memory_snapshot").iterdir()
    assert snap.name == "oom_step_1_rank0_memory_snapshot.pickle"
    _check_snapshot(snap)
