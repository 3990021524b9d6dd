"""Building blocks shared by model families: rotary embeddings, the attention op, norms."""

from torchtitan.models.common.attention import ScaledDotProductAttention, repeat_kv
from torchtitan.models.common.norms import build_norm
from torchtitan.models.common.rope import (
    RoPEScalingArgs,
    apply_rope_scaling,
    apply_rotary_emb,
    precompute_freqs_cis,
)

__all__ = [
    "RoPEScalingArgs",
    "ScaledDotProductAttention",
    "apply_rope_scaling",
    "apply_rotary_emb",
    "build_norm",
    "precompute_freqs_cis",
    "repeat_kv",
]
