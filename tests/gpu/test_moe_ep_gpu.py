"""Expert parallelism on CUDA with NCCL against one GPU: the experts' gradient divide factor.

The routed experts are an FSDP unit of their own over ``dp_shard_mod_ep``, but their
gradients must be averaged over every data rank, so ``apply_fsdp`` sets a gradient divide
factor on that unit. On NCCL that is a PREMUL_SUM reduce-scatter; gloo has no PREMUL_SUM, so
on CPU the code takes another path (sum, then divide: ``set_force_sum_reduction_for_comms``)
and the CPU suite cannot see a fault in the NCCL one. Here the layouts where the factor
differs from the experts' group size train against one GPU, with the tolerances of
tests/distributed/test_moe_parity.py:

- EP 2 on 2 GPUs: experts' group of 1, factor 2;
- EP 2 x FSDP 2 on 4 GPUs: experts' group of 2, factor 4.

    python -m pytest tests/gpu/test_moe_ep_gpu.py -q     # 2 GPUs (4 for the second layout)
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "distributed"))
from harness import launch  # noqa: E402
from test_moe_parity import GRAD_NORM_TOL, TOL, _merge, _rel  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

LAYOUTS = {
    2: ("ep2", ["--training.local_batch_size", "2", "--parallelism.expert_parallel_degree", "2"]),
    4: ("ep2_fsdp2", ["--training.local_batch_size", "1", "--parallelism.expert_parallel_degree", "2"]),
}


@pytest.fixture(scope="module")
def reference():
    return launch("moe_parity:run_layouts", 1, cpu_only=False, layouts=[("one", ["--training.local_batch_size", "4"])])[0]["one"]


@pytest.mark.parametrize("gpus", [2, 4])
def test_experts_gradient_divide_factor_on_nccl(reference, gpus):
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} CUDA GPUs")
    name, args = LAYOUTS[gpus]
    got = _merge(launch("moe_parity:run_layouts", gpus, cpu_only=False, layouts=[(name, args)]), name)
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], reference["losses"]))
    norm_err = max(abs(a - b) / abs(b) for a, b in zip(got["grad_norms"], reference["grad_norms"]))
    assert loss_err < TOL, (got["losses"], reference["losses"])
    # a factor of the group size instead of every data rank scales the experts' gradients
    # by 2: the clipped norm moves by percents
    assert norm_err < GRAD_NORM_TOL, (got["grad_norms"], reference["grad_norms"])
    experts = [k for k in reference["params"] if ".moe.experts." in k]
    assert experts and set(got["params"]) == set(reference["params"])
    worst = max(_rel(got["params"][k], reference["params"][k]) for k in reference["params"])
    assert worst < TOL, worst
