"""DeepSeek-V3 under FSDP / TP / EP / PP / CP equals one process, with the real trainer, on CPU/gloo.

The driver is the MoE parity tests' (moe_parity.run_layouts with ``model="deepseek_v3"``):
``debugmodel`` (queries straight from ``dim``) and ``debugmodel_lora`` (low-rank queries:
``wq_a``, ``q_norm``, ``wq_b``), each 1 dense + 3 MoE blocks of 8 experts in 4 groups, top 2,
one shared expert, aux-loss-free bias updates on, at a quarter of their width
(moe_parity.DEEPSEEK_V3_SHAPE_OVERRIDES), fp32, 3 AdamW steps with clipping active, the same
global batch of 4 x 32 tokens in every layout. Three launches: one process (the reference of
both flavors), 2 ranks (seven layouts), 4 ranks (three). Compared with the reference: the
loss and the gradient norm of every step, every parameter after the last step (norm-wise
relative error) and every MoE layer's expert bias; tolerances those of test_moe_parity.

Layouts: FSDP 2; TP 2 of each flavor (multi-head latent attention's plan: the latents
replicated, the heads split); EP 2; PP 2 (1F1B); CP 2; EP 2 with 2 micro-batches, compiled
(aot_eager) around the routed experts, with selective op AC; FSDP 2 x TP 2 and PP 2 x TP 2
(low-rank queries); EP 2 x TP 2.

The parameters are what catch a wrong TP plan: a plan that hands the attention plain local
tensors (as Qwen3's does) leaves the shared rotary key's gradient summed over this rank's
heads only; the losses then still match to 2e-7 but ``wkv_a`` ends 2e-2 off.

Measured errors (2026-12-03, 2 CPU cores): losses <= 1.2e-7, parameters <= 8.8e-7, gradient
norms <= 2.3e-5 (the CPU norm kernel, see test_moe_parity.GRAD_NORM_TOL), biases identical;
~25 s for the module (the layouts take 0.2-4.5 s each).
"""

from __future__ import annotations

import pytest
from test_moe_parity import _merge, assert_layout_matches

from harness import check_no_crash, launch, launch_layouts

pytestmark = pytest.mark.slow

LORA = ["--model.flavor", "debugmodel_lora"]
TWO_RANKS = {
    "fsdp2": ["--training.local_batch_size", "2"],
    "tp2": ["--training.local_batch_size", "4", "--parallelism.tensor_parallel_degree", "2"],
    "tp2_lora": [*LORA, "--training.local_batch_size", "4", "--parallelism.tensor_parallel_degree", "2"],
    "ep2": ["--training.local_batch_size", "2", "--parallelism.expert_parallel_degree", "2"],
    "pp2": ["--training.local_batch_size", "4", "--parallelism.pipeline_parallel_degree", "2"],
    "cp2": ["--training.local_batch_size", "4", "--parallelism.context_parallel_degree", "2"],
    # 2 micro-batches; compiled around the routed experts (aot_eager) with selective op AC
    "ep2_accum2_compile_op_sac": [
        "--training.local_batch_size", "1", "--parallelism.expert_parallel_degree", "2",
        "--compile.enable", "--compile.backend", "aot_eager",
        "--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op",
    ],
}
FOUR_RANKS = {
    "fsdp2_tp2_lora": [*LORA, "--training.local_batch_size", "2", "--parallelism.tensor_parallel_degree", "2"],
    "pp2_tp2_lora": [
        *LORA, "--training.local_batch_size", "4", "--parallelism.pipeline_parallel_degree", "2",
        "--parallelism.tensor_parallel_degree", "2",
    ],
    "ep2_tp2": [
        "--training.local_batch_size", "2", "--parallelism.expert_parallel_degree", "2",
        "--parallelism.tensor_parallel_degree", "2",
    ],
}
REFERENCE = {"debugmodel": [], "debugmodel_lora": LORA}


def _flavor(args: list[str]) -> str:
    return "debugmodel_lora" if args[: len(LORA)] == LORA else "debugmodel"


@pytest.fixture(scope="module")
def reference():
    layouts = [(flavor, ["--training.local_batch_size", "4", *args]) for flavor, args in REFERENCE.items()]
    return launch("moe_parity:run_layouts", 1, layouts=layouts, model="deepseek_v3")[0]


@pytest.fixture(scope="module")
def results():
    out, crashes = {}, {}
    for world, layouts in ((2, TWO_RANKS), (4, FOUR_RANKS)):
        ranks, failed = launch_layouts(
            "moe_parity:run_layouts", world, layouts=list(layouts.items()), model="deepseek_v3"
        )
        crashes.update(failed)
        out.update({name: _merge(ranks, name) for name in layouts if name not in failed})
    out["crashes"] = crashes
    return out


@pytest.mark.parametrize("name", [*TWO_RANKS, *FOUR_RANKS])
def test_layout_matches_one_process(reference, results, name):
    check_no_crash(results["crashes"], name)
    ref = reference[_flavor({**TWO_RANKS, **FOUR_RANKS}[name])]
    assert_layout_matches(results[name], ref, name, moe_blocks=3)  # layers 1-3; layer 0 is dense
