"""N-D parallel Llama 3 training equals one process, on CPU ranks with gloo.

One launch per world size (2 and 4 ranks) runs every layout of that size on a freshly built
model (llama_parity.py); the tests below only judge the numbers it returns, so a failure
shows them. The model is the debug flavor shrunk to 4 layers, dim 64, 4 query / 2 kv heads,
vocab 256; 5 AdamW steps with clipping active on every step, fp32 unless stated.

What is compared with the single process that sees the whole global batch:
- the loss of every step (forward numerics, batch slicing, loss averaging);
- the gradient norm of every step, ours vs ``torch.nn.utils.clip_grad_norm_`` (catches a
  wrongly scaled or wrongly reduced gradient, which Adam's scale invariance would hide in
  the parameters);
- every parameter's gradient after the first backward (gathered with ``full_tensor()``),
  norm-wise relative error per tensor: faults that keep loss and norm inside tolerance (a
  norm weight left out of sequence parallel) show here on step 1;
- every final parameter gathered with ``full_tensor()``, norm-wise relative error;
- every FSDP unit's mixed-precision policy reduces gradients in the configured fp32.
The parallel side uses the project's loss, the reference cross-entropy written out by hand.
A layout that crashes fails its own test (harness.launch_layouts), not the launch's first.
fp32 tolerance 1e-5 relative; measured errors are ~1e-7 to ~5e-7. AdamW runs with
eps = 1e-6 in both runs, so coordinates whose gradient sits at the fp32 rounding floor are
not blown up to lr-sized steps (with eps = 1e-8 one such coordinate reached 1.5e-5).
"""

from __future__ import annotations

import math

import pytest

from harness import check_no_crash, launch_layouts

pytestmark = pytest.mark.slow

FP32_TOL = 1e-5
BF16_GRAD_TOL = 5e-2  # first-step gradients, bf16 layouts: see test_bf16_mixed_precision

TWO_RANK_LAYOUTS = [
    dict(name="fsdp2", dp_shard=2),
    dict(name="ddp2", dp_replicate=2),
    dict(name="tp2", tp=2),
    dict(name="tp2_no_loss_parallel", tp=2, loss_parallel=False),
    dict(name="fsdp2_ac_full", dp_shard=2, ac_mode="full"),
    dict(name="fsdp2_ac_selective2", dp_shard=2, ac_mode="selective", ac_option="2"),
    dict(name="fsdp2_ac_op", dp_shard=2, ac_mode="selective", ac_option="op"),
    dict(name="fsdp2_ac_op_all", dp_shard=2, ac_mode="selective", ac_option="op", op_saved_matmuls="all"),
    dict(name="fsdp2_bf16", dp_shard=2, mixed_precision="bfloat16"),
    dict(name="tp2_bf16", tp=2, mixed_precision="bfloat16"),
    # The AOTAutograd path that mis-routed gradients on CPU (docs/composability.md).
    dict(name="tp2_compile_aot_eager", tp=2, compile_backend="aot_eager"),
    dict(name="tp2_kv_heads_1", tp=2, n_kv_heads=1),
    dict(name="tp2_async_without_compile", tp=2, async_tp=True),
]

FOUR_RANK_LAYOUTS = [
    dict(name="fsdp4", dp_shard=4),
    dict(name="hsdp2x2", dp_replicate=2, dp_shard=2),
    dict(name="fsdp2_tp2", dp_shard=2, tp=2),
    dict(name="fsdp2_tp2_compile_inductor", dp_shard=2, tp=2, compile_backend="inductor"),
    dict(name="ddp2_tp2", dp_replicate=2, tp=2),
]


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    results, crashes = launch_layouts("llama_parity:main", 2, timeout=400, layouts=TWO_RANK_LAYOUTS, misc=True)
    return {**results[0], "crashes": crashes}


@pytest.fixture(scope="module")
def four_ranks() -> dict:
    results, crashes = launch_layouts(
        "llama_parity:main", 4, timeout=400, layouts=FOUR_RANK_LAYOUTS, clip=dict(dp_shard=2, tp=2)
    )
    return {**results[0], "crashes": crashes}


def _layout(results: dict, name: str) -> dict:
    check_no_crash(results["crashes"], name)
    return results["layouts"][name]


