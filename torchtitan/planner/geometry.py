"""The model's shape as the planner's memory and cost models read it (global, unsharded).

Built from a family's ``model_shape()`` (the model-family contract): the planner imports no
model family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from torchtitan.models.model_spec import ModelShape

__all__ = ["Geometry"]


@dataclass(frozen=True)
class Geometry(ModelShape):
    """The shape of a decoder-only transformer (global, before any sharding), dense or MoE:
    the model-family contract's ``ModelShape`` with what the planner derives from it.

    ``n_moe_layers`` of the ``n_layers`` blocks have ``num_experts`` routed SwiGLU experts of
    hidden size ``moe_hidden`` (each token uses ``top_k``) plus shared experts of total
    hidden size ``shared_hidden`` in place of the dense feed-forward. The planner takes the
    dense blocks to come first and the MoE blocks last (DeepSeek-V3's first dense layers;
    every Qwen3-MoE block is MoE).
    """

    @classmethod
    def from_model_args(cls, args) -> Geometry:
        """From a family's args, through the model-family contract's ``model_shape()``."""
        shape = args.model_shape()
        return cls(**{f.name: getattr(shape, f.name) for f in fields(ModelShape)})

    @property
    def moe(self) -> bool:
        return self.n_moe_layers > 0

    @property
    def attention_head_dim(self) -> float:
        """The mean of a query/key head's and a value head's widths: the scores cost
        2·head_dim and their weighted sum 2·v_head_dim FLOPs per head, key and query (equal
        widths but under latent attention)."""
        return (self.head_dim + (self.v_head_dim or self.head_dim)) / 2

    @property
    def odd_attention_matmuls(self) -> bool:
        """Whether a block's attention runs an odd number of matmuls (latent attention with
        low-rank queries: wq_a, wq_b, wkv_a, wkv_b, wo): per-op AC, which saves every other
        matmul's output counting through the block, then saves the feed-forward's other half."""
        return bool(self.kv_lora_rank and self.q_lora_rank)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block ``layer`` (global index) is an MoE block (the last n_moe_layers)."""
        return layer >= self.n_layers - self.n_moe_layers

    def moe_share(self, n_blocks: int) -> int:
        """MoE blocks among ``n_blocks`` of a stage whose layer ids are not known: the
        model's share (exact for all-dense and all-MoE models)."""
        return round(n_blocks * self.n_moe_layers / self.n_layers) if self.n_layers else 0

    def block_shapes(self, moe: bool | None = None) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, global shape, sharding style) of one block's parameters, in module order.

        ``moe``: an MoE block (default: the model's last block, MoE when it has any).
        Styles: ``col``/``row`` TP-sharded on dim 0/1; ``rep`` replicated over TP (norms,
        the router); ``ep`` the routed experts' stacked weights: sharded on the expert dim
        over EP (not over TP: every TP rank runs them on the gathered sequence), then
        FSDP-sharded over the remaining data ranks dp_shard x cp / ep.
        """
        moe = self.moe if moe is None else moe
        d, q, kv, h = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.hidden
        shapes: list[tuple[str, tuple[int, ...], str]] = (
            self._latent_attention_shapes() if self.kv_lora_rank else [
                ("attention.wq", (q, d), "col"),
                ("attention.wk", (kv, d), "col"),
                ("attention.wv", (kv, d), "col"),
                ("attention.wo", (d, q), "row"),
            ]
        )
        if self.qk_norm:
            shapes += [("attention.q_norm", (self.head_dim,), "rep"), ("attention.k_norm", (self.head_dim,), "rep")]
        if moe:
            e, mh, sh = self.num_experts, self.moe_hidden, self.shared_hidden
            shapes += [
                ("moe.router.gate", (e, d), "rep"),
                ("moe.experts.w1", (e, mh, d), "ep"),
                ("moe.experts.w2", (e, d, mh), "ep"),
                ("moe.experts.w3", (e, mh, d), "ep"),
            ]
            if sh:
                shapes += [
                    ("moe.shared_experts.w1", (sh, d), "col"),
                    ("moe.shared_experts.w2", (d, sh), "row"),
                    ("moe.shared_experts.w3", (sh, d), "col"),
                ]
        else:
            shapes += [
                ("feed_forward.w1", (h, d), "col"),
                ("feed_forward.w2", (d, h), "row"),
                ("feed_forward.w3", (h, d), "col"),
            ]
        return shapes + [("attention_norm", (d,), "rep"), ("ffn_norm", (d,), "rep")]

    def _latent_attention_shapes(self) -> list[tuple[str, tuple[int, ...], str]]:
        """Multi-head latent attention's parameters: the latents (and their norms) are
        replicated over TP, the per-head expansions column-, the output row-parallel."""
        d, heads, ql, kvl = self.dim, self.n_heads, self.q_lora_rank, self.kv_lora_rank
        nope = self.head_dim - self.qk_rope_head_dim
        q = heads * self.head_dim
        shapes: list[tuple[str, tuple[int, ...], str]] = (
            [("attention.wq_a", (ql, d), "rep"), ("attention.q_norm", (ql,), "rep"), ("attention.wq_b", (q, ql), "col")]
            if ql else [("attention.wq", (q, d), "col")]
        )
        return shapes + [
            ("attention.wkv_a", (kvl + self.qk_rope_head_dim, d), "rep"),
            ("attention.kv_norm", (kvl,), "rep"),
            ("attention.wkv_b", (heads * (nope + self.v_head_dim), kvl), "col"),
            ("attention.wo", (d, heads * self.v_head_dim), "row"),
        ]

    def block_numel(self, moe: bool | None = None) -> int:
        return sum(math.prod(shape) for _, shape, _ in self.block_shapes(moe))

    @property
    def block_params(self) -> int:
        """Parameters of one block of the model's last kind (MoE when it has any)."""
        return self.block_numel()

    @property
    def routed_params(self) -> int:
        """Routed expert parameters of one MoE block (w1, w2, w3 of every expert)."""
        return 3 * self.num_experts * self.moe_hidden * self.dim if self.moe else 0

    @property
    def layers_params(self) -> int:
        """Parameters of all blocks."""
        n_moe = self.n_moe_layers
        dense = self.block_numel(False) * (self.n_layers - n_moe) if n_moe < self.n_layers else 0
        return dense + (self.block_numel(True) * n_moe if n_moe else 0)

    @property
    def nparams(self) -> int:
        """All parameters, a tied embedding/output weight counted once (the model's count)."""
        return self.layers_params + (1 if self.tied_embeddings else 2) * self.vocab * self.dim + self.dim

    @property
    def active_layers_params(self) -> int:
        """Parameters a token's matmuls use in the blocks: the routed experts at
        top_k / num_experts of their size (on the model's total, rounded down, as
        ``get_nparams_and_flops`` counts), router and shared experts in full."""
        routed = self.n_moe_layers * self.routed_params
        if not routed:
            return self.layers_params
        return self.layers_params - routed + routed * self.top_k // self.num_experts

    @property
    def active_params_no_embedding(self) -> int:
        """What the FLOPs count: active block parameters, the output projection (the tied
        table counted as the output) and the final norm; the embedding lookup is no matmul."""
        return self.active_layers_params + self.vocab * self.dim + self.dim
