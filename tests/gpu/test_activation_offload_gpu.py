"""Activation offload on a CUDA device: the side stream's copies give the same gradients as
keeping the activations, and the device holds less between forward and backward.

    python -m pytest tests/gpu/test_activation_offload_gpu.py -q      # on a machine with a GPU

Once this passes on a GPU (and a benchmark has measured the overlap), the chooser may score
activation offload: ``torchtitan.planner.memory_policy.AUTO_OFFLOADS_ACTIVATIONS``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.activation_offload import apply_activation_offload

pytestmark = pytest.mark.gpu

DIM, TOKENS, LAYERS = 1024, 8192, 6  # a block's input: 8192 x 1024 fp32 = 32 MiB


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(DIM, 4 * DIM, bias=False)
        self.w2 = nn.Linear(4 * DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w2(torch.nn.functional.silu(self.w1(torch.nn.functional.rms_norm(x, (DIM,)))))


def _run(ac: str, compiled: bool, offload_layers: int):
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleDict({str(i): Block() for i in range(LAYERS)}).cuda()
    if ac != "none":
        apply_ac(model, ac, "op")
    if compiled:
        for name, block in list(model.layers.named_children()):
            model.layers.register_module(name, torch.compile(block, fullgraph=True))
    apply_activation_offload(model, offload_layers, "cuda")
    x = torch.randn(TOKENS, DIM, device="cuda", generator=torch.Generator("cuda").manual_seed(1), requires_grad=True)
    grads = []
    for _ in range(2):  # the second step reuses the pinned buffers and the compiled graphs
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = x
            for block in model.layers.values():
                h = block(h)
            loss = h.float().square().mean()
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # lets the allocator take back the blocks the copies held
        kept = torch.cuda.memory_allocated() - before
        loss.backward()
        grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
        x.grad = None
        model.zero_grad(set_to_none=True)
    return loss.detach(), grads, kept


@pytest.mark.parametrize("ac,compiled", [("full", True), ("selective", True), ("none", False), ("full", False)])
def test_offload_gives_the_same_gradients_with_less_kept_on_the_device(ac, compiled):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    loss0, grads0, kept0 = _run(ac, compiled, 0)
    loss1, grads1, kept1 = _run(ac, compiled, LAYERS - 1)
    assert torch.equal(loss0, loss1)
    for a, b in zip(grads0, grads1):
        assert torch.equal(a, b)
    # five of six blocks' saved tensors left the device (the last forward's may still be
    # copying out when measured: at most two blocks' worth stays)
    assert kept1 < kept0 * 0.5, (kept1, kept0)
