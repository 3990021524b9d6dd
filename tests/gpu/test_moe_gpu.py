"""The MoE layer on a CUDA GPU (Hopper): grouped GEMMs against the exact per-expert loop,
under autocast and with bf16 weights, eager and compiled with a full graph.

    python -m pytest tests/gpu/test_moe_gpu.py -q      # on a machine with an sm90+ GPU
"""

from __future__ import annotations

import pytest
import torch

from torchtitan.models.common.moe import MoE, MoEArgs

pytestmark = pytest.mark.gpu

DIM, HIDDEN, EXPERTS, TOP_K = 256, 128, 16, 4


def _pair(dtype: torch.dtype) -> tuple[MoE, MoE]:
    """The same layer twice: grouped GEMMs, and the exact loop."""
    layers = []
    for grouped in (True, False):
        torch.manual_seed(0)
        moe = MoE(MoEArgs(num_experts=EXPERTS, top_k=TOP_K, route_norm=True, use_grouped_mm=grouped), DIM, HIDDEN)
        moe.init_weights(0.02)
        layers.append(moe.to(device="cuda", dtype=dtype))
    return layers[0], layers[1]


def _needs_hopper() -> None:
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("torch._grouped_mm needs sm90 or newer")


@pytest.mark.parametrize("mode", ["bf16_weights", "autocast"])
def test_grouped_mm_matches_the_loop(mode):
    _needs_hopper()
    dtype = torch.bfloat16 if mode == "bf16_weights" else torch.float32
    grouped, loop = _pair(dtype)
    x = torch.randn(4, 1000, DIM, device="cuda", dtype=dtype)  # counts not multiples of 8
    outs, grads = [], []
    for moe in (grouped, loop):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", torch.bfloat16, enabled=mode == "autocast"):
            out = moe(xi)
        out.float().pow(2).sum().backward()
        outs.append(out.float())
        grads.append((xi.grad.float(), moe.experts.w1.grad.float(), moe.experts.w2.grad.float()))
    # Same bf16 GEMMs in a different kernel: bf16 rounding apart, never more.
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-3)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
    assert grouped.tokens_per_expert.sum().item() == 4 * 1000 * TOP_K


def test_compiled_full_graph_matches_eager():
    _needs_hopper()
    grouped, _ = _pair(torch.bfloat16)
    x = torch.randn(2, 512, DIM, device="cuda", dtype=torch.bfloat16)
    eager = grouped(x)
    compiled = torch.compile(grouped, fullgraph=True)
    torch.testing.assert_close(compiled(x).float(), eager.float(), rtol=2e-2, atol=2e-3)
