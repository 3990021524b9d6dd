"""Pipeline parallelism equals one process, on CPU ranks with gloo.

One launch per world size (2, 4 and 8 ranks) runs every layout of that size
(pipeline_parity.py): an 8-layer debug Llama (dim 64, 4 / 2 heads, vocab 128) split into
stages by the real ``pipeline_llama``, trained 3 AdamW steps with clipping active, fp32,
compared with one process on the whole global batch: per-step loss, per-step gradient norm
(ours across stages vs torch's on the whole model), every parameter's gradient after the
first step and every final parameter. The stages use the project's loss, the reference a
hand-written cross-entropy. Tolerance 1e-5 relative; measured errors are ~1e-7 to ~1e-6.
A layout that crashes fails its own test (harness.launch_layouts).

The 2-rank launch also drives the real Trainer (PP 1F1B, PP Interleaved1F1B with explicit
split points, and TP 2 as the reference, all from the debug TOML), so the train.py
integration is what is tested there, not only the pieces.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import check_no_crash, launch_layouts
from small_trainer import small_trainer_args

from torchtitan.config import PIPELINE_SCHEDULES

pytestmark = pytest.mark.slow

FP32_TOL = 1e-5
REPO = Path(__file__).resolve().parents[2]
CSV_1F1B = str(REPO / "tests/assets/pp_1f1b.csv")

ALL_SCHEDULES = list(PIPELINE_SCHEDULES)  # GPipe, 1F1B, Interleaved1F1B, ..., DualPipeV

TWO_RANK_LAYOUTS = [
    *[dict(name=f"pp2_{s}", pp=2, schedule=s) for s in ALL_SCHEDULES],
    dict(name="pp2_csv_1f1b", pp=2, schedule="1F1B", csv=CSV_1F1B),
    dict(name="pp2_1f1b_split_uneven", pp=2, schedule="1F1B", split_points=["layers.3"]),
    dict(name="pp2_interleaved_layers_per_stage", pp=2, schedule="Interleaved1F1B", layers_per_stage=2),
    dict(name="pp2_1f1b_too_few_microbatches", pp=2, schedule="1F1B", microbatch_size=8),
    dict(name="pp2_gpipe_wrong_stage_count", pp=2, schedule="GPipe", split_points=["layers.2", "layers.4"]),
]

FOUR_RANK_LAYOUTS = [
    *[dict(name=f"pp4_{s}", pp=4, schedule=s) for s in ALL_SCHEDULES],
    *[
        dict(name=f"pp2_fsdp2_{s}", pp=2, dp_shard=2, schedule=s)
        for s in ("1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
    ],
    dict(name="pp2_fsdp2_1F1B_reshard_always", pp=2, dp_shard=2, schedule="1F1B", reshard="always"),
    # The chunked loss under PP x FSDP (FSDP's root hooks and the labels keyword together).
    dict(name="pp2_fsdp2_1F1B_chunked_loss", pp=2, dp_shard=2, schedule="1F1B", loss_chunk_size=8),
    dict(name="pp2_fsdp2_ZBV_chunked_loss", pp=2, dp_shard=2, schedule="ZBVZeroBubble", loss_chunk_size=8),
    dict(name="pp2_fsdp2_ZBV_reshard_always", pp=2, dp_shard=2, schedule="ZBVZeroBubble", reshard="always"),
    # Microbatches of 2: DTensor collectives cost per microbatch on gloo, and 4 microbatches
    # still fill both stages (and both chunks per rank for the interleaved and V schedules).
    *[
        dict(name=f"pp2_tp2_{s}", pp=2, tp=2, schedule=s, microbatch_size=2)
        for s in ("1F1B", "Interleaved1F1B", "ZBVZeroBubble")
    ],
]

EIGHT_RANK_LAYOUTS = [
    dict(name=f"pp2_fsdp2_tp2_{s}", pp=2, dp_shard=2, tp=2, schedule=s) for s in ("1F1B", "Interleaved1F1B")
]


def _common_trainer_args(dump: str) -> list[str]:
    """The debug TOML in fp32 with 4 samples of 64 tokens per step and clipping active."""
    return small_trainer_args(
        dump,
        "--training.seq_len", "64",
        "--training.global_batch_size", "4",
        "--training.max_norm", "0.5",
        "--activation_checkpoint.mode", "none",
        "--metrics.log_freq", "1",
    )


def _trainer_configs(dump: str) -> dict[str, list[str]]:
    common = _common_trainer_args(dump)
    pp = ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1",
          "--training.local_batch_size", "4"]
    return {
        # The reference: one data-parallel replica, so the same batches as the pipelines get
        # (a dp-2 run reads a different global batch from the loader's dp shards).
        "tp2": [*common, "--parallelism.tensor_parallel_degree", "2", "--parallelism.data_parallel_shard_degree",
                "1", "--training.local_batch_size", "4"],
        "pp2_1f1b": [*common, *pp, "--parallelism.pipeline_parallel_schedule", "1F1B",
                     "--parallelism.pipeline_parallel_microbatch_size", "2"],
        # debugmodel has 6 layers: stages [0,1] [2] [3,4] [5], two per rank.
        "pp2_interleaved_split": [*common, *pp, "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
                                  "--parallelism.pipeline_parallel_split_points", "layers.2,layers.3,layers.5"],
        # The chunked loss (8 chunks of 16 tokens per microbatch): the last stage computes
        # the loss itself from the labels the schedule hands it per microbatch.
        "pp2_1f1b_chunked_loss": [*common, *pp, "--parallelism.pipeline_parallel_schedule", "1F1B",
                                  "--parallelism.pipeline_parallel_microbatch_size", "2",
                                  "--training.loss_chunk_size", "16"],
        "pp2_interleaved_chunked_loss": [*common, *pp, "--parallelism.pipeline_parallel_schedule",
                                         "Interleaved1F1B", "--training.loss_chunk_size", "16"],
        # Two stages per rank, checkpointed at steps 2 and 3; then TP 2 resumes from step 2
        # (a PP -> TP reshard) and trains step 3: it must end where the tp2 run ended.
        "pp2_interleaved_ckpt": [*common, *pp, "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
                                 "--parallelism.pipeline_parallel_split_points", "layers.2,layers.3,layers.5",
                                 "--checkpoint.enable", "--checkpoint.interval", "2",
                                 "--job.dump_folder", f"{dump}/pp_ckpt"],
        "tp2_resumed_from_pp": [*common, "--parallelism.tensor_parallel_degree", "2",
                                "--parallelism.data_parallel_shard_degree", "1", "--training.local_batch_size", "4",
                                "--checkpoint.enable", "--checkpoint.load_step", "2",
                                "--job.dump_folder", f"{dump}/pp_ckpt"],
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    dump = str(tmp_path_factory.mktemp("pp_trainer"))
    results, crashes = launch_layouts(
        "pipeline_parity:main",
        2,
        timeout=500,
        layouts=TWO_RANK_LAYOUTS,
        trainers=_trainer_configs(dump),
        trainer_reference="tp2",
    )
    return {**results[0], "crashes": crashes}


def _cp_trainer_configs(dump: str) -> dict[str, list[str]]:
    """PP 2 x CP 2 through the real Trainer against CP 4 (itself tested against one process in
    test_context_parallel.py): one data-parallel replica in both, so the same batches."""
    common = [*_common_trainer_args(dump), "--training.local_batch_size", "4",
              "--parallelism.data_parallel_shard_degree", "1"]
    pp_cp = [*common, "--parallelism.pipeline_parallel_degree", "2", "--parallelism.context_parallel_degree", "2"]
    return {
        "cp4": [*common, "--parallelism.context_parallel_degree", "4"],
        "pp2_cp2_1f1b": [*pp_cp, "--parallelism.pipeline_parallel_schedule", "1F1B",
                         "--parallelism.pipeline_parallel_microbatch_size", "2"],
        # two stages per rank, the chunked loss, keys and values exchanged all-to-all
        "pp2_cp2_interleaved_chunked_alltoall": [
            *pp_cp, "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
            "--training.loss_chunk_size", "16", "--parallelism.context_parallel_rotate_method", "alltoall"],
    }


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> dict:
    dump = str(tmp_path_factory.mktemp("pp_cp_trainer"))
    results, crashes = launch_layouts(
        "pipeline_parity:main",
        4,
        timeout=600,
        layouts=FOUR_RANK_LAYOUTS,
        trainers=_cp_trainer_configs(dump),
        trainer_reference="cp4",
    )
    return {**results[0], "crashes": crashes}


@pytest.fixture(scope="module")
def eight_ranks() -> dict:
    results, crashes = launch_layouts("pipeline_parity:main", 8, timeout=500, layouts=EIGHT_RANK_LAYOUTS)
    return {**results[0], "crashes": crashes}


def _layout(results: dict, name: str) -> dict:
    check_no_crash(results["crashes"], name)
    return results["layouts"][name]


def _trainer(results: dict, name: str) -> dict:
    check_no_crash(results["crashes"], name)
    return results["trainers"][name]


def _assert_matches(report: dict, tol: float = FP32_TOL) -> None:
    assert "error" not in report, report.get("error")
    assert not report["param_names_differ"], report["param_names_differ"]
    summary = {k: report[k] for k in ("loss_rel_err", "grad_norm_rel_err", "grad_rel_err", "param_rel_err")}
    assert report["loss_rel_err"] < tol, summary
    assert report["grad_norm_rel_err"] < tol, summary
    assert report["grad_rel_err"] < tol, summary
    assert report["param_rel_err"] < tol, summary


@pytest.mark.parametrize("schedule", ALL_SCHEDULES)
def test_every_schedule_on_two_ranks_matches_single_process(two_ranks: dict, schedule: str) -> None:
    report = _layout(two_ranks, f"pp2_{schedule}")
    _assert_matches(report)
    assert report["schedule_class"] == f"Schedule{schedule}"


V_STYLE = {"ZBVZeroBubble", "DualPipeV"}  # rank r holds stages r and 2 pp - 1 - r


@pytest.mark.parametrize("schedule", ALL_SCHEDULES)
def test_rank_zero_holds_the_stages_its_schedule_expects(two_ranks: dict, schedule: str) -> None:
    """Rank 0 of PP 2: stage 0 (the embeddings) always; a looped schedule adds stage 2 (no
    embeddings, no output), a V schedule stage 3 (the output)."""
    parts = _layout(two_ranks, f"pp2_{schedule}")["stage_fqns"]
    assert "tok_embeddings" in parts[0] and "output" not in parts[0], parts[0]
    if len(parts) == 1:
        assert schedule in ("GPipe", "1F1B"), schedule
    else:
        assert len(parts) == 2 and "tok_embeddings" not in parts[1], parts
        assert ("output" in parts[1]) == (schedule in V_STYLE), (schedule, parts[1])


@pytest.mark.parametrize("schedule", ALL_SCHEDULES)
def test_every_schedule_on_four_ranks_matches_single_process(four_ranks: dict, schedule: str) -> None:
    _assert_matches(_layout(four_ranks, f"pp4_{schedule}"))


@pytest.mark.parametrize("name", ["pp2_1f1b_split_uneven", "pp2_interleaved_layers_per_stage"])
def test_explicit_splits_match_single_process(two_ranks: dict, name: str) -> None:
    _assert_matches(_layout(two_ranks, name))


def test_custom_csv_schedule_reproduces_1f1b(two_ranks: dict) -> None:
    csv_report = _layout(two_ranks, "pp2_csv_1f1b")
    _assert_matches(csv_report)
    assert csv_report["schedule_class"] == "_PipelineScheduleRuntime"
    # Same microbatch order and accumulation order as torch's 1F1B: the same losses.
    assert csv_report["losses_exact"] == pytest.approx(_layout(two_ranks, "pp2_1F1B")["losses_exact"], rel=1e-7)


@pytest.mark.parametrize(
    "schedule", ["1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]
)
def test_pp_with_fsdp_matches_and_keeps_parameters_gathered(four_ranks: dict, schedule: str) -> None:
    report = _layout(four_ranks, f"pp2_fsdp2_{schedule}")
    _assert_matches(report)
    # Default policy under PP: no FSDP unit reshards after forward.
    flags = report["reshard_after_forward"]
    assert flags and not any(flags), flags


def test_reshard_always_is_honoured_for_1f1b(four_ranks: dict) -> None:
    report = _layout(four_ranks, "pp2_fsdp2_1F1B_reshard_always")
    _assert_matches(report)
    flags = report["reshard_after_forward"]
    assert flags and all(flags), flags  # an empty list would mean no FSDP unit was found


def test_reshard_always_is_refused_for_zero_bubble(four_ranks: dict) -> None:
    error = _layout(four_ranks, "pp2_fsdp2_ZBV_reshard_always").get("error", "")
    assert error.startswith("ConfigError"), error
    assert "fsdp_reshard_after_forward" in error and "ZBVZeroBubble" in error and "\n" not in error


@pytest.mark.parametrize("name", ["pp2_cp2_1f1b", "pp2_cp2_interleaved_chunked_alltoall"])
def test_trainer_with_pp_and_cp_matches_cp_alone(four_ranks: dict, name: str) -> None:
    """Context parallel inside the pipeline: the whole pipelined step runs in the CP context
    (inputs, labels and every stage's rotary table sharded along the sequence; SDPA as ring
    attention), stages pass sequence shards; same losses and parameters as CP 4."""
    ref, run = _trainer(four_ranks, "cp4"), _trainer(four_ranks, name)
    assert len(run["losses"]) == len(ref["losses"]) == 3
    assert run["losses"] == pytest.approx(ref["losses"], rel=FP32_TOL)
    assert not run["param_names_differ"], run["param_names_differ"]
    assert run["param_rel_err"] < FP32_TOL, run["param_rel_err"]


@pytest.mark.parametrize("name", ["pp2_fsdp2_1F1B_chunked_loss", "pp2_fsdp2_ZBV_chunked_loss"])
def test_chunked_loss_under_pp_and_fsdp_matches(four_ranks: dict, name: str) -> None:
    """The last stage computes the loss in chunks from the labels keyword the schedule hands
    it per microbatch: same losses, gradient norms and parameters as one process."""
    _assert_matches(_layout(four_ranks, name))


@pytest.mark.parametrize("schedule", ["1F1B", "Interleaved1F1B", "ZBVZeroBubble"])
def test_pp_with_tp_matches(four_ranks: dict, schedule: str) -> None:
    _assert_matches(_layout(four_ranks, f"pp2_tp2_{schedule}"))


@pytest.mark.parametrize("schedule", ["1F1B", "Interleaved1F1B"])
def test_pp_fsdp_tp_3d_matches(eight_ranks: dict, schedule: str) -> None:
    _assert_matches(_layout(eight_ranks, f"pp2_fsdp2_tp2_{schedule}"))


def test_bad_microbatch_count_is_one_line_error(two_ranks: dict) -> None:
    error = _layout(two_ranks, "pp2_1f1b_too_few_microbatches").get("error", "")
    assert error.startswith("ConfigError"), error
    assert "1F1B" in error and "microbatch" in error and "\n" not in error


def test_stage_count_must_fit_schedule(two_ranks: dict) -> None:
    error = _layout(two_ranks, "pp2_gpipe_wrong_stage_count").get("error", "")
    assert error.startswith("ConfigError"), error
    assert "pipeline_parallel_split_points" in error and "\n" not in error


# ---- the real Trainer ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["pp2_1f1b", "pp2_interleaved_split", "pp2_1f1b_chunked_loss", "pp2_interleaved_chunked_loss"]
)
def test_trainer_with_pp_matches_trainer_without(two_ranks: dict, name: str) -> None:
    """Same TOML, same seed: the pipelined Trainer starts from the same weights (per-stage
    init from the seeded full model), sees the same global batch, reports the same loss on
    every step, and ends with the same parameters as TP 2 (itself tested against one
    process in test_llama_parity.py)."""
    ref, run = _trainer(two_ranks, "tp2"), _trainer(two_ranks, name)
    assert len(run["losses"]) == len(ref["losses"]) == 3
    assert run["losses"] == pytest.approx(ref["losses"], rel=FP32_TOL)
    assert run["losses"][-1] < run["losses"][0]
    assert not run["param_names_differ"], run["param_names_differ"]
    assert run["param_rel_err"] < FP32_TOL, run["param_rel_err"]


def test_trainer_model_parts_are_this_ranks_stages(two_ranks: dict) -> None:
    trainers = {name: _trainer(two_ranks, name) for name in ("tp2", "pp2_1f1b", "pp2_interleaved_split")}
    assert trainers["tp2"]["n_parts"] == 1
    assert trainers["pp2_1f1b"]["n_parts"] == 1
    # Rank 0 of Interleaved1F1B holds stages 0 and 2: embeddings first, norm/output on neither.
    assert trainers["pp2_interleaved_split"]["n_parts"] == 2
    first, third = trainers["pp2_interleaved_split"]["part_fqns"]
    assert "tok_embeddings" in first and "output" not in first
    assert "tok_embeddings" not in third and "output" not in third


def test_checkpoint_of_two_stages_per_rank_has_the_plain_model_keys_and_resumes_under_tp(two_ranks: dict) -> None:
    """Interleaved 1F1B puts two stages on each rank; its checkpoint must still hold one entry
    per parameter of the whole model, under the plain model's names, so that any layout can
    load it: TP 2 resumes from its step 2 and finishes step 3 where the uninterrupted TP 2
    run did (the data loader position travels too)."""
    trainers = {name: _trainer(two_ranks, name) for name in ("pp2_interleaved_ckpt", "tp2_resumed_from_pp", "tp2")}
    saved = trainers["pp2_interleaved_ckpt"]["checkpoint_keys"]
    assert sorted(saved) == [2, 3], saved.keys()
    plain = {f"model.{name}" for name in trainers["tp2"]["param_names"]}
    assert set(saved[2]) == plain, sorted(set(saved[2]) ^ plain)[:5]
    resumed, ref = trainers["tp2_resumed_from_pp"], trainers["tp2"]
    assert len(resumed["losses"]) == 1  # only step 3 ran
    assert resumed["losses"][0] == pytest.approx(ref["losses"][2], rel=FP32_TOL)
    assert not resumed["param_names_differ"] and resumed["param_rel_err"] < FP32_TOL, resumed["param_rel_err"]
