"""Every rank must run the same config (``activation_checkpoint.mode = "auto"`` resolves per
rank, before the process group exists): two gloo ranks compare theirs at the trainer's start."""

from __future__ import annotations

import json
import os
import socket

import torch.multiprocessing as mp

from small_trainer import small_trainer_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from torchtitan.config import ConfigError
    from torchtitan.distributed.utils import check_same_config

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    same = small_trainer_config(out, "--activation_checkpoint.mode", "selective",
                                "--activation_checkpoint.selective_ac_option", "op")
    differ = small_trainer_config(out, "--activation_checkpoint.mode", "selective",
                                  "--activation_checkpoint.selective_ac_option", "op",
                                  "--activation_checkpoint.op_ac_layers", str(13 + 2 * rank))
    for name, cfg in (("same", same), ("differ", differ)):
        try:
            check_same_config(cfg)
            results[name] = "ok"
        except ConfigError as e:
            results[name] = str(e)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def test_ranks_with_different_configs_stop_with_one_line_naming_the_option(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["same"] for r in results] == ["ok", "ok"]
    for r in results:  # every rank stops, with the same line
        assert r["differ"].startswith("the ranks run different configs: activation_checkpoint.op_ac_layers "
                                      "is 13 on rank 0 and 15 on rank 1 (activation_checkpoint.mode = auto")
        assert "\n" not in r["differ"]
