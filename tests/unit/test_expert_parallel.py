"""Expert parallelism without launching ranks: option checks, the ep meshes, the EP sharding
of a meta model, and the one-line refusal of a bad layout by ``torchtitan.train``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from torchtitan.config import ConfigError, ConfigManager
from torchtitan.distributed.layout import validate_layout
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models import check_model_config

REPO = Path(__file__).resolve().parents[2]


def _cfg(*args: str):
    return ConfigManager().parse_args(["--model.name", "qwen3", "--model.flavor", "debugmodel_moe", *args])


@pytest.mark.parametrize(
    "world, args, message",
    [
        (4, ["--parallelism.expert_parallel_degree", "3"], "expert_parallel_degree 3 must divide data_parallel_shard"),
        (8, ["--parallelism.expert_parallel_degree", "2", "--parallelism.tensor_parallel_degree", "4"],
         "expert_parallel_degree 2 must be >= parallelism.tensor_parallel_degree 4"),
        (4, ["--parallelism.expert_parallel_degree", "4", "--parallelism.data_parallel_shard_degree", "2",
             "--parallelism.data_parallel_replicate_degree", "2"], "must divide data_parallel_shard_degree"),
    ],
)
def test_layout_refuses_bad_ep_degrees(world, args, message):
    with pytest.raises(ConfigError, match=message):
        validate_layout(_cfg(*args), world)


def test_layout_accepts_ep_borrowed_from_dp_shard_and_cp():
    check = validate_layout(
        _cfg("--parallelism.expert_parallel_degree", "4", "--parallelism.context_parallel_degree", "2"), 4
    )
    assert check.parallel_dims.ep == 4 and check.parallel_dims.dp_shard == 2
    assert check.parallel_dims.ep_enabled


def test_option_below_one_is_refused():
    with pytest.raises(ConfigError, match="expert_parallel_degree"):
        _cfg("--parallelism.expert_parallel_degree", "0")


def test_model_checks():
    with pytest.raises(ConfigError, match="expert_parallel_degree 16 must divide the number of experts 8"):
        check_model_config(_cfg("--parallelism.expert_parallel_degree", "16"))
    with pytest.raises(ConfigError, match="needs an MoE model"):
        check_model_config(
            ConfigManager().parse_args(
                ["--model.name", "qwen3", "--model.flavor", "debugmodel", "--parallelism.expert_parallel_degree", "2"]
            )
        )
    check_model_config(_cfg("--parallelism.expert_parallel_degree", "8"))
    with pytest.raises(ConfigError, match="needs an MoE model"):
        check_model_config(ConfigManager().parse_args(["--model.name", "llama3", "--parallelism.expert_parallel_degree", "2"]))
    check_model_config(ConfigManager().parse_args(["--model.name", "llama3"]))


@pytest.fixture
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=5, world_size=16)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ep_meshes(fake_world):
    pd = ParallelDims(dp_replicate=2, dp_shard=2, cp=2, tp=2, pp=1, world_size=16, ep=2)
    pd.build_mesh("cpu")
    # rank 5 = (dp_replicate 0, dp_shard 1, cp 0, tp 1): its dp_shard x cp ranks are 1, 3, 5, 7;
    # EP takes the inner pairs of that list, FSDP of the experts the outer.
    assert pd.get_mesh("dp_shard_cp").mesh.tolist() == [1, 3, 5, 7]
    assert pd.get_mesh("ep").mesh.tolist() == [5, 7]
    assert pd.get_mesh("dp_shard_mod_ep").mesh.tolist() == [1, 5]
    hsdp = pd.get_mesh(("dp_replicate", "dp_shard_mod_ep"))
    assert hsdp.mesh.tolist() == [[1, 5], [9, 13]]


def test_apply_ep_shards_experts_on_meta(fake_world):
    from torch.distributed.tensor import DTensor, Shard

    from torchtitan.distributed.expert_parallel import apply_ep
    from torchtitan.models.qwen3 import Qwen3Transformer, qwen3_configs

    pd = ParallelDims(dp_replicate=1, dp_shard=16, cp=1, tp=1, pp=1, world_size=16, ep=4)
    pd.build_mesh("cpu")
    import copy

    args = copy.deepcopy(qwen3_configs["debugmodel_moe"])
    args.vocab_size = 128
    with torch.device("meta"):
        model = Qwen3Transformer(args)
    apply_ep(model, pd.get_mesh("ep"))
    w1 = model.layers["0"].moe.experts.w1
    assert isinstance(w1, DTensor) and w1.placements == (Shard(0),)
    assert w1.shape[0] == 8 and w1.to_local().shape[0] == 2
    assert model.layers["0"].moe.experts.ep_dispatcher.num_local == 2
    assert not isinstance(model.layers["0"].moe.router.gate.weight, DTensor)


def test_train_refuses_bad_ep_in_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "torchtitan.train", "--model.name", "qwen3", "--model.flavor", "debugmodel_moe",
         "--parallelism.expert_parallel_degree", "3", "--model.tokenizer_path", "tests/assets/test_tiktoken.model"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("torchtitan: error:")]
    assert len(lines) == 1 and "expert_parallel_degree 3" in lines[0], out.stderr[-2000:]
