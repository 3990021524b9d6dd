"""The parity checks of test_llama_parity.py on CUDA GPUs with NCCL (2 GPUs; 4 for the
4-rank layouts). Same model, data and tolerances; compile runs with inductor here, since
the CPU-only AOTAutograd question does not arise on CUDA."""

from __future__ import annotations

import pytest
import torch

from harness import launch
from test_llama_parity import FOUR_RANK_LAYOUTS, TWO_RANK_LAYOUTS, _assert_matches

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

FP32_NAMES = [
    "fsdp2",
    "ddp2",
    "tp2",
    "tp2_no_loss_parallel",
    "fsdp2_ac_full",
    "fsdp2_ac_selective2",
    "fsdp2_ac_op",
    "tp2_compile_inductor",
    "tp2_async_compile",
]
GPU_TWO_RANK = [
    layout for layout in TWO_RANK_LAYOUTS if layout["name"] in FP32_NAMES + ["fsdp2_bf16", "tp2_bf16"]
] + [
    dict(name="tp2_compile_inductor", tp=2, compile_backend="inductor"),
    dict(name="tp2_async_compile", tp=2, compile_backend="inductor", async_tp=True),
]


def _gpus(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} CUDA GPUs")


@pytest.fixture(scope="module")
def two_gpus() -> dict:
    _gpus(2)
    return launch("llama_parity:main", 2, timeout=600, cpu_only=False, layouts=GPU_TWO_RANK)[0]


@pytest.fixture(scope="module")
def four_gpus() -> dict:
    _gpus(4)
    return launch(
        "llama_parity:main",
        4,
        timeout=600,
        cpu_only=False,
        layouts=FOUR_RANK_LAYOUTS,
        clip=dict(dp_shard=2, tp=2),
    )[0]


@pytest.mark.parametrize("name", FP32_NAMES)
def test_two_gpu_layout_matches_single_gpu(two_gpus: dict, name: str) -> None:
    _assert_matches(two_gpus["layouts"][name])


@pytest.mark.parametrize("name", ["fsdp2_bf16", "tp2_bf16"])
def test_two_gpu_bf16(two_gpus: dict, name: str) -> None:
    report = two_gpus["layouts"][name]
    assert report["logits_dtype"] == "torch.bfloat16"
    assert report["loss_rel_err"] < 2e-3 and report["param_rel_err"] < 1e-1, report


@pytest.mark.parametrize("name", ["fsdp4", "hsdp2x2", "fsdp2_tp2", "fsdp2_tp2_compile_inductor"])
def test_four_gpu_layout_matches_single_gpu(four_gpus: dict, name: str) -> None:
    _assert_matches(four_gpus["layouts"][name])


def test_four_gpu_clip_grad_norm(four_gpus: dict) -> None:
    for norm_type in ("2.0", "1.0", "inf"):
        ours, expected = four_gpus["clip"][norm_type]
        assert ours == pytest.approx(expected, rel=1e-5), norm_type
