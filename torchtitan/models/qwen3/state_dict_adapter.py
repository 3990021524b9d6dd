"""Qwen3 / Qwen3-MoE weights between our names and Hugging Face's.

Names: ours are Llama 3's (``layers.0.attention.wq.weight``); Hugging Face's are
``model.layers.0.self_attn.q_proj.weight`` and so on; ``q_norm``/``k_norm`` keep their names.

Rotary layout: our attention rotates interleaved pairs ``(x0, x1), (x2, x3), ...`` of each
head, Hugging Face's rotates ``x_i`` with ``x_{i + head_dim/2}``. The rows of ``wq``/``wk``
are reordered within each head (even rows first, then odd) and so are the ``head_dim``
entries of ``q_norm``/``k_norm``: the per-head RMS does not depend on the order, so the
permuted model computes the same attention scores. Every other tensor only changes name.

MoE experts: :mod:`torchtitan.models.common.hf_experts` converts them, one tensor per expert
as on the Hub from :meth:`Qwen3StateDictAdapter.to_hf`, transformers 5's fused in-memory
layout with ``to_hf(..., fused_experts=True)``; :meth:`~Qwen3StateDictAdapter.from_hf` reads
either. The router is ``moe.router.gate.weight`` <-> ``mlp.gate.weight``. The MoE's load-balancing buffers
(expert bias, token counts) have no Hugging Face counterpart: ``to_hf`` drops them and
``from_hf`` returns a zero ``expert_bias`` (no bias: the routing of the published models).

Tied embeddings (``enable_weight_tying``): Hugging Face stores no ``lm_head.weight``;
``to_hf`` leaves it out and ``from_hf`` returns ``output.weight`` as the embedding tensor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from torchtitan.models.common.hf_experts import (
    EXPERT_KEYS,
    PerExpert,
    add_zero_expert_bias,
    experts_from_hf,
    experts_to_hf,
    stack_experts,
)
from torchtitan.models.model_spec import check_state_shapes
from torchtitan.models.qwen3.args import Qwen3ModelArgs

__all__ = ["Qwen3StateDictAdapter", "interleaved_to_half_split", "half_split_to_interleaved"]

# our name -> Hugging Face name, inside a layer
_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
}
_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# MoE buffers of ours with no Hugging Face counterpart (load balancing state).
_MOE_BUFFERS = ("moe.expert_bias", "moe.tokens_per_expert")
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def interleaved_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the first dimension of ``w`` within each of ``n_heads`` heads from pairs
    (0, 1), (2, 3), ... to halves: even entries first, then odd ones. ``w`` is a weight
    ``[n_heads * head_dim, cols]`` or a per-head vector ``[head_dim]`` (``n_heads=1``)."""
    rows, rest = w.shape[0], w.shape[1:]
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def half_split_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`interleaved_to_half_split`."""
    rows, rest = w.shape[0], w.shape[1:]
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(rows, *rest)


class Qwen3StateDictAdapter:
    """Maps a full (unsharded) Qwen3 / Qwen3-MoE state dict to Hugging Face's and back."""

    def __init__(self, args: Qwen3ModelArgs):
        self.args = args

    def _heads(self, key: str) -> int | None:
        """Heads whose rows ``key`` permutes (1 for the per-head norms), None if it is not
        a rotated tensor."""
        if key.endswith(("attention.wq.weight",)):
            return self.args.n_heads
        if key.endswith("attention.wk.weight"):
            return self.args.n_kv_heads
        if key.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
            return 1
        return None

    # ---- weights --------------------------------------------------------------------
    def to_hf(self, state: Mapping[str, torch.Tensor], fused_experts: bool = False) -> dict[str, torch.Tensor]:
        """Our state dict to Hugging Face's on-disk names (one tensor per expert), or with
        ``fused_experts`` to transformers 5's in-memory ``gate_up_proj``/``down_proj``."""
        out: dict[str, torch.Tensor] = {}
        tied = self.args.enable_weight_tying
        for key, value in state.items():
            if key == "output.weight" and tied:
                continue
            if key.endswith(_MOE_BUFFERS):
                continue
            if key in _TOP_KEYS:
                out[_TOP_KEYS[key]] = value.contiguous()
                continue
            match = _OURS_LAYER.match(key)
            if match is None:
                raise KeyError(f"no Hugging Face name for parameter {key!r}")
            layer, name = match.groups()
            prefix = f"model.layers.{layer}."
            if name in EXPERT_KEYS:
                out.update(experts_to_hf(state, layer, name, value, fused_experts))
                continue
            if name not in _LAYER_KEYS:
                raise KeyError(f"no Hugging Face name for parameter {key!r}")
            heads = self._heads(name)
            if heads is not None:
                value = interleaved_to_half_split(value, heads)
            out[prefix + _LAYER_KEYS[name]] = value.contiguous()
        return out

    def from_hf(self, hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hugging Face weights (per-expert or fused experts) to ours.

        Without ``lm_head.weight`` (tied checkpoints) ``output.weight`` is the embedding
        tensor itself for a tied flavor and a copy of it for an untied one. MoE layers get
        a zero ``expert_bias``. Works on any subset of the keys (one layer, one tensor).
        """
        out: dict[str, torch.Tensor] = {}
        per_expert: PerExpert = {}
        ours_by_hf = {hf: ours for ours, hf in _LAYER_KEYS.items()}
        for hf_key, value in hf_state.items():
            if hf_key.endswith("rotary_emb.inv_freq"):  # a buffer some old exports contain
                continue
            top = next((ours for ours, hf in _TOP_KEYS.items() if hf == hf_key), None)
            if top is not None:
                out[top] = value.contiguous()
                continue
            match = _HF_LAYER.match(hf_key)
            if match is None:
                raise KeyError(f"Hugging Face tensor {hf_key!r} has no Qwen3 counterpart")
            layer, name = match.groups()
            experts = experts_from_hf(layer, name, value, per_expert)
            if experts is not None:
                out.update(experts)
            elif name in ours_by_hf:
                ours = ours_by_hf[name]
                heads = self._heads(ours)
                if heads is not None:
                    value = half_split_to_interleaved(value, heads)
                out[f"layers.{layer}.{ours}"] = value.contiguous()
            else:
                raise KeyError(f"Hugging Face tensor {hf_key!r} has no Qwen3 counterpart")
        out.update(stack_experts(per_expert))
        if "output.weight" not in out and "tok_embeddings.weight" in out:
            emb = out["tok_embeddings.weight"]
            out["output.weight"] = emb if self.args.enable_weight_tying else emb.clone()
        if self.args.moe_enabled:
            add_zero_expert_bias(out, self.args.moe_args.num_experts)
        return out

    def check(self, state: Mapping[str, torch.Tensor]) -> None:
        """Raise a one-line ValueError unless ``state`` has exactly this model's names and
        shapes (the model is built on the meta device: no memory)."""
        from torchtitan.models.qwen3.model import Qwen3Transformer

        check_state_shapes(Qwen3Transformer, self.args, state)

    # ---- config.json ----------------------------------------------------------------
    def hf_config(
        self, torch_dtype: str = "float32", bos_token_id: int | None = None, eos_token_id: int | None = None
    ) -> dict[str, Any]:
        """A ``config.json`` for ``Qwen3ForCausalLM`` (dense) or ``Qwen3MoeForCausalLM``."""
        a = self.args
        if not a.qk_norm:
            raise ValueError("Hugging Face's Qwen3 always normalises q and k: qk_norm=False has no config")
        config: dict[str, Any] = {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "hidden_size": a.dim,
            "intermediate_size": a.hidden_dim,
            "num_hidden_layers": a.n_layers,
            "num_attention_heads": a.n_heads,
            "num_key_value_heads": a.n_kv_heads,
            "head_dim": a.head_dim,
            "vocab_size": a.vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": a.norm_eps,
            "rope_theta": a.rope_theta,
            "max_position_embeddings": a.max_seq_len,
            "tie_word_embeddings": a.enable_weight_tying,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "torch_dtype": torch_dtype,
        }
        if a.moe_enabled:
            m = a.moe_args
            if m.num_shared_experts or m.score_func != "softmax" or m.route_scale != 1.0:
                raise ValueError(
                    "Qwen3-MoE routes by softmax with no shared expert and route_scale 1: these "
                    f"args (shared {m.num_shared_experts}, {m.score_func}, scale {m.route_scale}) have no config"
                )
            config.update(
                architectures=["Qwen3MoeForCausalLM"],
                model_type="qwen3_moe",
                num_experts=m.num_experts,
                num_experts_per_tok=m.top_k,
                moe_intermediate_size=a.moe_inter_dim,
                norm_topk_prob=m.route_norm,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                router_aux_loss_coef=m.aux_loss_alpha,
            )
        if bos_token_id is not None:
            config["bos_token_id"] = bos_token_id
        if eos_token_id is not None:
            config["eos_token_id"] = eos_token_id
        return config

    @staticmethod
    def args_from_hf_config(config: Mapping[str, Any]) -> Qwen3ModelArgs:
        """Our args for a Hugging Face Qwen3 or Qwen3-MoE ``config.json`` (rope theta as
        ``rope_theta`` or, in newer exports, inside ``rope_parameters``)."""
        from torchtitan.models.qwen3.args import _qwen3_moe

        rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"config.json rope type {rope.get('rope_type')!r}: only the default rope")
        if config.get("use_sliding_window", False):
            raise ValueError("config.json uses sliding-window attention, which this model lacks")
        if config.get("attention_bias", False):
            raise ValueError("config.json has attention biases, which Qwen3 models lack")
        num_experts = config.get("num_experts", config.get("num_local_experts", 0)) or 0
        moe = config.get("model_type") == "qwen3_moe" or num_experts > 0
        kwargs: dict[str, Any] = {}
        if moe:
            if config.get("decoder_sparse_step", 1) != 1 or config.get("mlp_only_layers"):
                raise ValueError(
                    "config.json mixes dense and MoE blocks (decoder_sparse_step / mlp_only_layers): "
                    "only all-MoE Qwen3 models are supported"
                )
            kwargs = dict(
                moe_enabled=True,
                moe_args=_qwen3_moe(
                    num_experts=num_experts,
                    top_k=config["num_experts_per_tok"],
                    route_norm=bool(config.get("norm_topk_prob", False)),
                ),
                moe_inter_dim=config["moe_intermediate_size"],
            )
        dim, n_heads = config["hidden_size"], config["num_attention_heads"]
        return Qwen3ModelArgs(
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads", n_heads),
            head_dim=config.get("head_dim") or dim // n_heads,
            hidden_dim=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=config.get("rope_theta", rope.get("rope_theta", 10000.0)),
            max_seq_len=config.get("max_position_embeddings", 40960),
            enable_weight_tying=bool(config.get("tie_word_embeddings", False)),
            **kwargs,
        )
