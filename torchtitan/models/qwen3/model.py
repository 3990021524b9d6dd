"""Qwen3 transformer (dense and MoE) in plain PyTorch.

The module names are Llama 3's (``tok_embeddings``, ``layers.N.attention.wq``, ...,
``feed_forward.w1``, ``norm``, ``output``), so the parallelism functions find the same
pieces; an MoE block has ``moe`` (``torchtitan.models.common.moe.MoE``) in place of
``feed_forward``. ``tok_embeddings``, ``norm`` and ``output`` may be set to ``None`` by a
pipeline split. No parallelism lives here.

Rotary embeddings use the shared interleaved layout (pairs ``(x0, x1), (x2, x3), ...`` of a
head rotate together); Hugging Face's Qwen3 rotates row ``i`` with row ``i + head_dim/2``.
The state-dict adapter converts between the two by permuting the rows of ``wq``/``wk``
within each head and the entries of ``q_norm``/``k_norm`` the same way (the RMS of a head
does not depend on the order of its entries), so the models compute the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.common.feed_forward import FeedForward
from torchtitan.models.common.moe import MoE
from torchtitan.models.common.norms import build_norm
from torchtitan.models.common.rope import apply_rotary_emb, precompute_freqs_cis
from torchtitan.models.qwen3.args import Qwen3ModelArgs

__all__ = ["Attention", "FeedForward", "TransformerBlock", "Qwen3Transformer"]

_BASE_INIT_STD = 0.02


class Attention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on queries and keys before RoPE."""

    def __init__(self, args: Qwen3ModelArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        if args.qk_norm:
            self.q_norm = build_norm("rmsnorm", args.head_dim, eps=args.norm_eps)
            self.k_norm = build_norm("rmsnorm", args.head_dim, eps=args.norm_eps)
        self.sdpa = ScaledDotProductAttention(backend=args.attn_backend)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        # -1: the local head count, which tensor parallelism makes a fraction of n_heads.
        xq = self.wq(x).view(bs, seqlen, -1, self.head_dim)
        xk = self.wk(x).view(bs, seqlen, -1, self.head_dim)
        xv = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        if self.q_norm is not None:
            xq, xk = self.q_norm(xq), self.k_norm(xk)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        out = self.sdpa(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2))
        out = out.transpose(1, 2).contiguous().view(bs, seqlen, -1)
        return self.wo(out)

    def init_weights(self, init_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=_BASE_INIT_STD)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=init_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``; ``out = h + ffn(norm(h))``, the FFN being
    ``feed_forward`` (dense) or ``moe`` (``moe_enabled``)."""

    def __init__(self, layer_id: int, args: Qwen3ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.moe_enabled = args.moe_enabled
        self.attention = Attention(args)
        if args.moe_enabled:
            self.moe = MoE(args.moe_args, dim=args.dim, hidden_dim=args.moe_inter_dim)
        else:
            self.feed_forward = FeedForward(args.dim, args.hidden_dim)
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


class Qwen3Transformer(nn.Module):
    """Token embeddings, ``n_layers`` blocks, final norm and output projection to logits.

    With ``enable_weight_tying`` the output layer's weight *is* the embedding's (one
    parameter, counted and optimised once). Lower precision comes from FSDP mixed
    precision, autocast or building under a default dtype, not ``.to(dtype)`` (which would
    cast the complex ``freqs_cis`` table to a real dtype until ``init_weights`` recomputes it).
    """

    def __init__(self, args: Qwen3ModelArgs) -> None:
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError(
                f"vocab_size is {args.vocab_size}: call Qwen3ModelArgs.update_from_config "
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
        if args.enable_weight_tying:
            self.output.weight = self.tok_embeddings.weight

    def _precompute_freqs_cis(self, device: torch.device | str | None = None) -> torch.Tensor:
        return precompute_freqs_cis(
            self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, None, device=device
        )

    def _tie_weights(self) -> bool:
        """Re-share the embedding with the output layer if both are here; True if tied.

        ``to_empty`` from meta gives each module its own new tensor, breaking the tie that
        ``__init__`` made; parameters that are DTensors (FSDP, TP) keep their identity.
        """
        if not self.args.enable_weight_tying or self.tok_embeddings is None or self.output is None:
            return False
        if self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight
        return True

    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """Initialise the parameters this module holds (after ``to_empty``), ``freqs_cis``
        and the MoE buffers; deterministic given the global RNG state.

        ``buffer_device`` defaults to where ``freqs_cis`` already is (the ``to_empty``
        device). Works on a pipeline stage (missing parts are ``None``) and on DTensor
        parameters. A tied embedding/output weight is drawn once, with the output layer's
        init (std ``dim**-0.5``): a unit-variance embedding would make the first logits
        ``sqrt(dim)`` times too large.
        """
        device = self.freqs_cis.device if buffer_device is None else buffer_device
        with torch.no_grad():
            tied = self._tie_weights()
            self.freqs_cis = self._precompute_freqs_cis(device)
            if self.tok_embeddings is not None and not tied:
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
