"""One rank fails while the other waits for it: the job must end at once (not at a
collective timeout), torchrun's summary must name the failed rank and its error, and that
rank's full output must be on disk even though only rank 0's is shown."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_a_rank_out_of_memory_ends_the_job_and_is_named(tmp_path):
    logs = tmp_path / "torchrun_logs"
    env = dict(
        os.environ,
        NGPU="2",
        LOG_RANK="0",
        LOG_DIR=str(logs),
        OMP_NUM_THREADS="1",
        TORCHTITAN_FAULT_INJECT="oom:1:2",
    )
    args = [
        "--job.dump_folder", str(tmp_path / "out"),
        "--training.steps", "4",
        "--training.seq_len", "64",
        "--metrics.log_freq", "1",
        "--metrics.no-enable_color_printing",
        "--job.no-print_config",
        "--comm.train_timeout_seconds", "600",  # a hang would outlive the test's limit
    ]
    started = time.monotonic()
    out = subprocess.run(["./run_train.sh", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - started
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert elapsed < 200, f"the job took {elapsed:.0f}s to end"
    # rank 0's console shows step 1 only; the summary names rank 1 and the error
    assert "step:  1" in text and "step:  2" not in text, text[-3000:]
    summary = text[text.index("Root Cause") :]
    assert "rank      : 1" in summary or "rank: 1" in summary, summary
    assert "OutOfMemoryError" in summary and "injected out-of-memory at step 2" in summary, summary
    # rank 1's own output, which the console filtered out, is kept
    (stderr1,) = logs.glob("*/attempt_0/1/stderr.log")
    kept = stderr1.read_text()
    assert "injecting oom at step 2" in kept and "Traceback" in kept
