"""The planner's predicted peak memory against real runs of the benchmark suite (needs GPUs).

For each configuration A-E of docs/planning.md: predict with the dry run on this machine's
GPU type, train 15 steps with run_train.sh, and compare the peak reserved memory the trainer
prints (the largest over the logged windows) with the prediction: within 10%.

    python -m pytest tests/gpu/test_planner_gpu.py -q -s      # on a machine with 2 GPUs
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from torchtitan.config import ConfigManager
from torchtitan.planner import dry_run, get_gpu
from torchtitan.planner.hardware import GIB

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--training.steps", "15", "--metrics.log_freq", "5", "--lr_scheduler.warmup_steps", "5",
          "--training.seq_len", "8192", "--activation_checkpoint.selective_ac_option", "op"]
SUITE = {
    "A": (2, ["--model.flavor", "3B", "--training.local_batch_size", "2"]),
    "B": (2, ["--model.flavor", "3B", "--training.local_batch_size", "2", "--compile.enable"]),
    "C": (2, ["--model.flavor", "3B", "--training.local_batch_size", "2", "--compile.enable", "--model.converters", "float8",
              "--float8.enable_fsdp_float8_all_gather", "--float8.precompute_float8_dynamic_scale_for_fsdp"]),
    "D": (2, ["--model.flavor", "8B", "--training.local_batch_size", "1", "--activation_checkpoint.mode", "full", "--compile.enable"]),
    "E": (1, ["--model.flavor", "1B", "--training.local_batch_size", "4", "--compile.enable"]),
}


def _gpu_type() -> str:
    name = torch.cuda.get_device_name().upper()
    for key in ("H200", "H100", "A100"):
        if key in name:
            return key
    pytest.skip(f"no planner table entry for {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SUITE))
def test_predicted_peak_is_within_10_percent(tmp_path, name):
    ngpu, args = SUITE[name]
    if torch.cuda.device_count() < ngpu:
        pytest.skip(f"needs {ngpu} GPUs")
    cfg = ConfigManager().parse_args(["--job.config_file", str(REPO / "train_configs/debug_model.toml"), *COMMON, *args])
    predicted = dry_run(cfg, ngpu, get_gpu(_gpu_type())).peak_reserved / GIB
    env = {**os.environ, "NGPU": str(ngpu)}
    out = subprocess.run(["./run_train.sh", *COMMON, *args, "--job.dump_folder", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    measured = max(float(v) for v in re.findall(r"memory:\s*([0-9.]+)GiB", log))
    print(f"{name}: predicted {predicted:.1f} GiB, measured {measured:.1f} GiB reserved")
    assert measured == pytest.approx(predicted, rel=0.10)
