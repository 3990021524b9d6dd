"""ParallelDims validation, derived flags and the single-process mesh; the per-layout
helpers that need no second rank (autocast choice, train context, TP head check)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist

from torchtitan.config import ConfigError
from torchtitan.distributed import utils as dist_utils
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.tensor_parallel import check_tp_divisibility


def dims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, world_size=1, **kw) -> ParallelDims:
    return ParallelDims(dp_replicate, dp_shard, cp, tp, pp, world_size, **kw)


# ---- validation ------------------------------------------------------------------------
def test_dp_shard_minus_one_takes_the_rest() -> None:
    assert dims(dp_replicate=2, dp_shard=-1, tp=2, pp=2, world_size=32).dp_shard == 4
    assert dims(dp_shard=-1, world_size=1).dp_shard == 1


def test_product_mismatch_names_the_degrees_and_the_fix() -> None:
    with pytest.raises(ConfigError) as e:
        dims(dp_shard=3, tp=2, world_size=4)
    message = str(e.value)
    assert message == (
        "parallelism degrees dp_replicate(1) × dp_shard(3) × cp(1) × tp(2) × pp(1) = 6 ≠ "
        "world size 4; set parallelism.data_parallel_shard_degree to 2 or -1"
    )


def test_product_mismatch_without_a_dp_shard_fix() -> None:
    with pytest.raises(ConfigError, match=r"= 3 ≠ world size 4; choose degrees whose product is 4"):
        dims(tp=3, world_size=4)


def test_minus_one_without_solution() -> None:
    with pytest.raises(ConfigError, match=r"world size 4 is not divisible by .* = 3"):
        dims(dp_shard=-1, tp=3, world_size=4)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(tp=0), "parallelism.tensor_parallel_degree"),
        (dict(pp=-1), "parallelism.pipeline_parallel_degree"),
        (dict(dp_shard=0), "parallelism.data_parallel_shard_degree"),
        (dict(dp_replicate=-1), "parallelism.data_parallel_replicate_degree"),
        (dict(cp=0), "parallelism.context_parallel_degree"),
    ],
)
def test_degrees_below_one_are_rejected(kwargs: dict, option: str) -> None:
    with pytest.raises(ConfigError) as e:
        dims(**kwargs)
    assert str(e.value).startswith(option) and "\n" not in str(e.value)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# ---- derived flags ---------------------------------------------------------------------
def test_flags_of_a_5d_layout() -> None:
    pd = dims(dp_replicate=2, dp_shard=2, cp=2, tp=4, pp=2, world_size=64)
    assert pd.dp_enabled and pd.dp_replicate_enabled and pd.dp_shard_enabled
    assert pd.fsdp_enabled and pd.cp_enabled and pd.tp_enabled and pd.pp_enabled
    assert pd.loss_parallel_enabled and pd.dp_cp_enabled
    assert pd.dp_degree == 4
    assert pd.non_data_parallel_size == 2 * 4 * 2
    assert pd.seq_len_divisor == 4 * 2 * 2


def test_flags_single_device() -> None:
    pd = dims()
    assert not any(
        [
            pd.dp_enabled,
            pd.fsdp_enabled,
            pd.tp_enabled,
            pd.pp_enabled,
            pd.cp_enabled,
            pd.loss_parallel_enabled,
            pd.dp_cp_enabled,
        ]
    )
    assert pd.dp_degree == 1 and pd.non_data_parallel_size == 1 and pd.seq_len_divisor == 1


def test_cp_alone_turns_fsdp_on_and_ddp_is_not_fsdp() -> None:
    assert dims(cp=2, world_size=2).fsdp_enabled
    ddp = dims(dp_replicate=2, world_size=2)
    assert ddp.dp_enabled and not ddp.fsdp_enabled


def test_loss_parallel_needs_tp_and_can_be_disabled() -> None:
    assert dims(tp=2, world_size=2).loss_parallel_enabled
    assert not dims(tp=2, world_size=2, enable_loss_parallel=False).loss_parallel_enabled
    assert not dims(dp_shard=2, world_size=2).loss_parallel_enabled


# ---- the mesh on one process ----------------------------------------------------------
@pytest.fixture
def single_process_group():
    """A 1-rank group for the test, removed afterwards unless someone else made it."""
    created = not dist.is_initialized()
    if created:
        assert dist_utils.init_distributed(60, trace_buf_size=0, dump_folder="/tmp") == 1
    yield
    if created and dist.is_initialized():
        dist.destroy_process_group()


def test_single_process_mesh_has_every_dim(single_process_group) -> None:
    if dist.get_world_size() != 1:
        pytest.skip("needs a 1-rank process group")
    pd = dims()
    mesh = pd.build_mesh("cpu")
    assert mesh.mesh_dim_names == ("pp", "dp_replicate", "dp_shard", "cp", "tp")
    assert tuple(mesh.shape) == (1, 1, 1, 1, 1)
    assert pd.build_mesh("cpu") is mesh  # built once
    for name in ("tp", "pp", "dp", "dp_shard_cp", "dp_cp"):
        assert pd.get_mesh(name).size() == 1
    assert pd.get_mesh(("dp_replicate", "dp_shard_cp")).mesh_dim_names == ("dp_replicate", "dp_shard_cp")
    assert pd.dp_rank_and_size(mesh) == (0, 1)
    with pytest.raises(KeyError, match="no mesh dim 'dpp'"):
        pd.get_mesh("dpp")
    # Logging reductions on a 1-rank mesh and on no mesh at all.
    assert dist_utils.dist_mean(torch.tensor(2.5), pd.get_mesh("dp_cp")) == 2.5
    assert dist_utils.dist_max(3.0, None) == 3.0


def test_world_mesh_before_build_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="build_mesh"):
        dims().world_mesh


# ---- per-layout helpers ---------------------------------------------------------------
@pytest.mark.parametrize(
    "layout, autocast",
    [
        (dict(), True),  # one device
        (dict(tp=2, world_size=2), True),  # TP only: FSDP is not there to cast
        (dict(dp_replicate=2, world_size=2), True),  # DDP
        (dict(pp=2, world_size=2), True),
        (dict(dp_shard=2, world_size=2), False),  # FSDP's MixedPrecisionPolicy casts
        (dict(dp_shard=2, tp=2, world_size=4), False),
    ],
)
def test_amp_only_where_fsdp_does_not_cast(layout: dict, autocast: bool) -> None:
    ctx = dist_utils.maybe_enable_amp(dims(**layout).fsdp_enabled, "bfloat16", "cpu")
    linear = torch.nn.Linear(4, 4)
    for _ in range(2):  # the trainer enters the same object every step
        with ctx:
            out = linear(torch.randn(2, 4))
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert isinstance(dist_utils.maybe_enable_amp(dims().fsdp_enabled, "float32", "cpu"), contextlib.nullcontext)
    with pytest.raises(ConfigError, match="training.mixed_precision_param"):
        dist_utils.maybe_enable_amp(dims().fsdp_enabled, "fp8", "cpu")


def test_train_context_enters_loss_parallel_and_extra_context() -> None:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel.loss import customized_loss_ops

    def loss_parallel_active() -> bool:
        return set(customized_loss_ops) <= set(DTensor._op_dispatcher._custom_op_handlers)

    entered = []

    @contextlib.contextmanager
    def marker():
        entered.append(True)
        yield

    with dist_utils.get_train_context(False, False)(marker()):
        assert entered == [True]
        assert not loss_parallel_active()
    with dist_utils.get_train_context(True, False)():
        assert loss_parallel_active()
    assert not loss_parallel_active()


def test_tp_degree_must_divide_kv_heads_on_a_meta_model() -> None:
    from torchtitan.models.llama3 import Transformer, llama3_configs

    args = dataclasses.replace(
        copy.deepcopy(llama3_configs["debugmodel"]),
        dim=64,
        n_layers=1,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=32,
    )
    with torch.device("meta"):
        model = Transformer(args)
    check_tp_divisibility(model, 2)
    with pytest.raises(ConfigError) as e:
        check_tp_divisibility(model, 4)
    assert "parallelism.tensor_parallel_degree 4" in str(e.value)
    assert "2 key/value heads" in str(e.value)


def test_async_tp_needs_the_compiled_model_on_cuda():
    from torchtitan.distributed.tensor_parallel import check_async_tp

    check_async_tp(False, False, "cpu")  # off: nothing to check
    check_async_tp(True, True, "cuda")
    with pytest.raises(ConfigError, match="needs compile.enable"):
        check_async_tp(True, False, "cuda")
    with pytest.raises(ConfigError, match="needs CUDA GPUs"):
        check_async_tp(True, True, "cpu")
