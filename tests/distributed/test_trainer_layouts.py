"""The real trainer, launched as a user launches it, gives the same losses in every layout.

One process (python -m torchtitan.train) against 2 CPU ranks through run_train.sh (torchrun,
gloo): FSDP 2, TP 2 with loss parallel, CP 2 with head-tail load balancing. The layout-independent data order
(training.dataset_shards) gives every layout the same global batch; the same seed gives the
same initial weights; fp32. Tolerance 1e-5 relative, the same as the layer-level parity tests.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMON = [
    "--job.config_file", "train_configs/debug_model.toml",
    "--training.steps", "5",
    "--training.seq_len", "64",
    "--training.global_batch_size", "4",
    "--training.dataset_shards", "2",
    "--training.mixed_precision_param", "float32",
    "--optimizer.eps", "1e-6",
    "--lr_scheduler.warmup_steps", "2",
    "--metrics.log_freq", "1",
    "--metrics.no-enable_color_printing",
    "--job.no-print_config",
]
LOSS = re.compile(r"step:\s*(\d+)\s+loss:\s*([-+0-9.eE]+)")


def _losses(out: subprocess.CompletedProcess, steps: int = 5) -> list[float]:
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    found = [float(v) for _, v in LOSS.findall(out.stdout + out.stderr)]
    assert len(found) == steps, (out.stdout + out.stderr)[-2000:]
    return found


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = subprocess.run(
        [sys.executable, "-m", "torchtitan.train", *COMMON, "--training.local_batch_size", "4",
         "--job.dump_folder", str(tmp_path_factory.mktemp("single"))],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )
    return _losses(out)


@pytest.mark.parametrize(
    "name, args",
    [
        ("fsdp2", ["--training.local_batch_size", "2"]),
        # with the memory estimate first (its dry run runs in a child process)
        ("tp2_loss_parallel", ["--training.local_batch_size", "4", "--parallelism.tensor_parallel_degree", "2",
                               "--activation_checkpoint.mode", "full", "--memory_estimation.enable"]),
        ("cp2_load_balanced", ["--training.local_batch_size", "4", "--parallelism.context_parallel_degree", "2",
                               "--parallelism.data_parallel_shard_degree", "1"]),
    ],
)
def test_two_rank_layout_matches_one_process(single, tmp_path, name, args):
    out = subprocess.run(
        ["./run_train.sh", *COMMON, *args, "--job.dump_folder", str(tmp_path)],
        cwd=REPO, env=_env(NGPU="2"), capture_output=True, text=True, timeout=300,
    )
    assert _losses(out) == pytest.approx(single, rel=1e-5), name


def test_tied_embeddings_under_fsdp_match_one_process(tmp_path):
    """A flavor whose output layer is its embedding: FSDP keeps the shared weight in one unit."""
    tied = [*COMMON, "--model.name", "qwen3", "--model.flavor", "debugmodel_tied", "--training.steps", "3"]
    one = subprocess.run(
        [sys.executable, "-m", "torchtitan.train", *tied, "--training.local_batch_size", "4",
         "--job.dump_folder", str(tmp_path / "one")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )
    two = subprocess.run(
        ["./run_train.sh", *tied, "--training.local_batch_size", "2", "--job.dump_folder", str(tmp_path / "two")],
        cwd=REPO, env=_env(NGPU="2"), capture_output=True, text=True, timeout=300,
    )
    assert _losses(two, 3) == pytest.approx(_losses(one, 3), rel=1e-5)
