"""DeepSeek-V3 model hyper-parameters and the published flavors.

DeepSeek-V3 (and V2-Lite, which the same code expresses) differs from Llama 3 in two places:

- **Multi-head latent attention (MLA).** Keys and values are computed from one low-rank
  latent per token (``kv_lora_rank`` wide, RMS-normalised) plus a rotary key part
  (``qk_rope_head_dim``) shared by every head; queries come from ``dim`` directly
  (``q_lora_rank = 0``) or through a low-rank latent of their own. A query/key head is
  ``qk_nope_head_dim + qk_rope_head_dim`` wide, a value head ``v_head_dim``. With YaRN rope
  scaling (``rope_scaling``) the softmax scale carries YaRN's temperature term.
- **DeepSeekMoE.** The first ``n_dense_layers`` blocks have a dense SwiGLU of hidden size
  ``inter_dim``; the others route each token to ``top_k`` of ``num_experts`` experts of
  hidden size ``moe_inter_dim`` (V3: sigmoid scores, the best ``num_limited_groups`` of
  ``num_expert_groups`` groups, the k weights renormalised and scaled by ``route_scale``),
  plus ``num_shared_experts`` shared ones.

The multi-token-prediction module of the released V3 checkpoint is not part of this model
(Hugging Face's ``DeepseekV3ForCausalLM`` leaves it out too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from torchtitan.models.common.moe import MoEArgs
from torchtitan.models.common.rope import YaRNScalingArgs, yarn_mscale
from torchtitan.models.model_spec import ModelShape, vocab_size_for

if TYPE_CHECKING:
    from torchtitan.config import JobConfig

__all__ = ["DeepSeekV3ModelArgs", "deepseek_v3_configs", "validate_deepseek_v3"]


@dataclass
class DeepSeekV3ModelArgs:
    """Shape of a DeepSeek-V3 transformer (TorchTitan's field names).

    ``vocab_size=-1`` means "take it from the tokenizer" (the debug flavors). ``q_lora_rank
    = 0`` projects queries from ``dim`` directly. ``rope_scaling`` (YaRN) or None.
    """

    dim: int = 2048
    n_layers: int = 27
    n_dense_layers: int = 1
    n_heads: int = 16
    vocab_size: int = 102400
    inter_dim: int = 10944
    moe_inter_dim: int = 1408
    moe_args: MoEArgs = field(default_factory=MoEArgs)
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: YaRNScalingArgs | None = None
    max_seq_len: int = 4096
    depth_init: bool = True
    attn_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.qk_rope_head_dim % 2 != 0:
            raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even for rotary embeddings")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(f"n_dense_layers ({self.n_dense_layers}) must be in [0, n_layers={self.n_layers}]")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def moe_enabled(self) -> bool:
        return self.n_dense_layers < self.n_layers

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim ** -0.5``, times YaRN's ``mscale(factor, mscale_all_dim) ** 2``."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            scale *= yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim) ** 2
        return scale

    def update_from_config(self, job_config: JobConfig, tokenizer: Any | None = None) -> None:
        """Fit the args to a run: vocabulary, context length and attention backend.

        Flavors with ``vocab_size=-1`` take ``tokenizer.vocab_size``; the published ones keep
        theirs (so their checkpoints load) and only check that the tokenizer's ids fit.
        """
        self.vocab_size = vocab_size_for(self.vocab_size, tokenizer)
        self.max_seq_len = job_config.training.seq_len
        self.attn_backend = job_config.model.attention_backend

    # ---- accounting ---------------------------------------------------------------------
    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """Parameter count and training FLOPs per token (forward + backward).

        ``flops = 6 * N_active + 6 * n_layers * n_heads * (qk_head_dim + v_head_dim) * seq_len``:
        ``N_active`` is every parameter but the embedding table, with each MoE layer's routed
        experts counted ``top_k / num_experts`` of their size; the attention term is the
        scores (``qk_head_dim`` wide) and their weighted sum (``v_head_dim``) over the full,
        unmasked sequence, 2 FLOPs each and x3 for forward + backward, as for Llama 3.
        Global sizes: works on meta and on sharded (DTensor) models.
        """
        nparams, routed = 0, 0
        for name, p in model.named_parameters():
            nparams += p.numel()
            if ".moe.experts." in f".{name}":
                routed += p.numel()
        active = nparams - routed + routed * self.moe_args.top_k // self.moe_args.num_experts
        embedding = getattr(model, "tok_embeddings", None)
        if embedding is not None:
            active -= embedding.weight.numel()
        attention = 6 * self.n_layers * self.n_heads * (self.qk_head_dim + self.v_head_dim) * seq_len
        return nparams, 6 * active + attention

    def model_shape(self) -> ModelShape:
        """For the planner: the latent attention's ranks, and its heads as ``n_heads`` query/key
        heads of ``qk_head_dim`` (training expands the latent into every head's keys)."""
        moe = self.moe_args
        n_moe = self.n_layers - self.n_dense_layers
        return ModelShape(
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_heads,
            head_dim=self.qk_head_dim,
            hidden=self.inter_dim,
            vocab=self.vocab_size,
            n_moe_layers=n_moe,
            num_experts=moe.num_experts if n_moe else 0,
            top_k=moe.top_k if n_moe else 0,
            moe_hidden=self.moe_inter_dim if n_moe else 0,
            shared_hidden=moe.num_shared_experts * self.moe_inter_dim if n_moe else 0,
            kv_lora_rank=self.kv_lora_rank,
            q_lora_rank=self.q_lora_rank,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
        )


def validate_deepseek_v3(job_config: JobConfig, model_args: DeepSeekV3ModelArgs) -> None:
    """``ModelSpec.validate_fn``: the MoE checks, and tensor parallelism against the heads."""
    from torchtitan.config import ConfigError
    from torchtitan.models.common.moe_balance import validate_moe_config

    validate_moe_config(job_config, model_args)
    tp = getattr(job_config.parallelism, "tensor_parallel_degree", 1)
    if tp > 1 and model_args.n_heads % tp:
        raise ConfigError(
            f"parallelism.tensor_parallel_degree {tp} must divide the flavor's {model_args.n_heads} attention heads"
        )


def _v3_moe(num_experts: int = 256, top_k: int = 8, **overrides: Any) -> MoEArgs:
    """DeepSeek-V3 routing: sigmoid scores, the best 4 of 8 expert groups, top-8 weights
    renormalised and scaled by 2.5, one shared expert, the auxiliary-loss-free expert bias."""
    kwargs: dict[str, Any] = dict(
        num_experts=num_experts,
        num_shared_experts=1,
        top_k=top_k,
        score_func="sigmoid",
        route_norm=True,
        route_scale=2.5,
        load_balance_coeff=1e-3,
        num_expert_groups=8,
        num_limited_groups=4,
    )
    kwargs.update(overrides)
    return MoEArgs(**kwargs)


# The published shapes are those of the Hugging Face config.json files: deepseek-ai/
# DeepSeek-V2-Lite ("16B": softmax routing, no groups, q straight from dim, YaRN with
# mscale 0.707) and deepseek-ai/DeepSeek-V3 ("671B", without its multi-token-prediction layer).
deepseek_v3_configs: dict[str, DeepSeekV3ModelArgs] = {
    # Tiny, trains on a CPU in seconds: 1 dense + 3 MoE blocks, V3 routing on 8 experts.
    "debugmodel": DeepSeekV3ModelArgs(
        dim=256, n_layers=4, n_dense_layers=1, n_heads=8, vocab_size=-1, inter_dim=768, moe_inter_dim=128,
        moe_args=_v3_moe(num_experts=8, top_k=2, num_expert_groups=4, num_limited_groups=2, route_scale=1.0),
        q_lora_rank=0, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        max_seq_len=2048,
    ),
    # The debug shape with V3's low-rank queries and YaRN scaling.
    "debugmodel_lora": DeepSeekV3ModelArgs(
        dim=256, n_layers=4, n_dense_layers=1, n_heads=8, vocab_size=-1, inter_dim=768, moe_inter_dim=128,
        moe_args=_v3_moe(num_experts=8, top_k=2, num_expert_groups=4, num_limited_groups=2),
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        rope_scaling=YaRNScalingArgs(factor=4.0, original_max_position_embeddings=512),
        max_seq_len=2048,
    ),
    "16B": DeepSeekV3ModelArgs(
        dim=2048, n_layers=27, n_dense_layers=1, n_heads=16, vocab_size=102400, inter_dim=10944,
        moe_inter_dim=1408,
        moe_args=MoEArgs(
            num_experts=64, num_shared_experts=2, top_k=6, score_func="softmax", route_norm=False,
            route_scale=1.0, load_balance_coeff=1e-3,
        ),
        q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        rope_scaling=YaRNScalingArgs(
            factor=40.0, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707
        ),
    ),
    "671B": DeepSeekV3ModelArgs(
        dim=7168, n_layers=61, n_dense_layers=3, n_heads=128, vocab_size=129280, inter_dim=18432,
        moe_inter_dim=2048, moe_args=_v3_moe(),
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        rope_scaling=YaRNScalingArgs(factor=40.0, original_max_position_embeddings=4096),
    ),
}
