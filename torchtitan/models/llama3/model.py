"""Llama 3 / 3.1 transformer in plain PyTorch.

No parallelism lives here: tensor, sequence, context and pipeline parallelism and FSDP are
applied from outside by rewriting or wrapping these modules, so the module names below are a
contract (see docs/architecture.md). Attention reshapes with ``-1`` heads so column-wise
sharded ``wq``/``wk``/``wv`` need no model change, and the top-level ``tok_embeddings``,
``norm`` and ``output`` may be set to ``None`` by a pipeline split.
"""

from __future__ import annotations

import torch
from torch import nn

from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.common.feed_forward import FeedForward
from torchtitan.models.common.norms import build_norm
from torchtitan.models.common.rope import apply_rotary_emb, precompute_freqs_cis
from torchtitan.models.llama3.args import TransformerModelArgs, ffn_hidden_dim

__all__ = ["Attention", "FeedForward", "TransformerBlock", "Transformer", "ffn_hidden_dim"]

_BASE_INIT_STD = 0.02


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings on queries and keys."""

    def __init__(self, args: TransformerModelArgs) -> None:
        super().__init__()
        n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.sdpa = ScaledDotProductAttention(backend=args.attn_backend)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        # -1: the local head count, which tensor parallelism makes a fraction of n_heads.
        xq = self.wq(x).view(bs, seqlen, -1, self.head_dim)
        xk = self.wk(x).view(bs, seqlen, -1, self.head_dim)
        xv = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        out = self.sdpa(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2))
        out = out.transpose(1, 2).contiguous().view(bs, seqlen, -1)
        return self.wo(out)

    def init_weights(self, init_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=_BASE_INIT_STD)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=init_std)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``; ``out = h + ffn(norm(h))``."""

    def __init__(self, layer_id: int, args: TransformerModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
        self.feed_forward = FeedForward(args.dim, hidden)
        self.attention_norm = build_norm("rmsnorm", args.dim, eps=args.norm_eps)
        self.ffn_norm = build_norm("rmsnorm", args.dim, eps=args.norm_eps)
        # Output projections (wo, w2, w3) start smaller in deeper layers, so the residual
        # stream's variance grows slowly with depth.
        depth = layer_id + 1 if args.depth_init else args.n_layers
        self.weight_init_std = _BASE_INIT_STD / (2 * depth) ** 0.5

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self) -> None:
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        self.attention.init_weights(self.weight_init_std)
        self.feed_forward.init_weights(self.weight_init_std)


class Transformer(nn.Module):
    """Token embeddings, ``n_layers`` blocks, final norm and output projection to logits.

    Lower precision comes from FSDP mixed precision, autocast or building under a default
    dtype: ``.to(dtype)`` would also cast the complex ``freqs_cis`` table to a real dtype
    (dropping its imaginary part) until ``init_weights`` recomputes it.
    """

    def __init__(self, args: TransformerModelArgs) -> None:
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError(
                f"vocab_size is {args.vocab_size}: call TransformerModelArgs.update_from_config "
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
            self.args.head_dim,
            self.args.max_seq_len,
            self.args.rope_theta,
            self.args.rope_scaling,
            device=device,
        )

    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """Initialise the parameters this module holds (after ``to_empty``) and ``freqs_cis``.

        ``buffer_device`` defaults to where the buffer already is (the ``to_empty`` device).
        Works on a pipeline stage (missing parts are ``None``) and on DTensor parameters.
        """
        device = self.freqs_cis.device if buffer_device is None else buffer_device
        with torch.no_grad():
            self.freqs_cis = self._precompute_freqs_cis(device)
            if self.tok_embeddings is not None:
                nn.init.normal_(self.tok_embeddings.weight)
            for layer in self.layers.values():
                if layer is not None:
                    layer.init_weights()
            if self.norm is not None:
                self.norm.reset_parameters()
            if self.output is not None:
                std = self.args.dim**-0.5
                nn.init.trunc_normal_(self.output.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``[bs, seq]`` (or hidden states ``[bs, seq, dim]`` on a later pipeline
        stage) to logits ``[bs, seq, vocab]`` (or hidden states on a non-last stage)."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        # The full table goes to the blocks; attention slices it to the sequence it sees,
        # which under sequence parallelism is longer than the local shard of ``h`` here.
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h