def _assert_matches(report: dict, tol: float = FP32_TOL) -> None:
    assert "error" not in report, report.get("error")
    assert not report["param_names_differ"], report["param_names_differ"]
    summary = {k: report[k] for k in ("loss_rel_err", "grad_norm_rel_err", "grad_rel_err", "param_rel_err")}
    assert report["loss_rel_err"] < tol, summary
    assert report["grad_norm_rel_err"] < tol, summary
    assert report["grad_rel_err"] < tol, summary
    assert report["param_rel_err"] < tol, summary
    assert set(report["fsdp_reduce_dtypes"]) <= {"torch.float32"}, report["fsdp_reduce_dtypes"]


@pytest.mark.parametrize(
    "name",
    [
        "fsdp2",
        "ddp2",
        "tp2",
        "tp2_no_loss_parallel",
        "fsdp2_ac_full",
        "fsdp2_ac_selective2",
        "fsdp2_ac_op",
        "fsdp2_ac_op_all",
        "tp2_compile_aot_eager",
    ],
)
def test_two_rank_layout_matches_single_process(two_ranks: dict, name: str) -> None:
    _assert_matches(_layout(two_ranks, name))


@pytest.mark.parametrize("name", ["fsdp4", "hsdp2x2", "fsdp2_tp2", "fsdp2_tp2_compile_inductor"])
def test_four_rank_layout_matches_single_process(four_ranks: dict, name: str) -> None:
    _assert_matches(_layout(four_ranks, name))


def test_compile_reuses_one_graph_for_all_blocks(two_ranks: dict, four_ranks: dict) -> None:
    # Identical blocks must share a compiled graph, or compile time grows with depth.
    assert two_ranks["layouts"]["tp2_compile_aot_eager"]["dynamo_graphs"] == 1
    assert four_ranks["layouts"]["fsdp2_tp2_compile_inductor"]["dynamo_graphs"] == 1


def test_activation_checkpointing_recomputes_what_its_mode_says(two_ranks: dict) -> None:
    """Count, in the first backward, matmuls and SDPA forwards (recomputation) per AC mode."""
    layouts = two_ranks["layouts"]
    ops = {
        name: layouts[name]["backward_ops"]
        for name in ("fsdp2", "fsdp2_ac_full", "fsdp2_ac_selective2", "fsdp2_ac_op", "fsdp2_ac_op_all")
    }
    sdpa = "_scaled_dot_product_flash_attention_for_cpu"
    extra_mm = {name: counts["mm"] - ops["fsdp2"]["mm"] for name, counts in ops.items()}
    n_layers = 4
    # No AC: backward runs no forward op.
    assert ops["fsdp2"].get(sdpa, 0) == 0
    # Full: every block's forward is rerun (attention included).
    assert ops["fsdp2_ac_full"].get(sdpa, 0) == n_layers
    assert extra_mm["fsdp2_ac_full"] > 0
    # Every 2nd block: half of that.
    assert ops["fsdp2_ac_selective2"].get(sdpa, 0) == n_layers // 2
    assert extra_mm["fsdp2_ac_selective2"] * 2 == extra_mm["fsdp2_ac_full"]
    # Full reruns 6 matmuls per block (w2's output is never needed again).
    assert extra_mm["fsdp2_ac_full"] == 6 * n_layers, extra_mm
    # Op-level: attention is saved, and of the matmuls only wk, wo and w3 are rerun.
    assert ops["fsdp2_ac_op"].get(sdpa, 0) == 0
    assert extra_mm["fsdp2_ac_op"] == 3 * n_layers, extra_mm
    # Op-level saving every matmul: no matmul and no attention is rerun.
    assert ops["fsdp2_ac_op_all"].get(sdpa, 0) == 0
    assert extra_mm["fsdp2_ac_op_all"] == 0, extra_mm


