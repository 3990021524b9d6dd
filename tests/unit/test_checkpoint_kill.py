"""A training process SIGKILLed in the middle of writing a checkpoint leaves the previous
checkpoint as the latest, and a restart resumes from it exactly.

The child trains 4 steps, saving at steps 2 and 4, with DCP's file writer patched to stop
after writing the data files of step 4 (before ``.metadata``, before the marker) and say so
on stdout; the test then kills it with SIGKILL. The child also prints every loss at full
precision, so the resumed run's steps 3 and 4 can be compared exactly.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from small_trainer import small_trainer_args
from torchtitan.components.checkpoint import MARKER, list_checkpoints
from torchtitan.config import ConfigManager

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import sys, time
from torch.distributed.checkpoint import FileSystemWriter
from torchtitan.config import ConfigManager
from torchtitan.trainer import Trainer

original = FileSystemWriter.write_data

def write_then_hang(self, plan, planner):
    future = original(self, plan, planner)
    if "step-4.tmp" in str(self.path):
        future.wait()  # the data files are on disk; .metadata and the marker are not
        print("WRITING", flush=True)
        time.sleep(600)
    return future

FileSystemWriter.write_data = write_then_hang
trainer = Trainer(ConfigManager().parse_args(sys.argv[1:]))
log = trainer.metrics.log

def log_exact(step, **metrics):
    print(f"LOSS {step} {metrics['loss']!r}", flush=True)
    return log(step, **metrics)

trainer.metrics.log = log_exact
trainer.train()
"""


def _args(dump: Path, mode: str) -> list[str]:
    return small_trainer_args(
        dump,
        "--job.no-print_config",
        "--training.seq_len", "64",
        "--training.local_batch_size", "2",
        "--training.steps", "4",
        "--training.deterministic",
        "--activation_checkpoint.mode", "none",
        "--metrics.log_freq", "1",
        "--comm.trace_buf_size", "0",
        "--checkpoint.enable",
        "--checkpoint.interval", "2",
        "--checkpoint.async_mode", mode,
    )


def _run_until_writing(args: list[str], log_file: Path) -> dict[int, float]:
    """Start the child, wait for it to be mid-write, SIGKILL it; return its losses."""
    with open(log_file, "w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in child.stdout], daemon=True).start()
    losses: dict[int, float] = {}
    try:
        while True:
            try:
                line = lines.get(timeout=240)
            except queue.Empty:
                pytest.fail(f"the child never reached the slow write:\n{log_file.read_text()[-3000:]}")
            if line.startswith("LOSS"):
                _, step, value = line.split()
                losses[int(step)] = float(value)
            elif line.strip() == "WRITING":
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    return losses


@pytest.mark.parametrize("mode", ["disabled", "async"])
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, mode):
    from torchtitan.trainer import Trainer

    killed_losses = _run_until_writing(_args(tmp_path, mode), tmp_path / "child.log")
    assert sorted(killed_losses) == [1, 2, 3, 4]
    folder = tmp_path / "checkpoint"
    leftovers = [p for p in folder.iterdir() if p.name.startswith("step-4.tmp")]
    assert len(leftovers) == 1 and any(leftovers[0].glob("*.distcp"))  # data was being written
    assert not (leftovers[0] / MARKER).exists()
    assert sorted(list_checkpoints(str(folder))) == [2]  # latest = the previous checkpoint

    trainer = Trainer(ConfigManager().parse_args(_args(tmp_path, mode)))
    try:
        resumed = trainer.train()  # loads step 2, trains 3 and 4, saves step 4
    finally:
        trainer.close()
    assert resumed == [killed_losses[3], killed_losses[4]]
    assert sorted(p.name for p in folder.iterdir()) == ["step-2", "step-4"]  # leftover cleaned
    assert sorted(list_checkpoints(str(folder))) == [2, 4]
