"""Run a function on N CPU ranks (gloo) and collect what each rank returns.

A launch costs seconds (each rank imports torch), so tests put many checks into one launch:
``launch("module:function", world_size, **kwargs)`` spawns the ranks, each sets up the
process group through ``torchtitan.distributed.utils.init_distributed`` exactly as under
torchrun, calls ``function(**kwargs)``, and sends back its (picklable) return value. A rank
that raises sends its traceback; the others are then stopped instead of waiting for a
collective that will never come, and ``launch`` raises ``RankFailure`` with that traceback.
"""

from __future__ import annotations

import importlib
import os
import queue as queue_module
import socket
import sys
import tempfile
import time
import traceback
from typing import Any

import torch.multiprocessing as mp

__all__ = ["launch", "RankFailure"]

_HERE = os.path.dirname(os.path.abspath(__file__))


class RankFailure(RuntimeError):
    """A rank raised, died or timed out; the message carries its traceback."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    target: str,
    kwargs: dict[str, Any],
    results: Any,
    dump_folder: str,
    cpu_only: bool,
) -> None:
    if cpu_only:  # before anything initialises CUDA: gloo on CPU even on a GPU machine
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    if _HERE not in sys.path:
        sys.path.insert(0, _HERE)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # ranks share few cores; oversubscription only slows them
        from torchtitan.distributed.utils import init_distributed

        init_distributed(init_timeout_seconds=300, trace_buf_size=0, dump_folder=dump_folder)
        module_name, _, fn_name = target.partition(":")
        fn = getattr(importlib.import_module(module_name), fn_name)
        value = fn(**kwargs)
        dist.barrier()
        dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:  # report anything, then leave without waiting on peers
        results.put((rank, False, traceback.format_exc()))
        results.close()
        results.join_thread()  # the message must leave before os._exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def launch(
    target: str, world_size: int, timeout: float = 300.0, cpu_only: bool = True, **kwargs: Any
) -> list[Any]:
    """Run ``target`` ("module:function", module importable from tests/distributed or the
    package) on ``world_size`` ranks; return the per-rank results in rank order.

    ``cpu_only`` hides GPUs from the ranks, so the same gloo/CPU checks run on any machine;
    with ``cpu_only=False`` each rank takes GPU ``rank`` and NCCL (needs that many GPUs).
    Results must be picklable without CUDA (move tensors to the CPU).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    with tempfile.TemporaryDirectory() as dump_folder:
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(rank, world_size, port, target, kwargs, results, dump_folder, cpu_only),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        values: dict[int, Any] = {}
        failure: str | None = None
        deadline = time.monotonic() + timeout
        try:
            while len(values) < world_size and failure is None:
                try:
                    rank, ok, value = results.get(timeout=1.0)
                except queue_module.Empty:
                    dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in values]
                    if dead:
                        failure = f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
                    elif time.monotonic() > deadline:
                        failure = f"timed out after {timeout:.0f}s; ranks done: {sorted(values)}"
                    continue
                if ok:
                    values[rank] = value
                else:
                    failure = f"rank {rank} raised:\n{value}"
        finally:
            for p in procs:
                p.join(timeout=10.0 if failure is None else 0.5)
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5.0)
    if failure is not None:
        raise RankFailure(failure)
    return [values[r] for r in range(world_size)]
