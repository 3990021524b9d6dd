"""Launching one benchmark entry: ``run_train.sh`` (torchrun, one node) or ``srun ...
torchrun`` inside a SLURM allocation, with its output teed to a log and an optional timeout
that stops the whole process group."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from torchtitan.benchmarking.sweep import REPO, Entry, SweepError

__all__ = ["RDZV_PORT", "Launch", "build_launch", "run_launch", "slurm_hosts"]

RDZV_PORT = 29500

@dataclass
class Launch:
    """A command and the environment variables it adds; ``shell()`` is what --dry prints."""

    env: dict[str, str]
    argv: list[str]

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.argv)}".strip()


def slurm_hosts() -> list[str] | None:
    """The allocation's host names, first = head; None outside an allocation."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.split() or None


def build_launch(entry: Entry, launcher: str, dump_folder: str, extra: list[str],
                 hosts: list[str] | None, srun_args: list[str]) -> Launch:
    """The command for one entry. torchrun: run_train.sh with its NGPU/CONFIG_FILE/LOG_RANK
    variables (one node). srun: one torchrun per node as in multinode_trainer.slurm, with a
    c10d rendezvous at the entry's first node (placeholder when the hosts are unknown)."""
    args = entry.trainer_args(dump_folder, extra)
    if launcher == "torchrun":
        if entry.nnodes > 1:
            raise SweepError(
                f"entry '{entry.name}' has nnodes = {entry.nnodes}: use --launcher srun inside a "
                "SLURM allocation"
            )
        env = {"NGPU": str(entry.ngpu), "CONFIG_FILE": entry.config_file, "LOG_RANK": "0",
               "MAX_RESTARTS": "0"}
        return Launch(env, ["./run_train.sh", *args])
    if hosts is not None and len(hosts) < entry.nnodes:
        raise SweepError(f"entry '{entry.name}' needs {entry.nnodes} nodes; the allocation has {len(hosts)}")
    nodes = hosts[: entry.nnodes] if hosts else ["<head_node>"]
    env = {
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
        "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0"),
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3"),
    }
    n = str(entry.nnodes)
    srun = ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1"]
    if hosts:
        srun.append(f"--nodelist={','.join(nodes)}")
    rdzv_id = f"{os.environ.get('SLURM_JOB_ID', 'benchmark')}_{entry.name}"
    return Launch(env, [
        *srun, *srun_args,
        "torchrun", "--nnodes", n, "--nproc_per_node", str(entry.ngpu),
        "--rdzv_id", rdzv_id, "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{nodes[0]}:{RDZV_PORT}",
        "--max-restarts", "0", "--local-ranks-filter", "0", "--role", "rank", "--tee", "3",
        "-m", "torchtitan.train", "--job.config_file", entry.config_file, *args,
    ])


def run_launch(launch: Launch, log_path: Path, timeout: float | None, verbose: bool) -> int | None:
    """Run from the repository root, output to ``log_path`` (and stderr when verbose).
    Returns the exit code, or None after a timeout (the whole process group is stopped)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        log.write(f"$ {launch.shell()}\n")
        log.flush()
        proc = subprocess.Popen(
            launch.argv, cwd=REPO, env={**os.environ, **launch.env}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
        )

        def copy() -> None:
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    log.write(line)
                    if verbose:
                        sys.stderr.write(line)
            except ValueError:  # the log was closed: a straggler outlived the join below
                pass

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            code = None
        except KeyboardInterrupt:
            _stop(proc)
            raise
        reader.join(timeout=10)
    return code


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the launched process group (torchrun passes it on), SIGKILL if it lingers."""
    for sig, grace in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
