"""Run a function on N CPU ranks (gloo) and collect what each rank returns.

A launch costs seconds, so tests put many checks into one launch:
``launch("module:function", world_size, **kwargs)`` starts the ranks, each sets up the
process group through ``torchtitan.distributed.utils.init_distributed`` exactly as under
torchrun, calls ``function(**kwargs)``, and sends back its (picklable) return value. A rank
that raises sends its traceback; the others are then stopped instead of waiting for a
collective that will never come, and ``launch`` raises ``RankFailure`` with that traceback.

Ranks are forked from multiprocessing's fork server, a clean process started once per pytest
session (like a spawned one: it has imported only the torch modules in ``_PRELOAD`` and has
not touched CUDA), so a rank does not spend seconds importing torch. Each rank then takes
the launching process's current environment, working directory and ``sys.path``, as a
spawned one would.

Several layouts share a launch, so a crash must still be pinned on its layout: rank-side
drivers run each one inside ``layout_scope(name)``, and ``launch_layouts`` turns a crash
into that layout's entry of ``crashes`` and relaunches the others, so pytest reports the
failure on the faulty layout's test (``check_no_crash``) and still judges the rest.
"""

from __future__ import annotations

import gc
import importlib
import os
import contextlib
import queue as queue_module
import re
import socket
import sys
import tempfile
import time
import traceback
from typing import Any

import torch.multiprocessing as mp

__all__ = ["launch", "launch_layouts", "layout_scope", "check_no_crash", "LayoutCrashed", "RankFailure"]

_HERE = os.path.dirname(os.path.abspath(__file__))


class RankFailure(RuntimeError):
    """A rank raised, died or timed out; the message carries its traceback."""


class LayoutCrashed(RuntimeError):
    """A layout raised (not a numeric mismatch); the message names it and carries the traceback."""


_CRASH = re.compile(r"LayoutCrashed: layout '([^']+)' crashed")


@contextlib.contextmanager
def layout_scope(name: str):
    """Rank side: tag any exception escaping the block with the layout's name."""
    try:
        yield
    except Exception as e:
        raise LayoutCrashed(f"layout {name!r} crashed") from e


def _entry_name(entry: Any) -> str | None:
    if isinstance(entry, dict):
        return entry.get("name")
    if isinstance(entry, (tuple, list)) and entry and isinstance(entry[0], str):
        return entry[0]
    return None


def _without(kwargs: dict[str, Any], name: str) -> dict[str, Any] | None:
    """``kwargs`` with the layout ``name`` dropped from whichever list (or dict) holds it,
    or, for a check run under a keyword's own name, without that keyword."""
    if name in kwargs:
        return {k: v for k, v in kwargs.items() if k != name}
    for key, value in kwargs.items():
        if isinstance(value, list) and any(_entry_name(v) == name for v in value):
            return {**kwargs, key: [v for v in value if _entry_name(v) != name]}
        if isinstance(value, dict) and name in value:
            return {**kwargs, key: {k: v for k, v in value.items() if k != name}}
    return None


def launch_layouts(
    target: str, world_size: int, timeout: float = 300.0, **kwargs: Any
) -> tuple[list[Any], dict[str, str]]:
    """``launch``, but a layout that crashes (inside ``layout_scope``) is dropped and the
    launch rerun without it. Returns the per-rank results and ``{layout: traceback}``.
    Costs a relaunch per crashed layout, i.e. nothing while the code is healthy."""
    crashes: dict[str, str] = {}
    while True:
        try:
            return launch(target, world_size, timeout, **kwargs), crashes
        except RankFailure as e:
            found = _CRASH.search(str(e))
            rest = _without(kwargs, found.group(1)) if found else None
            if rest is None or found.group(1) in crashes:
                raise
            crashes[found.group(1)] = str(e)
            kwargs = rest


def check_no_crash(crashes: dict[str, str], name: str) -> None:
    """Test side: fail this layout's test with its own traceback if it crashed."""
    if name in crashes:
        raise LayoutCrashed(f"layout {name!r} crashed in its launch:\n{crashes[name][-4000:]}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported once by the fork server; nothing from torchtitan, which reads the devices on import.
_PRELOAD = [
    "torch",
    "torch._dynamo",
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "torch.distributed.pipelining",
    "torch.distributed.tensor",
]


def _share_meshes() -> None:
    """Build one DeviceMesh per shape per launch (ParallelDims.build_mesh still runs, flattened
    views included, on the shared mesh). Every mesh creates a gloo process group per dim, and
    each group keeps a thread that wakes 100 times a second until the launch ends: a launch
    that builds a mesh per layout piled up ~400 such threads per rank, which slowed the
    later layouts about twofold on two cores."""
    import functools

    from torchtitan.distributed import parallel_dims

    parallel_dims.init_device_mesh = functools.cache(parallel_dims.init_device_mesh)


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    target: str,
    kwargs: dict[str, Any],
    results: Any,
    dump_folder: str,
    cpu_only: bool,
    environ: dict[str, str],
) -> None:
    os.environ.clear()  # the launcher's environment now, not the fork server's at its start
    os.environ.update(environ)
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
        _share_meshes()
        from torchtitan.distributed.utils import init_distributed

        init_distributed(init_timeout_seconds=300, trace_buf_size=0, dump_folder=dump_folder)
        module_name, _, fn_name = target.partition(":")
        fn = getattr(importlib.import_module(module_name), fn_name)
        gc.freeze()  # the imported modules: ~10% of a rank's time went to re-scanning them
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
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (first launch)
    results = ctx.Queue()
    port = _free_port()
    with tempfile.TemporaryDirectory() as dump_folder:
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(rank, world_size, port, target, kwargs, results, dump_folder, cpu_only, dict(os.environ)),
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
