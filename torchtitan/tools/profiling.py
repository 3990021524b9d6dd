"""torch.profiler traces and CUDA memory snapshots, driven by ``[profiling]``."""

from __future__ import annotations

import contextlib
import os
import pickle
import time

import torch

from torchtitan.tools.logging import logger


@contextlib.contextmanager
def maybe_enable_profiling(
    *, enable: bool, trace_dir: str, profile_freq: int, warmup: int, active: int, rank: int, start_step: int = 0
):
    """Yield a profiler whose ``step()`` the loop calls once per step, or None when disabled.

    Every ``profile_freq`` steps a cycle of (wait, warmup, active) ends and the active steps'
    trace is written as Chrome JSON to ``trace_dir/iteration_<step>/rank<r>_trace.json``.
    """
    if not enable:
        yield None
        return
    if warmup + active > profile_freq:
        raise ValueError(
            "profiling.profiler_warmup + profiling.profiler_active must not exceed profiling.profile_freq"
        )
    os.makedirs(trace_dir, exist_ok=True)
    step = {"n": start_step}

    def on_trace_ready(prof):
        out = os.path.join(trace_dir, f"iteration_{step['n']}")
        os.makedirs(out, exist_ok=True)
        t0 = time.perf_counter()
        prof.export_chrome_trace(os.path.join(out, f"rank{rank}_trace.json"))
        logger.info(f"profiler trace written to {out} in {time.perf_counter() - t0:.1f}s")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=profile_freq - warmup - active, warmup=warmup, active=active)
    with torch.profiler.profile(
        activities=activities, schedule=schedule, on_trace_ready=on_trace_ready, record_shapes=True
    ) as prof:

        class _Stepper:
            def step(self):
                step["n"] += 1
                prof.step()

        yield _Stepper()


class MemorySnapshotter:
    """Records CUDA allocator history; dumps a snapshot at a chosen step and on OOM."""

    def __init__(self, *, enable: bool, folder: str, rank: int, at_step: int = -1, max_entries: int = 100000):
        self.enabled = enable and torch.cuda.is_available()
        self.folder, self.rank, self.at_step = folder, rank, at_step
        if self.enabled:
            os.makedirs(folder, exist_ok=True)
            torch.cuda.memory._record_memory_history(max_entries=max_entries)

    def dump(self, tag: str) -> str | None:
        if not self.enabled:
            return None
        path = os.path.join(self.folder, f"{tag}_rank{self.rank}_memory_snapshot.pickle")
        with open(path, "wb") as f:
            pickle.dump(torch.cuda.memory._snapshot(), f)
        logger.info(f"memory snapshot written to {path} (open it at pytorch.org/memory_viz)")
        return path

    def step(self, step: int) -> None:
        if self.enabled and step == self.at_step:
            self.dump(f"iteration_{step}")
