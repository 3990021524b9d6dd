"""Building blocks shared by model families: rotary embeddings, the attention op, norms, the
SwiGLU feed-forward (the MoE layer is ``models.common.moe``)."""

from torchtitan.models.common.attention import ScaledDotProductAttention, repeat_kv
from torchtitan.models.common.feed_forward import FeedForward
from torchtitan.models.common.norms import build_norm
from torchtitan.models.common.rope import (
    RoPEScalingArgs,
    apply_rope_scaling,
    apply_rotary_emb,
    precompute_freqs_cis,
)

__all__ = [
    "FeedForward",
    "RoPEScalingArgs",
    "ScaledDotProductAttention",
    "apply_rope_scaling",
    "apply_rotary_emb",
    "build_norm",
    "precompute_freqs_cis",
    "repeat_kv",
]
