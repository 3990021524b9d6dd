"""Llama 3 model hyper-parameters and the published flavors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from torchtitan.models.common.rope import RoPEScalingArgs
from torchtitan.models.model_spec import ModelShape, vocab_size_for

if TYPE_CHECKING:
    from torchtitan.config import JobConfig

__all__ = ["TransformerModelArgs", "RoPEScalingArgs", "ffn_hidden_dim", "llama3_configs"]


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU hidden size: 2/3 of 4*dim, optionally scaled, rounded up to ``multiple_of``."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)



@dataclass
class TransformerModelArgs:
    """Shape of a Llama 3 transformer.

    ``vocab_size=-1`` means "take it from the tokenizer" (see ``update_from_config``);
    ``n_kv_heads=None`` means plain multi-head attention; ``rope_scaling=None`` turns the
    Llama 3.1 long-context frequency scaling off.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RoPEScalingArgs | None = field(default_factory=RoPEScalingArgs)
    max_seq_len: int = 131072
    depth_init: bool = True
    attn_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.dim % self.n_heads != 0:
            raise ValueError(f"model dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(f"head_dim ({self.dim // self.n_heads}) must be even for rotary embeddings")
        kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if kv <= 0 or self.n_heads % kv != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({kv})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def update_from_config(self, job_config: JobConfig, tokenizer: Any | None = None) -> None:
        """Fit the args to a run: vocabulary from the tokenizer, context from training.seq_len.

        Flavors with ``vocab_size=-1`` take ``tokenizer.vocab_size``; flavors with a fixed
        vocabulary (128256 for the released checkpoints) keep it, so checkpoints stay
        loadable, and only check that the tokenizer's ids fit.
        """
        self.vocab_size = vocab_size_for(self.vocab_size, tokenizer)
        self.max_seq_len = job_config.training.seq_len
        self.attn_backend = job_config.model.attention_backend

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """Parameter count and training FLOPs per token (forward + backward).

        ``6 * (params - embedding params)`` covers the matmuls (the embedding lookup is not
        one), ``12 * layers * heads * head_dim * seq_len`` the attention scores and their
        weighted sum. Counts global sizes, so it works on meta and on sharded (DTensor) models.
        """
        nparams = sum(p.numel() for p in model.parameters())
        embedding = getattr(model, "tok_embeddings", None)
        nparams_embedding = embedding.weight.numel() if embedding is not None else 0
        flops_per_token = (
            6 * (nparams - nparams_embedding)
            + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
        )
        return nparams, flops_per_token

    def model_shape(self) -> ModelShape:
        return ModelShape(
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_heads if self.n_kv_heads is None else self.n_kv_heads,
            head_dim=self.head_dim,
            hidden=ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier),
            vocab=self.vocab_size,
        )


# Llama 3.2 1B/3B were released with rope scaling factor 32; 3.1 8B/70B/405B with 8.
_LLAMA_3_2_SCALING = RoPEScalingArgs(factor=32.0)

llama3_configs: dict[str, TransformerModelArgs] = {
    # Tiny, trains on a CPU in seconds; still grouped-query (16 query / 8 kv heads).
    "debugmodel": TransformerModelArgs(
        dim=256, n_layers=6, n_heads=16, n_kv_heads=8, vocab_size=-1, max_seq_len=2048
    ),
    # Llama 3.2 shapes, with an untied output layer (the released 1B/3B tie it).
    "1B": TransformerModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.5,
        multiple_of=256,
        rope_scaling=_LLAMA_3_2_SCALING,
    ),
    "3B": TransformerModelArgs(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.0,
        multiple_of=256,
        rope_scaling=_LLAMA_3_2_SCALING,
    ),
    "8B": TransformerModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.3,
        multiple_of=1024,
    ),
    "70B": TransformerModelArgs(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.3,
        multiple_of=4096,
    ),
    "405B": TransformerModelArgs(
        dim=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.2,
        multiple_of=4096,
    ),
}
