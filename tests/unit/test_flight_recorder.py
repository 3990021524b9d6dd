"""Flight Recorder dumps from a real 2-rank gloo run where rank 1 skips a collective."""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchtitan.tools.flight_recorder import (
    FlightRecorderError,
    dump_trace,
    find_desyncs,
    load_dumps,
    main,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCH_FR_BUFFER_SIZE="64")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))
    sub = dist.new_group([0, 1])
    t = torch.ones(4)
    dist.all_reduce(t)
    dist.broadcast(t, 0, group=sub)
    dist.all_reduce(t, group=sub)
    if rank == 0:
        # Rank 1 "forgot" this one. Issued async so the dump needs no timeout to pass; the
        # recorder logs a collective when it is enqueued.
        work = dist.all_gather_into_tensor(torch.empty(8), torch.ones(4), async_op=True)
        dump_trace(out, rank)
        try:
            work.wait(datetime.timedelta(seconds=1))
        except RuntimeError:
            pass
    else:
        while not os.path.exists(os.path.join(out, "rank_0")):
            time.sleep(0.05)
        # The trainer's hook for a failed step: writes <dump_folder>/comm_traces/rank_<r>.
        from torchtitan.tools.flight_recorder import dump_on_failure

        dump_on_failure(64, os.path.dirname(out), rank)
    os._exit(0)  # rank 0 has a collective in flight: skip the orderly teardown


@pytest.fixture(scope="module")
def gloo_dumps(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("run") / "comm_traces")  # trace_dir(dump_folder)
    os.makedirs(out)
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, start_method="spawn", join=True)
    return out


def test_dump_has_process_groups_and_entries(gloo_dumps):
    dumps = load_dumps(gloo_dumps)
    assert sorted(dumps) == [0, 1]
    names0 = [e["profiling_name"] for e in dumps[0]["entries"]]
    names1 = [e["profiling_name"] for e in dumps[1]["entries"]]
    assert names0 == ["gloo:all_reduce", "gloo:broadcast", "gloo:all_reduce", "gloo:all_gather"]
    assert names1 == names0[:3]
    # gloo leaves pg_config empty; dump_trace fills in every group's members.
    for dump in dumps.values():
        assert all(eval(v["ranks"]) == [0, 1] for v in dump["pg_config"].values())
        assert {str(e["process_group"][0]) for e in dump["entries"]} <= set(dump["pg_config"])


def test_desync_names_collective_rank_and_seq(gloo_dumps):
    dumps = load_dumps(gloo_dumps)
    desyncs = find_desyncs(dumps)
    assert len(desyncs) == 1
    d = desyncs[0]
    default_pg = str(dumps[0]["entries"][0]["process_group"][0])
    assert (d.pg_name, d.collective, d.seq_id) == (default_pg, "gloo:all_gather", 2)
    assert d.missing_ranks == (1,) and d.present_ranks == (0,)
    assert not d.mismatched_names


def test_script_prints_both_analyses(gloo_dumps, capsys):
    rc = main([gloo_dumps])
    out = capsys.readouterr().out
    assert rc == 1
    assert "DESYNC gloo:all_gather (seq 2)" in out and "never by ranks [1]" in out
    # PyTorch's analyzer reached the same verdict on the same files.
    torch_part = out.split("PyTorch flight recorder analyzer")[1]
    assert "Not all ranks joining collective, sequence number: 2" in torch_part
    assert "missing ranks: {1}" in torch_part


def _synthetic(rank: int, names: list[str]) -> dict:
    entries = [
        {
            "record_id": i, "pg_id": 0, "process_group": ("0", "default_pg"), "collective_seq_id": i + 1,
            "p2p_seq_id": 0, "op_id": i + 1, "profiling_name": n, "input_sizes": [[4]],
            "output_sizes": [[4]], "state": "completed", "is_p2p": False, "retired": True,
            "timeout_ms": 1000, "frames": [],
        }
        for i, n in enumerate(names)
    ]
    return {"version": "2.10", "pg_config": {"0": {"name": "0", "desc": "default_pg", "ranks": "[0, 1, 2]"}},
            "pg_status": {}, "entries": entries}


def test_mismatched_collectives_and_in_sync_ranks(tmp_path):
    same = ["nccl:all_reduce", "nccl:all_gather"]
    for r in range(3):
        (tmp_path / f"rank_{r}").write_bytes(pickle.dumps(_synthetic(r, same)))
    assert find_desyncs(load_dumps(str(tmp_path))) == []
    (tmp_path / "rank_2").write_bytes(pickle.dumps(_synthetic(2, ["nccl:all_reduce", "nccl:reduce_scatter"])))
    (d,) = find_desyncs(load_dumps(str(tmp_path)))
    assert d.seq_id == 2 and d.mismatched_names
    assert d.collective == "nccl:all_gather vs nccl:reduce_scatter"


def test_any_file_prefix_and_folder(tmp_path):
    """comm.save_traces_folder / save_traces_file_prefix: <dump_folder>/<folder>/<prefix><rank>,
    which the analysis reads whatever the prefix."""
    from torchtitan.tools.flight_recorder import trace_dir

    folder = trace_dir(str(tmp_path), "traces")
    assert folder == str(tmp_path / "traces")
    os.makedirs(folder)
    for r in range(2):
        with open(os.path.join(folder, f"fr_{r}"), "wb") as f:
            f.write(pickle.dumps(_synthetic(r, ["nccl:all_reduce"])))
    assert sorted(load_dumps(folder)) == [0, 1]


def test_json_dumps_and_wrapped_buffers(tmp_path):
    """The JSON dump format reads the same; ring buffers that dropped different amounts of
    history are compared only where every rank still holds entries."""
    import json

    full = _synthetic(0, ["nccl:all_reduce"] * 8)
    for rank, keep in ((0, 4), (1, 6), (2, 8)):  # rank 0 kept seq 5..8, rank 1 3..8, rank 2 1..8
        dump = dict(full, entries=full["entries"][-keep:])
        (tmp_path / f"rank_{rank}").write_text(json.dumps(dump))
    dumps = load_dumps(str(tmp_path))
    assert [e["collective_seq_id"] for e in dumps[0]["entries"]] == [5, 6, 7, 8]
    assert find_desyncs(dumps) == []
    dump = dict(full, entries=full["entries"][-6:-1])  # rank 1 stops after seq 7
    (tmp_path / "rank_1").write_text(json.dumps(dump))
    (d,) = find_desyncs(load_dumps(str(tmp_path)))
    assert (d.seq_id, d.missing_ranks, d.present_ranks) == (8, (1,), (0, 2))


def test_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(FlightRecorderError, match="does not exist"):
        load_dumps(str(tmp_path / "nope"))
    with pytest.raises(FlightRecorderError, match="no rank_<N> trace files"):
        load_dumps(str(tmp_path))
    (tmp_path / "rank_0").write_bytes(b"garbage")
    with pytest.raises(FlightRecorderError, match="not a Flight Recorder dump"):
        load_dumps(str(tmp_path))
    assert main([str(tmp_path / "nope")]) == 2
    monkeypatch.delenv("TORCH_FR_BUFFER_SIZE", raising=False)
    monkeypatch.delenv("TORCH_NCCL_TRACE_BUFFER_SIZE", raising=False)
    assert dump_trace(str(tmp_path / "off"), 0) is None  # recorder off: no misleading empty dump
    assert not (tmp_path / "off").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
