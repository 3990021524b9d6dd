"""The attention op, kept apart from the projections so other backends can replace it.

Context parallelism, a FlexAttention backend or a document-masking variant swap this module
(or wrap its forward) without touching the model. Inputs are ``[bs, heads, seq, head_dim]``;
keys and values may have fewer heads than queries (grouped-query attention), the query head
count being a multiple of theirs. Head counts are read from the tensors, so the op works on
the local heads of a tensor-parallel shard.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["repeat_kv", "ScaledDotProductAttention", "ATTENTION_BACKENDS"]

_HALF_DTYPES = (torch.bfloat16, torch.float16)

_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
ATTENTION_BACKENDS = ("auto", *_BACKENDS)
# What "auto" tries, in order, for bf16/fp16 on Hopper (SM 9.x): cuDNN's fused attention
# beats the flash kernel there (see _auto_backends); torch's own order puts cuDNN last.
_HOPPER_ORDER = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def _auto_backends(q: torch.Tensor) -> list[SDPBackend] | None:
    """The priority list "auto" uses for ``q``, or None for torch's default choice."""
    if not (q.is_cuda and q.dtype in _HALF_DTYPES):
        return None
    major, _ = torch.cuda.get_device_capability(q.device)
    return _HOPPER_ORDER if major == 9 else None


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Repeat each head of ``x`` ``[bs, kv_heads, seq, d]`` ``n_rep`` times along dim 1.

    Query head ``j`` then meets kv head ``j // n_rep``, as in ``repeat_interleave``.
    """
    if n_rep == 1:
        return x
    bs, n_kv, seqlen, head_dim = x.shape
    return (
        x[:, :, None, :, :]
        .expand(bs, n_kv, n_rep, seqlen, head_dim)
        .reshape(bs, n_kv * n_rep, seqlen, head_dim)
    )


class ScaledDotProductAttention(nn.Module):
    """Causal grouped-query attention through ``F.scaled_dot_product_attention``.

    On CUDA in bf16/fp16 the grouped keys and values go to SDPA as they are
    (``enable_gqa=True``): the cuDNN and flash kernels read them natively, which on an H100
    (torch 2.11, 32 query / 8 kv heads, seq 8192) was 5% faster and kept no repeated copy for
    backward. Elsewhere (CPU, fp32 on CUDA, where the memory-efficient kernel has no grouped
    support and SDPA would fall back to the quadratic-memory math kernel) keys and values are
    repeated first. ``native_gqa=False`` forces the repeat, for backends that need equal
    head counts.
    """

    def __init__(self, native_gqa: bool = True, backend: str = "auto", scale: float | None = None) -> None:
        super().__init__()
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {ATTENTION_BACKENDS}")
        self.native_gqa = native_gqa
        self.backend = backend
        self.scale = scale  # softmax scale; None = 1/sqrt(query head dim)

    def prepare_for_cp(self) -> None:
        """Context parallelism's hook (``prepare_model_for_cp``): ring attention passes
        equal-head q/k/v to the kernels (no grouped-query flag on that path), so repeat."""
        self.native_gqa = False

    def _kernel_context(self, q: torch.Tensor) -> contextlib.AbstractContextManager:
        if self.backend != "auto":
            return sdpa_kernel(_BACKENDS[self.backend])
        order = _auto_backends(q)
        return contextlib.nullcontext() if order is None else sdpa_kernel(order, set_priority=True)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n_heads, n_kv_heads = q.shape[1], k.shape[1]
        if n_heads % n_kv_heads != 0:
            raise ValueError(
                f"query heads ({n_heads}) must be a multiple of key/value heads ({n_kv_heads})"
            )
        n_rep = n_heads // n_kv_heads
        # Values narrower than queries and keys (DeepSeek's MLA): the CPU's flash kernel, and
        # so ring attention under CP, takes equal head dims only, and without it SDPA falls
        # back to the math kernel (the whole [seq, seq] scores kept for backward). Zero
        # channels change nothing: their output is cut off and they pass no gradient. CUDA's
        # kernels get the values as they are (the memory-efficient one takes them).
        pad = q.shape[-1] - v.shape[-1] if not q.is_cuda else 0
        if pad > 0:
            v = F.pad(v, (0, pad))
        with self._kernel_context(q):
            if n_rep > 1 and self.native_gqa and q.is_cuda and q.dtype in _HALF_DTYPES:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return out[..., : out.shape[-1] - pad] if pad > 0 else out

    def extra_repr(self) -> str:
        scale = "" if self.scale is None else f", scale={self.scale:g}"
        return f"native_gqa={self.native_gqa}, backend={self.backend}{scale}"
