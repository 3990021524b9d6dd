"""multinode_trainer.slurm through ``sbatch``, as a user runs it, on a two-node test cluster.

Each job is 2 nodes x 2 CPU processes over gloo (GPUS_PER_NODE=2, --gpus-per-node=0),
training the 2-layer dim-64 Llama of tests/distributed/resilience_driver.py in fp32 with
``training.deterministic``, so every run is compared bit for bit with the same layout
launched by run_train.sh on one host (4 processes):

- FSDP 2 x TP 2 across the nodes: the per-step losses equal the one-host run's.
- HSDP (2 replicas, one per node, each sharded over a node's 2 ranks), one job through two
  faults: the two ranks of one node SIGKILL themselves at step 5 and torchrun (MAX_RESTARTS)
  restarts the job on both nodes from the step-3 checkpoint; later ``scancel --batch
  --signal=TERM`` (SLURM's notice before a preemption, as ``--signal=B:TERM@N`` sends it)
  makes every rank checkpoint its step and the job end; ``scontrol requeue`` runs it again
  and it resumes from that checkpoint. Every step's loss and the final model and optimizer
  equal the uninterrupted one-host run's.
- A layout that does not divide the allocation stops the job with one line before srun.

Launches are few on purpose (each costs mostly its start-up): one-host baselines, three
jobs, and the refused one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "distributed"))
from resilience_driver import FLAVOR, complete_steps, weights_and_optimizer, write_text_data  # noqa: E402

pytestmark = pytest.mark.slurm

STEPS = 10
INTERVAL = 3
COMMON = [
    "--job.config_file", "train_configs/debug_model.toml",
    "--experimental.custom_import", "resilience_driver",
    "--model.flavor", FLAVOR,
    "--training.seq_len", "32",
    "--training.global_batch_size", "4",
    "--training.dataset", "text",
    "--training.mixed_precision_param", "float32",
    "--training.deterministic",
    "--activation_checkpoint.mode", "none",
    "--metrics.log_freq", "1",
    "--metrics.enable_jsonl",
    "--metrics.no-enable_color_printing",
    "--job.no-print_config",
    "--comm.trace_buf_size", "0",
]
HSDP = [
    "--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "2",
    "--training.local_batch_size", "1", "--training.steps", str(STEPS),
    "--checkpoint.enable", "--checkpoint.interval", str(INTERVAL), "--checkpoint.keep_latest_k", "0",
]
FSDP_TP = [
    "--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2",
    "--training.local_batch_size", "2", "--training.steps", "4",
]
SBATCH = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--open-mode=append"]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    return dict(
        os.environ,
        CUDA_VISIBLE_DEVICES="",  # CPU ranks over gloo, also on a machine with GPUs
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests" / "distributed"), os.environ.get("PYTHONPATH")])),
        LOG_RANK="0,1",
        LOG_DIR=str(tmp / "torchrun_logs"),
        **extra,
    )


def _args(folder: Path, data: Path, layout: list[str]) -> list[str]:
    return [*COMMON, "--training.dataset_path", str(data), *layout, "--job.dump_folder", str(folder)]


@contextlib.contextmanager
def _local(folder: Path, data: Path, layout: list[str]):
    """The same layout on one host: run_train.sh, 4 processes, in the background (killed if
    the test fails before it is finished)."""
    folder.mkdir(parents=True)
    with open(folder / "run.log", "w") as log:
        proc = subprocess.Popen(["./run_train.sh", *_args(folder, data, layout)], cwd=REPO,
                                env=_env(folder, NGPU="4"), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _finish(proc: subprocess.Popen, folder: Path) -> None:
    assert proc.wait(timeout=600) == 0, (folder / "run.log").read_text()[-3000:]


def _submit(cluster, folder: Path, data: Path, layout: list[str], **env: str) -> tuple[int, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "job.out"
    env = _env(folder, **{"GPUS_PER_NODE": "2", "MAX_RESTARTS": "0", "RDZV_PORT": str(cluster.free_port()), **env})
    job = cluster.submit(*SBATCH, f"--output={out}", "multinode_trainer.slurm", *_args(folder, data, layout),
                         env=env, cwd=REPO)
    return job, out


def _losses(folder: Path) -> dict[int, float]:
    """Rank 0's loss per step (the last record of a step, when a restart ran it again)."""
    losses = {}
    for line in (folder / "metrics_jsonl" / "rank_0.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss_metrics/global_avg_loss" in record:
            losses[record["step"]] = record["loss_metrics/global_avg_loss"]
    return losses


def _wait_for(path: Path, pattern: str, job: int, cluster, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if re.search(pattern, text, re.M):
            return text
        if cluster.ended(job):
            break
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in the output of job {job}:\n{text[-3000:]}")


# Every run's files go under the cluster's folder, removed with it.
@pytest.fixture
def work(slurm_cluster, request) -> Path:
    return slurm_cluster.root / request.node.name


@pytest.fixture(scope="module")
def data(slurm_cluster) -> Path:
    return write_text_data(slurm_cluster.root / "data", files=1, docs_per_file=100)[0]


@pytest.fixture(scope="module")
def hsdp(slurm_cluster, data) -> dict:
    """One HSDP job: a node's ranks killed at step 5 (MAX_RESTARTS), preempted later, requeued;
    and the same layout on one host, run meanwhile."""
    local, folder = slurm_cluster.root / "hsdp_local", slurm_cluster.root / "hsdp_slurm"
    # rank 0 freezes at step 7 (after the restart), so the TERM comes before the run ends
    faults = "kill:2:5,kill:3:5,sigstop:0:7"
    with _local(local, data, HSDP) as local_run:
        job, out = _submit(slurm_cluster, folder, data, HSDP, MAX_RESTARTS="2", TORCHTITAN_FAULT_INJECT=faults)
        _wait_for(out, r"injecting sigstop at step 7", job, slurm_cluster)
        slurm_cluster.run("scancel", "--batch", "--signal=TERM", str(job))  # to the batch script, as B:TERM@N does
        _wait_for(out, r"death signal, shutting down workers(.|\n)*death signal, shutting down workers", job,
                  slurm_cluster)  # both nodes' torchrun got it, and so did every rank
        slurm_cluster.run("scancel", "--signal=CONT", str(job))
        first = slurm_cluster.wait_job(job)
        first_log = out.read_text(errors="replace")
        checkpoints = complete_steps(str(folder / "checkpoint"))
        slurm_cluster.requeue(job)
        second = slurm_cluster.wait_job(job)
        _finish(local_run, local)
    return dict(local=local, folder=folder, first=first, first_log=first_log, checkpoints=checkpoints,
                second=second, log=out.read_text(errors="replace"))


def test_fsdp_tp_across_nodes_matches_one_host(slurm_cluster, data, work):
    with _local(work / "local", data, FSDP_TP) as local:  # runs while the job does
        job, out = _submit(slurm_cluster, work / "slurm", data, FSDP_TP)
        info = slurm_cluster.wait_job(job)
        _finish(local, work / "local")
    log = out.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", log[-3000:]
    # each node's ranks name it: local ranks 0 and 1 of both nodes are shown
    assert {m for m in re.findall(r"^\[(n\d) rank\d\]:", log, re.M)} == {"n1", "n2"}, log[-3000:]
    slurm, one_host = _losses(work / "slurm"), _losses(work / "local")
    assert sorted(slurm) == [1, 2, 3, 4] and slurm == one_host


def test_hsdp_across_nodes_matches_one_host(hsdp):
    slurm = _losses(hsdp["folder"])  # every step, over the job's three runs
    assert sorted(slurm) == list(range(1, STEPS + 1)) and slurm == _losses(hsdp["local"])


def test_node_failure_restarts_both_nodes_from_the_last_checkpoint(hsdp):
    log = hsdp["first_log"]
    killed = re.findall(r"^\[(n\d) rank(\d)\]:.*injecting kill at step 5", log, re.M)
    assert sorted(r for _, r in killed) == ["2", "3"] and len({n for n, _ in killed}) == 1, log[-3000:]
    # torchrun started all four ranks again, on both nodes, and they resumed from step 3
    after = log.split("injecting kill at step 5")[-1]
    started = re.findall(r"^\[(n\d) rank(\d)\]:.* - INFO - training 10 steps", after, re.M)
    assert {n for n, _ in started} == {"n1", "n2"} and sorted(r for _, r in started) == list("0123"), log[-3000:]
    assert re.search(r"loaded .* from \S+/checkpoint/step-3 ", after), log[-3000:]


def test_preemption_checkpoints_and_requeue_resumes_bit_exact(hsdp):
    f = hsdp
    assert f["first"]["JobState"] != "COMPLETED", f["first_log"][-3000:]
    assert "SIGTERM: passing it to every rank" in f["first_log"]
    # every rank stopped after the same step, which was checkpointed, and none ran past it
    stopped = sorted(set(re.findall(r"preempted: checkpoint of step (\d+) written", f["first_log"])))
    assert len(stopped) == 1, f["first_log"][-3000:]
    step = int(stopped[0])
    assert 7 <= step < STEPS and step % INTERVAL and f["checkpoints"][-1] == step, f["checkpoints"]
    assert not re.search(rf"step: {step + 1:2d} ", f["first_log"])
    # the requeued job resumed there and finished
    assert f["second"]["JobState"] == "COMPLETED" and f["second"]["Restarts"] == "1", f["log"][-3000:]
    resumed = f["log"][len(f["first_log"]):]
    assert re.search(rf"loaded .* from \S+/checkpoint/step-{step} ", resumed), resumed[-3000:]
    final = weights_and_optimizer(str(f["folder"] / "checkpoint" / f"step-{STEPS}"))
    reference = weights_and_optimizer(str(f["local"] / "checkpoint" / f"step-{STEPS}"))
    assert final.keys() == reference.keys()
    unequal = [k for k in final if not final[k].equal(reference[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"


def test_bad_layout_is_refused_before_the_rendezvous(slurm_cluster, data, work):
    started = time.monotonic()
    bad = ["--training.local_batch_size", "1", "--parallelism.tensor_parallel_degree", "3"]  # 3 does not divide 4
    job, out = _submit(slurm_cluster, work, data, bad)
    info = slurm_cluster.wait_job(job, timeout=120)
    log = out.read_text(errors="replace")
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("torchtitan: error: ") and "tp(3)" in errors[0], log
    assert "2 nodes x 2 processes = 4 ranks" in errors[0]
    assert "head node" not in log and not (work / "torchrun_logs").exists()  # no srun, no torchrun
    assert time.monotonic() - started < 60
