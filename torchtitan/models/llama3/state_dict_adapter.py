"""Llama 3 weights between our names and Hugging Face's, and from Meta's original shards.

Our parameter names are Meta's (``layers.0.attention.wq.weight``), and so is the rotary
layout: each head's query/key rows come in interleaved pairs ``(x0, x1), (x2, x3), ...``
rotated together. Hugging Face's ``LlamaForCausalLM`` instead rotates row ``i`` with row
``i + head_dim / 2`` (the "half-split" layout). Converting ``wq``/``wk`` is therefore a
fixed permutation of rows within each head, and its inverse on the way back; every other
tensor only changes name.

Meta's ``consolidated.NN.pth`` files are tensor-parallel shards of the same names: column
parallel weights (``wq, wk, wv, w1, w3, output``, and the vocab-parallel embedding) are
split along dim 0, row parallel ones (``wo, w2``) along dim 1, norms are replicated. When
there are more shards than key/value heads, ``wk``/``wv`` heads are replicated across the
shards and only one copy of each is kept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from torchtitan.models.common.rope import RoPEScalingArgs
from torchtitan.models.llama3.args import TransformerModelArgs, ffn_hidden_dim
from torchtitan.models.model_spec import check_state_shapes

__all__ = [
    "Llama3StateDictAdapter",
    "interleaved_to_half_split",
    "half_split_to_interleaved",
    "merge_meta_shards",
    "args_from_meta_params",
]

# our name pattern -> Hugging Face name pattern ("{}" is the layer index)
_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def interleaved_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head reordered from pairs (0, 1), (2, 3), ... to halves: even rows
    first, then odd rows, so row ``i`` pairs with row ``i + head_dim / 2``."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_split_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`interleaved_to_half_split`."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


class Llama3StateDictAdapter:
    """Maps a full (unsharded) Llama 3 state dict to Hugging Face's and back."""

    def __init__(self, args: TransformerModelArgs):
        self.args = args
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads

    # ---- weights --------------------------------------------------------------------
    def to_hf(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in state.items():
            hf_key = self._hf_name(key)
            if key.endswith("attention.wq.weight"):
                value = interleaved_to_half_split(value, self.args.n_heads)
            elif key.endswith("attention.wk.weight"):
                value = interleaved_to_half_split(value, self.n_kv_heads)
            out[hf_key] = value.contiguous()
        return out

    def from_hf(self, hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hugging Face weights to ours. An absent ``lm_head.weight`` (checkpoints with
        tied embeddings) becomes a copy of the embedding, as our output layer is untied."""
        out = {}
        for hf_key, value in hf_state.items():
            if hf_key.endswith("rotary_emb.inv_freq"):  # a buffer some old exports contain
                continue
            key = self._our_name(hf_key)
            if key.endswith("attention.wq.weight"):
                value = half_split_to_interleaved(value, self.args.n_heads)
            elif key.endswith("attention.wk.weight"):
                value = half_split_to_interleaved(value, self.n_kv_heads)
            out[key] = value.contiguous()
        if "output.weight" not in out and "tok_embeddings.weight" in out:
            out["output.weight"] = out["tok_embeddings.weight"].clone()
        return out

    @staticmethod
    def _hf_name(key: str) -> str:
        if key in _TOP_KEYS:
            return _TOP_KEYS[key]
        match = _OURS_LAYER.match(key)
        if match and match.group(2) in _LAYER_KEYS:
            return f"model.layers.{match.group(1)}.{_LAYER_KEYS[match.group(2)]}"
        raise KeyError(f"no Hugging Face name for parameter {key!r}")

    @staticmethod
    def _our_name(hf_key: str) -> str:
        for ours, theirs in _TOP_KEYS.items():
            if hf_key == theirs:
                return ours
        match = _HF_LAYER.match(hf_key)
        if match:
            for ours, theirs in _LAYER_KEYS.items():
                if match.group(2) == theirs:
                    return f"layers.{match.group(1)}.{ours}"
        raise KeyError(f"Hugging Face tensor {hf_key!r} has no Llama 3 counterpart")

    def check(self, state: Mapping[str, torch.Tensor]) -> None:
        """Raise a one-line ValueError unless ``state`` has exactly this model's parameter
        names and shapes (the model is built on the meta device: no memory)."""
        from torchtitan.models.llama3.model import Transformer

        check_state_shapes(Transformer, self.args, state)

    # ---- config.json ----------------------------------------------------------------
    def hf_config(
        self, torch_dtype: str = "float32", bos_token_id: int | None = None, eos_token_id: int | None = None
    ) -> dict[str, Any]:
        """A ``config.json`` for ``LlamaForCausalLM`` describing these args."""
        a = self.args
        config: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": a.dim,
            "intermediate_size": ffn_hidden_dim(a.dim, a.multiple_of, a.ffn_dim_multiplier),
            "num_hidden_layers": a.n_layers,
            "num_attention_heads": a.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": a.head_dim,
            "vocab_size": a.vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": a.norm_eps,
            "rope_theta": a.rope_theta,
            "max_position_embeddings": a.max_seq_len,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": torch_dtype,
        }
        if a.rope_scaling is not None:
            s = a.rope_scaling
            # transformers expects the scaled context to exceed the original one
            config["max_position_embeddings"] = max(a.max_seq_len, s.original_max_position_embeddings)
            config["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }
        if bos_token_id is not None:
            config["bos_token_id"] = bos_token_id
        if eos_token_id is not None:
            config["eos_token_id"] = eos_token_id
        return config

    @staticmethod
    def args_from_hf_config(config: Mapping[str, Any]) -> TransformerModelArgs:
        """Our args for a Hugging Face Llama ``config.json`` (``rope_scaling`` or, in newer
        exports, ``rope_parameters``)."""
        dim, n_heads = config["hidden_size"], config["num_attention_heads"]
        if config.get("head_dim", dim // n_heads) != dim // n_heads:
            raise ValueError(
                f"config.json head_dim {config['head_dim']} != hidden_size / num_attention_heads "
                f"({dim // n_heads}): such models are not Llama 3 shaped"
            )
        rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
        theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = None
        if rope.get("rope_type", rope.get("type")) == "llama3":
            scaling = RoPEScalingArgs(
                factor=rope["factor"],
                low_freq_factor=rope["low_freq_factor"],
                high_freq_factor=rope["high_freq_factor"],
                original_max_position_embeddings=rope["original_max_position_embeddings"],
            )
        elif rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"config.json rope type {rope.get('rope_type')!r}: only llama3 or default")
        hidden = config["intermediate_size"]
        args = TransformerModelArgs(
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads", n_heads),
            vocab_size=config["vocab_size"],
            # a multiplier that reproduces intermediate_size exactly (+0.5: no float floor)
            multiple_of=1,
            ffn_dim_multiplier=(hidden + 0.5) / int(8 * dim / 3),
            norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=config.get("max_position_embeddings", 131072),
        )
        assert ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier) == hidden
        return args


# ---- Meta's original checkpoints ---------------------------------------------------------
_DIM0 = (
    "wq.weight",
    "wk.weight",
    "wv.weight",
    "w1.weight",
    "w3.weight",
    "output.weight",
    "tok_embeddings.weight",
)
_DIM1 = ("wo.weight", "w2.weight")


def merge_meta_shards(shards: list[Mapping[str, torch.Tensor]], n_kv_heads: int) -> dict[str, torch.Tensor]:
    """One state dict from Meta's model-parallel ``consolidated.NN.pth`` shards (in order)."""
    n = len(shards)
    merged: dict[str, torch.Tensor] = {}
    for key in shards[0]:
        if key == "rope.freqs":  # a precomputed table we compute ourselves
            continue
        parts = [shard[key] for shard in shards]
        if n == 1 or parts[0].dim() == 1:  # norms are replicated
            merged[key] = parts[0]
        elif key.endswith(("wk.weight", "wv.weight")) and n > n_kv_heads:
            # fewer kv heads than shards: consecutive shards hold copies of one head
            merged[key] = torch.cat(parts[:: n // n_kv_heads], dim=0)
        elif key.endswith(_DIM0):
            merged[key] = torch.cat(parts, dim=0)
        elif key.endswith(_DIM1):
            merged[key] = torch.cat(parts, dim=1)
        else:
            raise KeyError(f"Meta checkpoint tensor {key!r} has no known sharding")
    return merged


def args_from_meta_params(params: Mapping[str, Any]) -> TransformerModelArgs:
    """Our args from Meta's ``params.json``."""
    return TransformerModelArgs(
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"),
        vocab_size=params["vocab_size"],
        multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 500000.0),
        rope_scaling=RoPEScalingArgs() if params.get("use_scaled_rope", False) else None,
    )
