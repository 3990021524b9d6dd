"""DeepSeek-V3 transformer (multi-head latent attention + DeepSeekMoE) in plain PyTorch.

The module names follow Llama 3's where the pieces are the same (``tok_embeddings``,
``layers.N.attention``, ``attention_norm``, ``ffn_norm``, ``feed_forward`` in the dense
blocks, ``moe`` in the others, ``norm``, ``output``), so the parallelism functions find them;
the attention's own are ``wq`` (or ``wq_a``, ``q_norm``, ``wq_b`` with low-rank queries),
``wkv_a``, ``kv_norm``, ``wkv_b`` and ``wo``. ``tok_embeddings``, ``norm`` and ``output`` may
be ``None`` on a pipeline stage. No parallelism lives here.

Rotary embeddings use the shared interleaved layout, which is the layout of DeepSeek's own
checkpoints (Hugging Face's ``rope_interleave``): no permutation is needed to load them.
"""

from __future__ import annotations

import torch
from torch import nn

from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.common.feed_forward import FeedForward
from torchtitan.models.common.moe import MoE
from torchtitan.models.common.norms import build_norm
from torchtitan.models.common.rope import apply_rotary_emb, precompute_freqs_cis
from torchtitan.models.deepseek_v3.args import DeepSeekV3ModelArgs

__all__ = ["Attention", "DeepSeekV3Transformer", "TransformerBlock"]

_BASE_INIT_STD = 0.02


class Attention(nn.Module):
    """Multi-head latent attention.

    ``wkv_a`` maps a token to its key/value latent (``kv_lora_rank``, normalised by
    ``kv_norm``) and one rotary key part shared by all heads; ``wkv_b`` expands the latent
    into each head's non-rotary key part and value. Queries come from ``wq`` or from the
    low-rank ``wq_b(q_norm(wq_a(x)))``. Under tensor parallelism ``wq``/``wq_b``/``wkv_b``
    are column-parallel (heads split), ``wo`` row-parallel, and the latents are replicated.
    """

    def __init__(self, args: DeepSeekV3ModelArgs) -> None:
        super().__init__()
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.qk_head_dim = args.qk_head_dim
        self.v_head_dim = args.v_head_dim
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(args.dim, args.n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(args.dim, self.q_lora_rank, bias=False)
            self.q_norm = build_norm("rmsnorm", self.q_lora_rank, eps=args.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, args.n_heads * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(args.dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = build_norm("rmsnorm", self.kv_lora_rank, eps=args.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, args.n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(args.n_heads * self.v_head_dim, args.dim, bias=False)
        self.sdpa = ScaledDotProductAttention(backend=args.attn_backend, scale=args.softmax_scale)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        # -1: the local head count, which tensor parallelism makes a fraction of n_heads.
        q = q.view(bs, seqlen, -1, self.qk_head_dim)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        # the rotary key part is one head, shared by every query head
        q_rope, k_rope = apply_rotary_emb(q_rope, k_rope.unsqueeze(2), freqs_cis)
        kv = self.wkv_b(self.kv_norm(kv)).view(bs, seqlen, -1, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        n_heads = k_nope.shape[2]
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, -1, n_heads, -1)], dim=-1)
        out = self.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).contiguous().view(bs, seqlen, -1)
        return self.wo(out)

    def init_weights(self, init_std: float) -> None:
        inputs = [self.wkv_a, self.wkv_b] + ([self.wq] if self.q_lora_rank == 0 else [self.wq_a, self.wq_b])
        for linear in inputs:
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=_BASE_INIT_STD)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=init_std)
        self.kv_norm.reset_parameters()
        if self.q_lora_rank:
            self.q_norm.reset_parameters()


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``; ``out = h + ffn(norm(h))``, the FFN being
    ``feed_forward`` in the first ``n_dense_layers`` blocks and ``moe`` after them."""

    def __init__(self, layer_id: int, args: DeepSeekV3ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.moe_enabled = layer_id >= args.n_dense_layers
        self.attention = Attention(args)
        if self.moe_enabled:
            self.moe = MoE(args.moe_args, dim=args.dim, hidden_dim=args.moe_inter_dim)
        else:
            self.feed_forward = FeedForward(args.dim, args.inter_dim)
        self.attention_norm = build_norm("rmsnorm", args.dim, eps=args.norm_eps)
        self.ffn_norm = build_norm("rmsnorm", args.dim, eps=args.norm_eps)
        # Output projections start smaller in deeper layers (depth-scaled init).
        depth = layer_id + 1 if args.depth_init else args.n_layers
        self.weight_init_std = _BASE_INIT_STD / (2 * depth) ** 0.5

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        ffn = self.moe if self.moe_enabled else self.feed_forward
        return h + ffn(self.ffn_norm(h))

    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        self.attention.init_weights(self.weight_init_std)
        if self.moe_enabled:
            self.moe.init_weights(self.weight_init_std, buffer_device)
        else:
            self.feed_forward.init_weights(self.weight_init_std)


class DeepSeekV3Transformer(nn.Module):
    """Token embeddings, ``n_layers`` blocks, final norm and output projection to logits.

    Lower precision comes from FSDP mixed precision, autocast or building under a default
    dtype, not ``.to(dtype)`` (which would cast the complex ``freqs_cis`` table to a real
    dtype until ``init_weights`` recomputes it).
    """

    def __init__(self, args: DeepSeekV3ModelArgs) -> None:
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError(
                f"vocab_size is {args.vocab_size}: call DeepSeekV3ModelArgs.update_from_config "
                "with the tokenizer before building the model"
            )
        self.args = args
        self.vocab_size = args.vocab_size
        self.n_layers = args.n_layers
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        # Not persistent: it is derived from the args, and recomputed by init_weights.
        self.register_buffer("freqs_cis", self._precompute_freqs_cis(), persistent=False)
        self.layers = nn.ModuleDict(
            {str(layer_id): TransformerBlock(layer_id, args) for layer_id in range(args.n_layers)}
        )
        self.norm: nn.Module | None = build_norm("rmsnorm", args.dim, eps=args.norm_eps)
        self.output: nn.Linear | None = nn.Linear(args.dim, args.vocab_size, bias=False)

    def _precompute_freqs_cis(self, device: torch.device | str | None = None) -> torch.Tensor:
        return precompute_freqs_cis(
            self.args.qk_rope_head_dim, self.args.max_seq_len, self.args.rope_theta, self.args.rope_scaling,
            device=device,
        )

    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """Initialise the parameters this module holds (after ``to_empty``), ``freqs_cis``
        and the MoE buffers; deterministic given the global RNG state. Works on a pipeline
        stage (missing parts are ``None``) and on DTensor parameters."""
        device = self.freqs_cis.device if buffer_device is None else buffer_device
        with torch.no_grad():
            self.freqs_cis = self._precompute_freqs_cis(device)
            if self.tok_embeddings is not None:
                nn.init.normal_(self.tok_embeddings.weight)
            for layer in self.layers.values():
                if layer is not None:
                    layer.init_weights(buffer_device=device)
            if self.norm is not None:
                self.norm.reset_parameters()
            if self.output is not None:
                std = self.args.dim**-0.5
                nn.init.trunc_normal_(self.output.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``[bs, seq]`` (or hidden states ``[bs, seq, dim]`` on a later pipeline
        stage) to logits ``[bs, seq, vocab]`` (or hidden states on a non-last stage)."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h
