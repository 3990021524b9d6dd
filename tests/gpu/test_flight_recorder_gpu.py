"""End to end on 2 GPUs: rank 1 skips an all_reduce, NCCL times out, both ranks dump
their Flight Recorder buffers, and the analysis names the collective and the rank."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchtitan.tools.flight_recorder import dump_trace, find_desyncs, load_dumps, run_torch_analyzer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]


def _worker(rank: int, port: int, trace_dir: str) -> None:
    # What torchtitan.distributed.utils.init_distributed sets when comm.trace_buf_size > 0.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCH_FR_BUFFER_SIZE="100",
        TORCH_NCCL_DUMP_ON_TIMEOUT="1",
        TORCH_FR_DUMP_TEMP_FILE=os.path.join(trace_dir, "rank_"),
    )
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=5))
    t = torch.ones(1024, device="cuda")
    dist.all_reduce(t)
    dist.broadcast(t, 0)
    torch.cuda.synchronize()
    if rank == 0:
        dist.all_reduce(t)  # rank 1 never joins: this one times out
        torch.cuda.synchronize()
        time.sleep(90)  # the watchdog dumps, then tears the process down
    else:
        # Rank 0's watchdog signals the timeout through the store and rank 1's dumps too;
        # rank 0's teardown can win that race, so dump by hand if none came.
        mine = os.path.join(trace_dir, "rank_1")
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(trace_dir, "rank_0")) and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(10)
        if not os.path.exists(mine):
            dump_trace(trace_dir, rank)
        time.sleep(5)
    os._exit(0)


def test_nccl_timeout_dumps_and_analysis(tmp_path):
    trace_dir = tmp_path / "comm_traces"
    trace_dir.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_worker, args=(port, str(trace_dir)), nprocs=2, start_method="spawn", join=False)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(trace_dir.glob("rank_[0-9]"))) < 2:
            time.sleep(1)
        time.sleep(2)  # let the second writer finish
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
    dumps = load_dumps(str(trace_dir))
    assert sorted(dumps) == [0, 1], f"dumps written: {sorted(os.listdir(trace_dir))}"
    (desync,) = find_desyncs(dumps)
    assert desync.collective == "nccl:all_reduce" and desync.seq_id == 3
    assert desync.missing_ranks == (1,) and desync.present_ranks == (0,)

    text = run_torch_analyzer(dumps)
    assert "Not all ranks joining collective" in text and "missing ranks: {1}" in text
