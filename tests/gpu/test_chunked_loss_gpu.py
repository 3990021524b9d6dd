"""The chunked loss on a CUDA device: compiled, a chunk's logits gradient is written over its
logits (2 bytes per bf16 logit, the planner's figure), and several chunks meet in one fp32
accumulator through the GEMM's own epilogue (``out_dtype``).

    python -m pytest tests/gpu/test_chunked_loss_gpu.py -q      # on a machine with a GPU
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchtitan.components.chunked_loss as cl

pytestmark = pytest.mark.gpu

TOKENS, DIM, VOCAB = 4096, 1024, 32768


@pytest.fixture(autouse=True)
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _data():
    g = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(TOKENS, DIM, device="cuda", generator=g) * 0.5).bfloat16()
    w = (torch.randn(VOCAB, DIM, device="cuda", generator=g) * 0.02).bfloat16()
    y = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=g)
    y[:7] = cl.IGNORE_INDEX
    return h, w, y


def test_compiled_chunk_writes_the_gradient_over_its_logits():
    h, w, y = _data()
    fn = cl.compiled_chunk_fn()
    fn(h, w, y)  # compile
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, grad = fn(h, w, y)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits_bytes = TOKENS * VOCAB * 2
    assert grad.dtype == torch.bfloat16 and grad.shape == (TOKENS, VOCAB)
    assert extra <= logits_bytes * 1.05, f"{extra / logits_bytes:.2f} x the bf16 logits"
    ref_loss, ref_grad = cl._chunk_loss_and_grad(h, w, y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=0.02, atol=1e-4)


@pytest.mark.parametrize("chunk", [1024, TOKENS])
def test_chunks_equal_the_plain_loss_and_use_the_fp32_epilogue(chunk: int):
    h, w, y = _data()
    grads = []
    for fn in (lambda h, w: F.cross_entropy(F.linear(h, w).float(), y),
               lambda h, w: cl.chunked_cross_entropy(h, w, y, chunk, cl.compiled_chunk_fn())):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(hh, ww)
        loss.backward()
        grads.append((loss.detach(), hh.grad.float(), ww.grad.float()))
    (l0, h0, w0), (l1, h1, w1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h1, h0, rtol=0.02, atol=1e-5)
    torch.testing.assert_close(w1, w0, rtol=0.02, atol=1e-5)
    assert cl._FP32_OUT_MATMUL, "this torch's mm/addmm lack out_dtype: the accumulator costs a bf16 temporary"
