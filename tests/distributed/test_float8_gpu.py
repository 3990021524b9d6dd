"""Float8 with tensor parallelism on 2 GPUs (NCCL): torchao's float8 TP plans all-gather
activations in float8, which gloo cannot carry, so this runs on GPUs only (float8_parity.py).

TP 2 (tensorwise, float8 TP plans) and FSDP 2 × float8 all-gather against one float8 GPU:
the activation scales are computed on the gathered (DTensor) activation in TP, so the casts
equal one process's up to reduction order; loss and grad norm within 1e-3 relative.
"""

from __future__ import annotations

import pytest
import torch

from harness import launch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

LAYOUTS = [
    dict(name="fsdp2", dp_shard=2),
    dict(name="fsdp2_ag_pre", dp_shard=2, all_gather=True, precompute=True, compare_to="fsdp2"),
    dict(name="tp2", tp=2),
    dict(name="tp2_no_loss_parallel", tp=2, loss_parallel=False),
]


@pytest.fixture(scope="module")
def report() -> dict:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs float8 matmuls (SM 8.9+)")
    return launch("float8_parity:main", 2, timeout=600, cpu_only=False, layouts=LAYOUTS)[0]


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2_ag_pre", "tp2", "tp2_no_loss_parallel"])
def test_float8_layout_close_to_one_gpu(report: dict, name: str) -> None:
    errors = report[name]["vs_single_process"]
    assert "error" not in report[name], report[name]
    assert not errors["param_names_differ"], errors
    assert errors["loss_rel_err"] < 1e-3, errors
    assert errors["grad_norm_rel_err"] < 1e-3, errors


def test_float8_all_gather_matches_without_it(report: dict) -> None:
    errors = report["fsdp2_ag_pre"]["vs_fsdp2"]
    assert errors["loss_rel_err"] < 1e-6 and errors["param_rel_err"] < 1e-6, errors
