"""Qwen3 model hyper-parameters (dense and MoE) and the published flavors.

Qwen3 differs from Llama 3 in the attention: each head's queries and keys go through an
RMSNorm over ``head_dim`` (``qk_norm``) before the rotary embedding, and ``head_dim`` is a
free hyper-parameter (128 in every published model, whatever ``dim`` is). The MoE models
replace every block's feed-forward with ``num_experts`` routed SwiGLU experts of hidden
size ``moe_inter_dim``, of which each token uses ``top_k`` (softmax scores, top-k weights
renormalised to sum to one), with no shared expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from torchtitan.config import ConfigError
from torchtitan.models.common.moe import MoEArgs
from torchtitan.models.model_spec import ModelShape, vocab_size_for

if TYPE_CHECKING:
    from torchtitan.config import JobConfig

__all__ = ["Qwen3ModelArgs", "check_weight_tying", "qwen3_configs", "validate_qwen3"]


@dataclass
class Qwen3ModelArgs:
    """Shape of a Qwen3 transformer (TorchTitan's field names).

    ``vocab_size=-1`` means "take it from the tokenizer" (the debug flavors); ``hidden_dim``
    is the dense SwiGLU hidden size (``intermediate_size`` in Hugging Face's config),
    ``moe_inter_dim`` each routed expert's (``moe_intermediate_size``). With
    ``moe_enabled`` every block's feed-forward is an MoE layer built from ``moe_args``.
    ``enable_weight_tying`` makes the output projection share the embedding's weight.
    """

    dim: int = 1024
    n_layers: int = 28
    n_heads: int = 16
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 3072
    vocab_size: int = 151936
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_seq_len: int = 4096
    qk_norm: bool = True
    enable_weight_tying: bool = False
    depth_init: bool = True
    moe_enabled: bool = False
    moe_args: MoEArgs = field(default_factory=MoEArgs)
    moe_inter_dim: int = 768
    attn_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    def update_from_config(self, job_config: JobConfig, tokenizer: Any | None = None) -> None:
        """Fit the args to a run: vocabulary, context length (``training.seq_len``) and
        attention backend.

        Flavors with ``vocab_size=-1`` (the debug ones) take ``tokenizer.vocab_size``; the
        published flavors keep 151936 so their checkpoints stay loadable, and only check that
        the tokenizer's ids fit. Tied embeddings are refused with pipeline or tensor
        parallelism (``check_weight_tying``).
        """
        self.vocab_size = vocab_size_for(self.vocab_size, tokenizer)
        check_weight_tying(job_config, self)
        self.max_seq_len = job_config.training.seq_len
        self.attn_backend = job_config.model.attention_backend

    # ---- accounting ---------------------------------------------------------------------
    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """Parameter count and training FLOPs per token (forward + backward).

        ``flops = 6 * N_active + 12 * n_layers * n_heads * head_dim * seq_len`` where
        ``N_active`` counts the parameters a token's matmuls use: every parameter except
        the embedding table (a lookup, not a matmul), with each MoE layer's routed experts
        counted ``top_k / num_experts`` of their size (the router and shared experts in
        full). With tied embeddings the table *is* the output projection's weight, so it
        is counted (once). The attention term covers the scores and their weighted sum
        (2 matmuls x 2 FLOPs x 3 for forward + backward) over the full, unmasked sequence,
        as for Llama 3. Global sizes: works on meta and on sharded (DTensor) models; a
        parameter shared by two modules is counted once.
        """
        nparams, routed = 0, 0
        for name, p in model.named_parameters():  # named_parameters skips tied duplicates
            nparams += p.numel()
            if ".moe.experts." in f".{name}":
                routed += p.numel()
        active = nparams
        if routed:
            e = self.moe_args.num_experts
            active = nparams - routed + routed * self.moe_args.top_k // e
        embedding = getattr(model, "tok_embeddings", None)
        output = getattr(model, "output", None)
        tied = embedding is not None and output is not None and output.weight is embedding.weight
        if embedding is not None and not tied:
            active -= embedding.weight.numel()
        flops_per_token = 6 * active + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return nparams, flops_per_token

    def model_shape(self) -> ModelShape:
        moe = self.moe_args
        return ModelShape(
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            hidden=self.hidden_dim,
            vocab=self.vocab_size,
            tied_embeddings=self.enable_weight_tying,
            qk_norm=self.qk_norm,
            n_moe_layers=self.n_layers if self.moe_enabled else 0,
            num_experts=moe.num_experts if self.moe_enabled else 0,
            top_k=moe.top_k if self.moe_enabled else 0,
            moe_hidden=self.moe_inter_dim if self.moe_enabled else 0,
            shared_hidden=moe.num_shared_experts * self.moe_inter_dim if self.moe_enabled else 0,
        )


def check_weight_tying(job_config: JobConfig, args: Qwen3ModelArgs) -> None:
    """Refuse layouts that cannot hold an output layer tied to the embedding: pipeline
    stages (the two live on different stages) and tensor parallelism (they are sharded
    differently)."""
    if not args.enable_weight_tying:
        return
    p = getattr(job_config, "parallelism", None)
    for option in ("pipeline_parallel_degree", "tensor_parallel_degree"):
        degree = getattr(p, option, 1)
        if degree > 1:
            raise ConfigError(
                f"parallelism.{option} {degree}: this flavor ties the output layer to the embedding, "
                f"which {option.split('_')[0]} parallelism cannot split; set it to 1 or use an untied flavor"
            )


def validate_qwen3(job_config: JobConfig, model_args: Qwen3ModelArgs) -> None:
    """``ModelSpec.validate_fn``: the MoE checks (``validate_moe_config``) and the tied
    embedding's; raises ``ConfigError`` before anything is built."""
    from torchtitan.models.common.moe_balance import validate_moe_config

    validate_moe_config(job_config, model_args)
    check_weight_tying(job_config, model_args)


def _qwen3_moe(num_experts: int = 128, top_k: int = 8, **overrides: Any) -> MoEArgs:
    """Qwen3-MoE routing: softmax over the experts, top-k, the k weights renormalised,
    no shared expert; load balanced by the auxiliary-loss-free expert bias."""
    kwargs: dict[str, Any] = dict(
        num_experts=num_experts,
        num_shared_experts=0,
        top_k=top_k,
        score_func="softmax",
        route_norm=True,
        route_scale=1.0,
        load_balance_coeff=1e-3,
    )
    kwargs.update(overrides)
    return MoEArgs(**kwargs)


# Hyper-parameters of Hugging Face's Qwen/Qwen3-* config.json files (vocabulary 151936,
# head_dim 128, rope theta 1e6, eps 1e-6). 0.6B, 1.7B and 4B tie the output layer to the
# embedding; 8B and larger, and the MoE models, do not.
qwen3_configs: dict[str, Qwen3ModelArgs] = {
    # Tiny, trains on a CPU in seconds; grouped-query, head_dim (32) unrelated to dim/n_heads.
    "debugmodel": Qwen3ModelArgs(
        dim=256, n_layers=6, n_heads=16, n_kv_heads=8, head_dim=32, hidden_dim=768, vocab_size=-1,
        max_seq_len=2048,
    ),
    # The debug shape with the output layer tied to the embedding, as the small Qwen3s are.
    "debugmodel_tied": Qwen3ModelArgs(
        dim=256, n_layers=6, n_heads=16, n_kv_heads=8, head_dim=32, hidden_dim=768, vocab_size=-1,
        max_seq_len=2048, enable_weight_tying=True,
    ),
    "0.6B": Qwen3ModelArgs(
        dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, hidden_dim=3072, enable_weight_tying=True
    ),
    "1.7B": Qwen3ModelArgs(
        dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, hidden_dim=6144, enable_weight_tying=True
    ),
    "4B": Qwen3ModelArgs(
        dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, hidden_dim=9728, enable_weight_tying=True
    ),
    "8B": Qwen3ModelArgs(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, hidden_dim=12288),
    "14B": Qwen3ModelArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, hidden_dim=17408),
    "32B": Qwen3ModelArgs(dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, hidden_dim=25600),
    # Tiny MoE: 8 experts, top 2, every block MoE.
    "debugmodel_moe": Qwen3ModelArgs(
        dim=256, n_layers=4, n_heads=16, n_kv_heads=8, head_dim=32, hidden_dim=768, vocab_size=-1,
        max_seq_len=2048, moe_enabled=True, moe_args=_qwen3_moe(num_experts=8, top_k=2),
        moe_inter_dim=256,
    ),
    "30B-A3B": Qwen3ModelArgs(
        dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, hidden_dim=6144, moe_enabled=True,
        moe_args=_qwen3_moe(), moe_inter_dim=768,
    ),
    # The benchmark shape of issue #24: 30B-A3B cut to 6 blocks (fits one GPU with AdamW).
    "30B-A3B-6L": Qwen3ModelArgs(
        dim=2048, n_layers=6, n_heads=32, n_kv_heads=4, hidden_dim=6144, moe_enabled=True,
        moe_args=_qwen3_moe(), moe_inter_dim=768,
    ),
    "235B-A22B": Qwen3ModelArgs(
        dim=4096, n_layers=94, n_heads=64, n_kv_heads=4, hidden_dim=12288, moe_enabled=True,
        moe_args=_qwen3_moe(), moe_inter_dim=1536,
    ),
}