@pytest.mark.parametrize("name", ["fsdp2_bf16", "tp2_bf16"])
def test_bf16_mixed_precision(two_ranks: dict, name: str) -> None:
    """FSDP's bf16 parameters (reduce in fp32), and TP-only training under the trainer's
    autocast, against one process under bf16 autocast.

    The two do not round identically (FSDP computes every op on bf16 parameters; autocast
    keeps norms and softmax in fp32), so the bound is bf16's: a bf16 value carries a relative
    rounding error of up to 2^-9 ≈ 2e-3; the loss, a mean over 256 tokens, averages most of
    it away (measured ≤ 3e-4, bound 2e-3); gradient norms measured ≤ 2e-3 (bound 2e-2);
    the first step's gradients, per tensor, carry the roundings of every op of the backward
    chain: measured ≤ 1.1e-2 (bound 5e-2);
    parameters after 5 Adam steps measured ≤ 3e-2 (bound 1e-1), since Adam turns rounding
    noise on small gradients into step-sized differences.
    """
    report = _layout(two_ranks, name)
    assert "error" not in report, report.get("error")
    assert report["logits_dtype"] == "torch.bfloat16", "the layout silently trained in fp32"
    summary = {k: report[k] for k in ("loss_rel_err", "grad_norm_rel_err", "grad_rel_err", "param_rel_err")}
    assert report["loss_rel_err"] < 2e-3, summary
    assert report["grad_norm_rel_err"] < 2e-2, summary
    assert report["grad_rel_err"] < BF16_GRAD_TOL, summary
    assert report["param_rel_err"] < 1e-1, summary
    if name.startswith("fsdp"):
        # bf16 parameters, gradients reduced in the configured fp32 by every FSDP unit
        assert report["fsdp_reduce_dtypes"] == ["torch.float32"], report["fsdp_reduce_dtypes"]
    # And it really is lower precision: visibly different from the fp32 run.
    assert report["vs_fp32"]["loss_rel_err"] > 1e-5, report["vs_fp32"]


def test_tp_degree_must_divide_kv_heads(two_ranks: dict) -> None:
    error = two_ranks["layouts"]["tp2_kv_heads_1"].get("error", "")
    assert error.startswith("ConfigError"), error
    assert "parallelism.tensor_parallel_degree" in error and "1 key/value heads" in error
    assert "\n" not in error


def test_async_tp_needs_compile(two_ranks: dict) -> None:
    error = two_ranks["layouts"]["tp2_async_without_compile"].get("error", "")
    assert error.startswith("ConfigError"), error
    assert "parallelism.enable_async_tensor_parallel" in error and "compile.enable" in error


def test_ddp_with_tp_is_rejected(four_ranks: dict) -> None:
    error = four_ranks["layouts"]["ddp2_tp2"].get("error", "")
    assert error.startswith("ConfigError"), error
    assert "data_parallel_shard_degree" in error and "\n" not in error


@pytest.mark.parametrize("norm_type", ["2.0", "1.0", "inf"])
def test_clip_grad_norm_equals_torch_on_unsharded_grads(four_ranks: dict, norm_type: str) -> None:
    clip = four_ranks["clip"]
    # The layout must exercise the awkward placements: FSDP over TP gives _StridedShard.
    assert any("_StridedShard" in p for p in clip["placements"]), clip["placements"]
    assert any("Replicate" in p for p in clip["placements"]), clip["placements"]
    ours, expected = clip[norm_type]
    assert math.isclose(ours, expected, rel_tol=1e-5), (ours, expected)


def test_clip_grad_norm_scales_sharded_grads(four_ranks: dict) -> None:
    assert four_ranks["clip"]["clipped_rel_err"] < 1e-5


def test_clip_grad_norm_across_pipeline_stages(two_ranks: dict) -> None:
    misc = two_ranks["misc"]
    for key in ("pp_norm_2.0", "pp_norm_inf"):
        ours, expected = misc[key]
        assert math.isclose(ours, expected, rel_tol=1e-6), (key, ours, expected)


def test_logging_reductions(two_ranks: dict) -> None:
    misc = two_ranks["misc"]
    assert (misc["sum"], misc["max"], misc["mean"]) == pytest.approx(misc["expected"])


def test_set_pg_timeout_reaches_flattened_groups(two_ranks: dict) -> None:
    assert two_ranks["misc"]["timeout_s"] == 77


def test_unset_seed_is_shared_by_all_ranks(two_ranks: dict) -> None:
    seeds = two_ranks["misc"]["seeds"]
    assert len(set(seeds)) == 1, seeds
