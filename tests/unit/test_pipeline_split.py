"""Pipeline stage layout without processes: how layers are cut, where stages go, what a
stage holds, and the one-line errors for options that cannot work."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

from torchtitan.config import ConfigError
from torchtitan.distributed import pipeline as pp_lib
from torchtitan.models.llama3 import Transformer, llama3_configs
from torchtitan.models.llama3.pipeline import split_llama

CSV_1F1B = str(Path(__file__).resolve().parents[1] / "assets" / "pp_1f1b.csv")


def _sizes(layout: pp_lib.StageLayout) -> list[int]:
    return [len(layout.layers_of(s)) for s in range(layout.num_stages)]


def test_single_stage_schedules_put_one_even_stage_per_rank() -> None:
    layout = pp_lib.resolve_stage_layout(8, pp=2, schedule="1F1B")
    assert layout.num_stages == 2 and layout.layer_starts == (0, 4)
    assert layout.rank_stages == ((0,), (1,))


@pytest.mark.parametrize("schedule", ["Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble"])
@pytest.mark.parametrize("pp", [2, 4])
def test_looped_schedules_place_stage_s_on_rank_s_mod_pp(schedule: str, pp: int) -> None:
    layout = pp_lib.resolve_stage_layout(8, pp=pp, schedule=schedule)
    assert layout.num_stages == 2 * pp
    expected = generate_stage_to_rank_mapping(pp, 2 * pp, style="loop")  # torch's own mapping
    for rank, stages in enumerate(layout.rank_stages):
        assert stages == tuple(s for s in range(2 * pp) if expected[s] == rank)
    assert _sizes(layout) == [8 // (2 * pp)] * (2 * pp)


@pytest.mark.parametrize("schedule", ["ZBVZeroBubble", "DualPipeV"])
@pytest.mark.parametrize("pp", [2, 4])
def test_v_schedules_put_stages_r_and_2pp_minus_1_minus_r_on_rank_r(schedule: str, pp: int) -> None:
    layout = pp_lib.resolve_stage_layout(8, pp=pp, schedule=schedule)
    expected = generate_stage_to_rank_mapping(pp, 2 * pp, style="v")
    for rank, stages in enumerate(layout.rank_stages):
        assert stages == (rank, 2 * pp - 1 - rank)
        assert all(expected[s] == rank for s in stages)
    assert layout.rank_stages[0] == (0, 2 * pp - 1)  # first and last stage share rank 0


def test_uneven_split_gives_extra_layers_to_early_stages() -> None:
    layout = pp_lib.resolve_stage_layout(6, pp=2, schedule="Interleaved1F1B")
    assert _sizes(layout) == [2, 2, 1, 1]
    assert sum(_sizes(layout)) == 6


def test_split_points_and_layers_per_stage() -> None:
    layout = pp_lib.resolve_stage_layout(8, pp=2, schedule="1F1B", split_points=["layers.3"])
    assert _sizes(layout) == [3, 5]
    layout = pp_lib.resolve_stage_layout(6, pp=2, schedule="Interleaved1F1B",
                                         split_points=["layers.2", "layers.3", "layers.5"])
    assert _sizes(layout) == [2, 1, 2, 1] and layout.rank_stages == ((0, 2), (1, 3))
    layout = pp_lib.resolve_stage_layout(8, pp=2, schedule="Interleaved1F1B", layers_per_stage=2)
    assert layout.num_stages == 4 and _sizes(layout) == [2, 2, 2, 2]
    layout = pp_lib.resolve_stage_layout(7, pp=2, schedule="1F1B", layers_per_stage=4)
    assert _sizes(layout) == [4, 3]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(schedule="1F1B", split_points=["layer.3"]), ["split_points", "'layers.N'"]),
        (dict(schedule="Interleaved1F1B", split_points=["layers.4", "layers.2", "layers.6"]), ["increasing"]),
        (dict(schedule="1F1B", split_points=["layers.8"]), ["split_points"]),
        (dict(schedule="GPipe", split_points=["layers.2", "layers.4"]), ["split_points", "one stage per rank"]),
        (dict(schedule="Interleaved1F1B", layers_per_stage=3), ["layers_per_stage", "multiple"]),
        (dict(schedule="ZBVZeroBubble", layers_per_stage=1), ["V-shaped", "2 stages per rank"]),
        (dict(schedule="Interleaved1F1B", pp=8), ["every stage needs a layer"]),
        (dict(schedule="NoSuchSchedule"), ["pipeline_parallel_schedule", "NoSuchSchedule"]),
    ],
)
def test_bad_layouts_are_one_line_config_errors(kwargs: dict, words: list[str]) -> None:
    kwargs = {"pp": 2, **kwargs}
    n_layers = 4 if kwargs["pp"] == 8 else 8
    with pytest.raises(ConfigError) as e:
        pp_lib.resolve_stage_layout(n_layers, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_stage_module_names_put_embeddings_first_and_output_last() -> None:
    layout = pp_lib.resolve_stage_layout(8, pp=2, schedule="Interleaved1F1B")
    names = [pp_lib.stage_module_names(layout, s) for s in range(4)]
    assert names[0] == ["tok_embeddings", "layers.0", "layers.1"]
    assert names[1] == ["layers.2", "layers.3"]
    assert names[3] == ["layers.6", "layers.7", "norm", "output"]


def _tiny_args():
    return dataclasses.replace(
        copy.deepcopy(llama3_configs["debugmodel"]),
        dim=32, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16,
    )


def test_stages_keep_original_names_and_chain_to_the_whole_model() -> None:
    torch.manual_seed(0)
    model = Transformer(_tiny_args())
    model.init_weights()
    layout = pp_lib.resolve_stage_layout(6, pp=2, schedule="ZBVZeroBubble")
    stages = split_llama(model, layout, tuple(range(layout.num_stages)))
    full = dict(model.named_parameters())
    seen: list[str] = []
    for stage in stages:
        for name, param in stage.named_parameters():
            assert torch.equal(param, full[name]), name  # same name, same tensor values
            seen.append(name)
    assert sorted(seen) == sorted(full)  # every parameter on exactly one stage
    assert stages[0].output is None and stages[-1].tok_embeddings is None
    assert list(stages[1].layers.keys()) == ["2", "3"]  # sizes 2, 2, 1, 1
    assert len(model.layers) == 6 and model.output is not None  # the original stays whole
    tokens = torch.randint(0, 64, (2, 16))
    h = tokens
    with torch.no_grad():
        for stage in stages:
            h = stage(h)
        torch.testing.assert_close(h, model(tokens), rtol=0, atol=0)


def test_split_works_on_meta() -> None:
    with torch.device("meta"):
        model = Transformer(_tiny_args())
    layout = pp_lib.resolve_stage_layout(6, pp=2, schedule="1F1B")
    first, last = split_llama(model, layout, (0, 1))
    assert {n.split(".")[0] for n, _ in first.named_parameters()} == {"tok_embeddings", "layers"}
    assert {n.split(".")[0] for n, _ in last.named_parameters()} == {"layers", "norm", "output"}
    assert first.state_dict().keys().isdisjoint(last.state_dict().keys())


def test_microbatch_count_and_validation() -> None:
    assert pp_lib.num_microbatches(8, 2, None) == 4
    assert pp_lib.num_microbatches(8, 1, 2) == 2  # an explicit count wins
    with pytest.raises(ConfigError, match="pipeline_parallel_microbatch_size"):
        pp_lib.num_microbatches(8, 3, None)
    with pytest.raises(ConfigError, match="pipeline_parallel_microbatches"):
        pp_lib.num_microbatches(8, 1, 3)
    pp_lib.validate_microbatches("GPipe", 1, 2, 2)  # GPipe takes any count
    pp_lib.validate_microbatches("1F1B", 2, 2, 2)
    with pytest.raises(ConfigError, match="at least as many microbatches as stages"):
        pp_lib.validate_microbatches("1F1B", 1, 2, 2)
    with pytest.raises(ConfigError, match="DualPipeV"):
        pp_lib.validate_microbatches("DualPipeV", 3, 4, 2)
    pp_lib.validate_microbatches("Interleaved1F1B", 3, 8, 4)  # fewer than pp: one round
    pp_lib.validate_microbatches("Interleaved1F1B", 10, 8, 4)  # 2 rounds of 5
    with pytest.raises(ConfigError, match="rounds"):
        pp_lib.validate_microbatches("Interleaved1F1B", 9, 8, 4)


def test_csv_schedule_stages() -> None:
    assert pp_lib.csv_stage_ids(CSV_1F1B, 2) == [(0,), (1,)]
    layout = pp_lib.resolve_stage_layout(8, pp=2, schedule="anything", schedule_csv=CSV_1F1B)
    assert layout.num_stages == 2 and layout.rank_stages == ((0,), (1,))
    with pytest.raises(ConfigError, match="2 rows but pipeline_parallel_degree is 4"):
        pp_lib.csv_stage_ids(CSV_1F1B, 4)
    with pytest.raises(ConfigError, match="does not exist"):
        pp_lib.csv_stage_ids(CSV_1F1B + ".missing", 2)


def test_csv_schedule_is_1f1b_order() -> None:
    """The asset is 1F1B for 2 ranks and 8 microbatches: one warm-up forward on rank 0, then
    alternate; every microbatch's forward precedes its backward; backwards in order."""
    rows = [line.split(",") for line in Path(CSV_1F1B).read_text().split()]
    for rank, row in enumerate(rows):
        fwd = [a for a in row if "F" in a]
        bwd = [a for a in row if "B" in a]
        assert fwd == [f"{rank}F{i}" for i in range(8)] and bwd == [f"{rank}B{i}" for i in range(8)]
        warmup = row.index(f"{rank}B0")
        assert warmup == 2 - rank  # pp - rank forwards before the first backward
        assert all("F" in a for a in row[:warmup])
        steady = row[warmup : row.index(f"{rank}F7") + 1]
        assert all(("B" in a) == (i % 2 == 0) for i, a in enumerate(steady)), steady  # B, F, B, F ...
        assert row[len(row) - (2 - rank) :] == [f"{rank}B{i}" for i in range(6 + rank, 8)]  # cool-down


