"""DeepSeek-V3 / V2-Lite weights between our names and Hugging Face's.

Names: ours are TorchTitan's (``layers.0.attention.wkv_a.weight``); Hugging Face's are
``model.layers.0.self_attn.kv_a_proj_with_mqa.weight`` and so on (table below). No tensor is
permuted: our interleaved rotary layout is the one DeepSeek's checkpoints use (transformers'
``rope_interleave``), so every tensor only changes name, except the experts.

MoE experts: :mod:`torchtitan.models.common.hf_experts` converts them, one tensor per expert
as on the Hub from :meth:`DeepSeekV3StateDictAdapter.to_hf`, transformers 5's fused in-memory
layout with ``to_hf(..., fused_experts=True)``; :meth:`~DeepSeekV3StateDictAdapter.from_hf`
reads either.

Two Hugging Face architectures, chosen by the routing (transformers runs each one way):
sigmoid scores are ``DeepseekV3ForCausalLM`` (its router is always sigmoid, group-limited,
with the expert bias ``mlp.gate.e_score_correction_bias`` = our ``moe.expert_bias``);
softmax scores are ``DeepseekV2ForCausalLM`` (V2-Lite's own ``config.json``: greedy top-k,
no bias tensor, so ``to_hf`` drops ``expert_bias`` there and ``from_hf`` returns zeros).

The released V3 checkpoint also holds its multi-token-prediction module as one more layer
(``model.layers.61.*`` with ``num_nextn_predict_layers = 1``), which this model does not have:
``from_hf`` drops the tensors of every layer numbered ``n_layers`` or more, and
:meth:`~DeepSeekV3StateDictAdapter.ignores_hf_key` tells the checkpoint loader to skip them.
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
from torchtitan.models.common.moe import MoEArgs
from torchtitan.models.common.rope import YaRNScalingArgs
from torchtitan.models.deepseek_v3.args import DeepSeekV3ModelArgs
from torchtitan.models.model_spec import check_state_shapes

__all__ = ["DeepSeekV3StateDictAdapter"]

# our name -> Hugging Face name, inside a layer
_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wq_a.weight": "self_attn.q_a_proj.weight",
    "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attention.wq_b.weight": "self_attn.q_b_proj.weight",
    "attention.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attention.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
    "moe.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "moe.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "moe.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_BIAS_KEY = ("moe.expert_bias", "mlp.gate.e_score_correction_bias")
_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class DeepSeekV3StateDictAdapter:
    """Maps a full (unsharded) DeepSeek-V3 state dict to Hugging Face's and back."""

    def __init__(self, args: DeepSeekV3ModelArgs):
        self.args = args

    @property
    def _bias_in_hf(self) -> bool:
        """Whether the Hugging Face architecture has the expert bias (V3's, not V2's)."""
        return self.args.moe_args.score_func == "sigmoid"

    # ---- weights --------------------------------------------------------------------
    def to_hf(self, state: Mapping[str, torch.Tensor], fused_experts: bool = False) -> dict[str, torch.Tensor]:
        """Our state dict to Hugging Face's on-disk names (one tensor per expert), or with
        ``fused_experts`` to transformers 5's in-memory ``gate_up_proj``/``down_proj``."""
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key in _TOP_KEYS:
                out[_TOP_KEYS[key]] = value.contiguous()
                continue
            match = _OURS_LAYER.match(key)
            if match is None:
                raise KeyError(f"no Hugging Face name for parameter {key!r}")
            layer, name = match.groups()
            prefix = f"model.layers.{layer}."
            if name == "moe.tokens_per_expert":  # load-balancing counts, not model state
                continue
            if name == _BIAS_KEY[0]:
                if self._bias_in_hf:
                    out[prefix + _BIAS_KEY[1]] = value.contiguous()
                continue
            if name in EXPERT_KEYS:
                out.update(experts_to_hf(state, layer, name, value, fused_experts))
                continue
            if name not in _LAYER_KEYS:
                raise KeyError(f"no Hugging Face name for parameter {key!r}")
            out[prefix + _LAYER_KEYS[name]] = value.contiguous()
        return out

    def ignores_hf_key(self, hf_key: str) -> bool:
        """Whether ``hf_key`` is a tensor this model has no place for by design: a layer past
        ``n_layers`` (the released V3 checkpoint's multi-token-prediction module)."""
        match = _HF_LAYER.match(hf_key)
        return match is not None and int(match.group(1)) >= self.args.n_layers

    def from_hf(self, hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hugging Face weights (per-expert or fused experts) to ours.

        Layers numbered ``n_layers`` or more are dropped: the released V3 checkpoint's
        multi-token-prediction module (``model.layers.61.*``) is not part of this model.
        MoE layers without ``e_score_correction_bias`` (V2 checkpoints) get a zero
        ``expert_bias``. Works on any subset of the keys (one layer, one tensor).
        """
        out: dict[str, torch.Tensor] = {}
        per_expert: PerExpert = {}
        ours_by_hf = {hf: ours for ours, hf in _LAYER_KEYS.items()}
        ours_by_hf[_BIAS_KEY[1]] = _BIAS_KEY[0]
        top_by_hf = {hf: ours for ours, hf in _TOP_KEYS.items()}
        for hf_key, value in hf_state.items():
            if hf_key.endswith("rotary_emb.inv_freq") or self.ignores_hf_key(hf_key):
                continue
            if hf_key.endswith("weight_scale_inv"):
                raise ValueError(
                    f"Hugging Face tensor {hf_key!r} is an FP8 block scale: dequantize the checkpoint to "
                    "bf16 before converting it"
                )
            if hf_key in top_by_hf:
                out[top_by_hf[hf_key]] = value.contiguous()
                continue
            match = _HF_LAYER.match(hf_key)
            if match is None:
                raise KeyError(f"Hugging Face tensor {hf_key!r} has no DeepSeek-V3 counterpart")
            layer, name = match.groups()
            experts = experts_from_hf(layer, name, value, per_expert)
            if experts is not None:
                out.update(experts)
            elif name in ours_by_hf:
                out[f"layers.{layer}.{ours_by_hf[name]}"] = value.contiguous()
            else:
                raise KeyError(f"Hugging Face tensor {hf_key!r} has no DeepSeek-V3 counterpart")
        out.update(stack_experts(per_expert))
        add_zero_expert_bias(out, self.args.moe_args.num_experts, self.args.n_dense_layers)
        return out

    def check(self, state: Mapping[str, torch.Tensor]) -> None:
        """Raise a one-line ValueError unless ``state`` has exactly this model's names and
        shapes (the model is built on the meta device: no memory)."""
        from torchtitan.models.deepseek_v3.model import DeepSeekV3Transformer

        check_state_shapes(DeepSeekV3Transformer, self.args, state)

    # ---- config.json ----------------------------------------------------------------
    def hf_config(
        self, torch_dtype: str = "float32", bos_token_id: int | None = None, eos_token_id: int | None = None
    ) -> dict[str, Any]:
        """A ``config.json`` for ``DeepseekV3ForCausalLM`` (sigmoid routing) or
        ``DeepseekV2ForCausalLM`` (softmax routing, V2-Lite's); ValueError for args that
        transformers would run differently."""
        a, m = self.args, self.args.moe_args
        if a.moe_enabled and m.num_shared_experts < 1:
            raise ValueError(
                "transformers' DeepSeek models always have a shared expert: num_shared_experts=0 has no config"
            )
        groups, limited = m.num_expert_groups or 1, m.num_limited_groups or 1
        config: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "hidden_size": a.dim,
            "intermediate_size": a.inter_dim,
            "moe_intermediate_size": a.moe_inter_dim,
            "num_hidden_layers": a.n_layers,
            "first_k_dense_replace": a.n_dense_layers,
            "moe_layer_freq": 1,
            "num_attention_heads": a.n_heads,
            "num_key_value_heads": a.n_heads,
            "q_lora_rank": a.q_lora_rank or None,
            "kv_lora_rank": a.kv_lora_rank,
            "qk_nope_head_dim": a.qk_nope_head_dim,
            "qk_rope_head_dim": a.qk_rope_head_dim,
            "v_head_dim": a.v_head_dim,
            "n_routed_experts": m.num_experts,
            "n_shared_experts": m.num_shared_experts,
            "num_experts_per_tok": m.top_k,
            "scoring_func": m.score_func,
            "topk_method": "noaux_tc",
            "n_group": groups,
            "topk_group": limited,
            "norm_topk_prob": m.route_norm,
            "routed_scaling_factor": m.route_scale,
            "num_nextn_predict_layers": 0,  # no multi-token-prediction layer in our files
            "vocab_size": a.vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": a.norm_eps,
            "rope_parameters": self._rope_parameters(),
            "rope_interleave": True,
            "max_position_embeddings": a.max_seq_len,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "torch_dtype": torch_dtype,
        }
        if m.score_func == "softmax":
            if m.num_expert_groups is not None or m.route_norm:
                raise ValueError(
                    "softmax routing is DeepseekV2ForCausalLM's, whose greedy router has no expert groups and "
                    f"ignores norm_topk_prob: these args (groups {m.num_expert_groups}, route_norm "
                    f"{m.route_norm}) have no config"
                )
            del config["rope_interleave"], config["num_nextn_predict_layers"]
            config.update(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", topk_method="greedy")
        if bos_token_id is not None:
            config["bos_token_id"] = bos_token_id
        if eos_token_id is not None:
            config["eos_token_id"] = eos_token_id
        return config

    def _rope_parameters(self) -> dict[str, Any]:
        a = self.args
        if a.rope_scaling is None:
            return {"rope_type": "default", "rope_theta": a.rope_theta}
        y = a.rope_scaling
        # transformers scales the rotary table by mscale/mscale_all_dim only when both are
        # set, else by yarn_mscale(factor); ours always by the ratio (an unset one counting 1)
        if not ((y.mscale and y.mscale_all_dim) or (not y.mscale_all_dim and y.mscale == 1.0)):
            raise ValueError(
                f"YaRN mscale {y.mscale} with mscale_all_dim {y.mscale_all_dim}: transformers scales the rotary "
                "table differently (set both, or mscale 1 without mscale_all_dim)"
            )
        return {
            "rope_type": "yarn",
            "rope_theta": a.rope_theta,
            "factor": y.factor,
            "original_max_position_embeddings": y.original_max_position_embeddings,
            "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow,
            "mscale": y.mscale,
            "mscale_all_dim": y.mscale_all_dim,
        }

    @staticmethod
    def args_from_hf_config(config: Mapping[str, Any]) -> DeepSeekV3ModelArgs:
        """Our args for a Hugging Face DeepSeek-V3 or V2 ``config.json`` (rope as
        ``rope_scaling`` + ``rope_theta``, or transformers 5's ``rope_parameters``).

        V3's ``noaux_tc`` and V2-Lite's ``greedy`` routing are supported; V2's
        ``group_limited_greedy`` (a group scored by its best expert) and FP8-quantized
        checkpoints are refused. The MoE balances with the expert bias (rate 1e-3), as the flavors.
        """
        model_type = config.get("model_type", "deepseek_v3")
        if model_type not in ("deepseek_v2", "deepseek_v3"):
            raise ValueError(f"config.json model_type {model_type!r} is not a DeepSeek-V2/V3 model")
        if config.get("quantization_config"):
            raise ValueError(
                "config.json describes a quantized checkpoint (quantization_config, e.g. V3's FP8 release): "
                "dequantize it to bf16 first"
            )
        expected = {"attention_bias": False, "tie_word_embeddings": False, "hidden_act": "silu", "moe_layer_freq": 1}
        for key, value in expected.items():
            if config.get(key, value) != value:
                raise ValueError(f"config.json has {key}={config[key]!r}; this model supports only {value!r}")
        n_heads = config["num_attention_heads"]
        if config.get("num_key_value_heads") not in (None, n_heads):
            raise ValueError("config.json has num_key_value_heads != num_attention_heads, which MLA does not use")
        v2 = model_type == "deepseek_v2"
        score_func = config.get("scoring_func") or ("softmax" if v2 else "sigmoid")
        topk_method = config.get("topk_method") or ("greedy" if v2 else "noaux_tc")
        if topk_method == "group_limited_greedy":
            raise ValueError(
                "config.json routes with topk_method 'group_limited_greedy' (DeepSeek-V2's device-limited "
                "routing, a group scored by its best expert), which this router does not implement"
            )
        if topk_method not in ("greedy", "noaux_tc"):
            raise ValueError(f"config.json topk_method {topk_method!r}: only 'greedy' and 'noaux_tc'")
        n_group, topk_group = config.get("n_group") or 1, config.get("topk_group") or 1
        groups: dict[str, Any] = {}
        if n_group > 1 and topk_method != "greedy":
            groups = dict(num_expert_groups=n_group, num_limited_groups=topk_group)
        moe_args = MoEArgs(
            num_experts=config["n_routed_experts"],
            num_shared_experts=config.get("n_shared_experts") or 0,
            top_k=config["num_experts_per_tok"],
            score_func=score_func,
            route_norm=bool(config.get("norm_topk_prob", False)),
            route_scale=float(config.get("routed_scaling_factor", 1.0)),
            load_balance_coeff=1e-3,
            **groups,
        )
        max_seq_len = config.get("max_position_embeddings", 4096)
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        return DeepSeekV3ModelArgs(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_dense_layers=config.get("first_k_dense_replace", 0),
            n_heads=n_heads,
            vocab_size=config["vocab_size"],
            inter_dim=config["intermediate_size"],
            moe_inter_dim=config["moe_intermediate_size"],
            moe_args=moe_args,
            q_lora_rank=config.get("q_lora_rank") or 0,
            kv_lora_rank=config["kv_lora_rank"],
            qk_nope_head_dim=config["qk_nope_head_dim"],
            qk_rope_head_dim=config["qk_rope_head_dim"],
            v_head_dim=config["v_head_dim"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=_yarn_from_hf(rope, max_seq_len),
            max_seq_len=max_seq_len,
        )


def _yarn_from_hf(rope: Mapping[str, Any], max_seq_len: int) -> YaRNScalingArgs | None:
    """Our YaRN args for a Hugging Face rope dict, computing what transformers computes."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "yarn":
        raise ValueError(f"config.json rope type {rope_type!r}: only the default rope and 'yarn'")
    if rope.get("attention_factor") is not None or rope.get("truncate", True) is not True:
        raise ValueError("config.json's yarn sets attention_factor or truncate, which this model does not")
    original = rope["original_max_position_embeddings"]
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if not mscale_all_dim:
        mscale, mscale_all_dim = 1.0, 0.0  # transformers then scales the table by yarn_mscale(factor)
    elif not mscale:
        raise ValueError("config.json's yarn sets mscale_all_dim without mscale, which this model cannot express")
    return YaRNScalingArgs(
        factor=float(rope.get("factor") or max_seq_len / original),
        original_max_position_embeddings=original,
        beta_fast=float(rope.get("beta_fast") or 32.0),
        beta_slow=float(rope.get("beta_slow") or 1.0),
        mscale=float(mscale),
        mscale_all_dim=float(mscale_all_dim),
    )