def test_reshard_policy() -> None:
    pp_lib.check_reshard_policy("1F1B", "always")
    pp_lib.check_reshard_policy("ZBVZeroBubble", "default")
    for schedule in pp_lib.ZERO_BUBBLE_SCHEDULES:
        with pytest.raises(ConfigError, match="fsdp_reshard_after_forward"):
            pp_lib.check_reshard_policy(schedule, "always")
    with pytest.raises(ConfigError, match="schedule file"):
        pp_lib.check_reshard_policy("1F1B", "always", schedule_csv=CSV_1F1B)


def test_every_named_schedule_exists_in_this_torch() -> None:
    for name in pp_lib.SCHEDULES:
        cls = pp_lib.get_schedule_class(name)
        assert cls.__name__ == f"Schedule{name}"
        assert pp_lib.is_multi_stage_schedule(name) == (name not in ("GPipe", "1F1B"))


@pytest.mark.parametrize(
    "n_layers, stages, first, last, sizes",
    [
        (8, 2, 1, 1, [4, 4]),  # 10 units: 5 + 5, less one each
        (16, 4, 1, 1, [4, 5, 4, 3]),  # 18 units: 5, 5, 4, 4
        (6, 2, 2, 0, [2, 4]),
        (5, 1, 3, 3, [5]),
    ],
)
def test_weighted_split_counts_embedding_and_output_as_layers(n_layers, stages, first, last, sizes):
    """TorchTitan's first/last_stage_less_layers: the embedding and the output count as layers."""
    schedule = "1F1B" if stages <= 2 else "Interleaved1F1B"
    layout = pp_lib.resolve_stage_layout(
        n_layers, pp=min(stages, 2), schedule=schedule, first_stage_less_layers=first, last_stage_less_layers=last
    )
    got = [len(layout.layers_of(s)) for s in range(layout.num_stages)]
    assert got == sizes and sum(got) == n_layers


def test_weighted_split_refuses_a_stage_without_layers():
    with pytest.raises(ConfigError, match="without a layer"):
        pp_lib.resolve_stage_layout(3, pp=2, schedule="1F1B", first_stage_less_layers=4)
