"""DeepSeek-V3 model family (V2-Lite 16B, V3 671B): counts, Hugging Face interop, FLOPs, init, hooks."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from torchtitan.config import ConfigError, JobConfig
from torchtitan.models import get_model_args, get_model_spec
from torchtitan.models.common.moe import MoEArgs
from torchtitan.models.common.rope import precompute_freqs_cis
from torchtitan.models.deepseek_v3 import (
    DeepSeekV3ModelArgs,
    DeepSeekV3StateDictAdapter,
    DeepSeekV3Transformer,
    deepseek_v3_configs,
)

transformers = pytest.importorskip("transformers")

VOCAB = 128

# Parameters of the published models: DeepSeek-V2-Lite's model card and transformers'
# DeepseekV3ForCausalLM of DeepSeek-V3's config.json, which leaves out the checkpoint's
# multi-token-prediction layer (both also checked against transformers below).
PUBLISHED = {"16B": 15_706_484_224, "671B": 671_026_404_352}

# The fields of deepseek-ai/DeepSeek-V2-Lite's and deepseek-ai/DeepSeek-V3's config.json that
# describe the model (V3's quantization_config left out: its weights are FP8).
V2_LITE_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "attention_bias": False,
    "aux_loss_alpha": 0.001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "v_head_dim": 128, "vocab_size": 102400,
}
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "aux_loss_alpha": 0.001, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "v_head_dim": 128,
    "vocab_size": 129280,
}


def meta_model(flavor: str) -> tuple[DeepSeekV3ModelArgs, DeepSeekV3Transformer]:
    args = get_model_args("deepseek_v3", flavor)
    if args.vocab_size == -1:
        args.vocab_size = 2000
    with torch.device("meta"):
        model = DeepSeekV3Transformer(args)
    return args, model


def hf_model(config: dict, device: str | None = None) -> torch.nn.Module:
    """transformers' model of ``config`` (the class its ``architectures`` names), eager attention."""
    hf_config = transformers.AutoConfig.for_model(**config, attn_implementation="eager")
    model_cls = getattr(transformers, config["architectures"][0])
    if device is None:
        return model_cls(hf_config).eval()
    with torch.device(device):
        return model_cls(hf_config)


def nparams(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- parameter counts ------------------------------------------------------------------


@pytest.mark.parametrize("flavor", sorted(PUBLISHED))
def test_published_parameter_counts(flavor):
    _, model = meta_model(flavor)
    assert nparams(model) == PUBLISHED[flavor]


@pytest.mark.parametrize("flavor", sorted(deepseek_v3_configs))
def test_every_flavor_counts_like_transformers(flavor):
    """Our model and transformers' model built from our hf_config() on meta agree (the
    published flavors too: 671B is V3 without its multi-token-prediction layer)."""
    args, model = meta_model(flavor)
    hf = hf_model(DeepSeekV3StateDictAdapter(args).hf_config(), device="meta")
    assert nparams(model) == nparams(hf)


def test_published_flavors_are_the_hub_configs():
    """The 16B and 671B flavors are what the Hub's config.json files describe (but for the
    context: the flavors keep a 4096-token table, the files say 163840)."""
    for config, flavor in ((V2_LITE_CONFIG, "16B"), (V3_CONFIG, "671B")):
        args = DeepSeekV3StateDictAdapter.args_from_hf_config(config)
        assert args.max_seq_len == 163840
        args.max_seq_len = 4096
        assert args == deepseek_v3_configs[flavor], flavor
    v3, lite = deepseek_v3_configs["671B"].moe_args, deepseek_v3_configs["16B"].moe_args
    assert (v3.score_func, v3.num_expert_groups, v3.num_limited_groups) == ("sigmoid", 8, 4)
    assert (lite.score_func, lite.num_expert_groups, lite.route_norm) == ("softmax", None, False)


# ---- FLOPs -----------------------------------------------------------------------------


def closed_form_flops(a: DeepSeekV3ModelArgs, seq_len: int) -> int:
    """6 x the parameters a token's matmuls touch + the attention term, by hand."""
    n = a.n_heads
    if a.q_lora_rank:
        q = a.dim * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * n * a.qk_head_dim
    else:
        q = a.dim * n * a.qk_head_dim
    kv = a.dim * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
    kv += a.kv_lora_rank * n * (a.qk_nope_head_dim + a.v_head_dim)
    attention = q + kv + n * a.v_head_dim * a.dim + 2 * a.dim  # + wo, the two block norms
    m = a.moe_args
    moe = a.dim * m.num_experts + 3 * a.dim * a.moe_inter_dim * (m.top_k + m.num_shared_experts)
    n_moe = a.n_layers - a.n_dense_layers
    active = a.n_layers * attention + a.n_dense_layers * 3 * a.dim * a.inter_dim + n_moe * moe
    active += a.dim + a.vocab_size * a.dim  # final norm, output
    return 6 * active + 6 * a.n_layers * n * (a.qk_head_dim + a.v_head_dim) * seq_len


@pytest.mark.parametrize("flavor", sorted(deepseek_v3_configs))
def test_flops_from_active_parameters(flavor):
    args, model = meta_model(flavor)
    n, flops = args.get_nparams_and_flops(model, 4096)
    assert n == nparams(model)
    assert flops == closed_form_flops(args, 4096)


def test_flops_671b_by_hand():
    """671B, the docstring's formula: 8 of 256 routed experts + the shared one per MoE token."""
    args, model = meta_model("671B")
    attention = (
        7168 * 1536 + 1536 + 1536 * 128 * 192  # wq_a, q_norm, wq_b
        + 7168 * (512 + 64) + 512 + 512 * 128 * (128 + 128)  # wkv_a, kv_norm, wkv_b
        + 128 * 128 * 7168  # wo
        + 2 * 7168  # attention_norm, ffn_norm
    )
    dense = 3 * 7168 * 18432
    moe = 7168 * 256 + (8 + 1) * 3 * 7168 * 2048  # router, 8 routed + 1 shared expert
    active = 61 * attention + 3 * dense + 58 * moe + 7168 + 129280 * 7168
    # 36.6B; with the 0.93B embedding table 37.6B, the "37B activated" of the model card
    assert active == 36_625_603_584
    _, flops = args.get_nparams_and_flops(model, 4096)
    assert flops == 6 * active + 6 * 61 * 128 * (192 + 128) * 4096


# ---- Hugging Face interop --------------------------------------------------------------

CASES = ["debugmodel", "debugmodel_lora", "v2_lite"]


def tiny_args(case: str) -> DeepSeekV3ModelArgs:
    """A debug flavor at a 128-token vocabulary; ``v2_lite``: the debug shape with the 16B's
    routing (softmax, 2 shared experts, greedy, no renormalisation) and YaRN."""
    args = copy.deepcopy(deepseek_v3_configs["debugmodel" if case == "v2_lite" else case])
    if case == "v2_lite":
        args.moe_args = MoEArgs(
            num_experts=8, num_shared_experts=2, top_k=2, score_func="softmax", route_norm=False,
            route_scale=1.0, load_balance_coeff=1e-3,
        )
        args.rope_scaling = copy.deepcopy(deepseek_v3_configs["16B"].rope_scaling)
    args.vocab_size, args.max_seq_len = VOCAB, 32
    return args


def built(args: DeepSeekV3ModelArgs, seed: int = 0) -> DeepSeekV3Transformer:
    """Random weights, norms far from 1 and (sigmoid routing: the V3 format holds it) a
    non-zero expert bias that changes which experts are picked."""
    torch.manual_seed(seed)
    model = DeepSeekV3Transformer(args)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
        if args.moe_args.score_func == "sigmoid":
            for layer in list(model.layers.values())[args.n_dense_layers :]:
                layer.moe.expert_bias.uniform_(-0.1, 0.1)
    return model.eval()


def tokens(bs: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (bs, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    """fp32, eager attention: within 1e-5 of transformers' logits (measured 5e-7 at |logits| ~4)."""
    args = tiny_args(case)
    ours = built(args)
    adapter = DeepSeekV3StateDictAdapter(args)
    config = adapter.hf_config()
    assert config["model_type"] == ("deepseek_v2" if case == "v2_lite" else "deepseek_v3")
    hf = hf_model(config)
    hf_state = adapter.to_hf(ours.state_dict(), fused_experts=True)  # transformers' in-memory layout
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert unexpected == [] and missing == []
    if case != "v2_lite":
        assert hf.model.layers[1].mlp.gate.e_score_correction_bias.abs().min() > 0
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_files_load_in_transformers(case, tmp_path):
    """to_hf's per-expert tensors and hf_config() are what from_pretrained reads from disk,
    and what save_pretrained writes is what from_hf reads back."""
    from safetensors.torch import load_file, save_file

    args = tiny_args(case)
    ours = built(args)
    adapter = DeepSeekV3StateDictAdapter(args)
    on_disk = adapter.to_hf(ours.state_dict())
    assert on_disk["model.layers.3.mlp.experts.7.down_proj.weight"].shape == (256, 128)
    assert ("model.layers.1.mlp.gate.e_score_correction_bias" in on_disk) == (case != "v2_lite")
    save_file(on_disk, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(adapter.hf_config()))
    model_cls = getattr(transformers, adapter.hf_config()["architectures"][0])
    hf = model_cls.from_pretrained(str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
    x = tokens(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1e-5)
    hf.save_pretrained(str(tmp_path / "saved"))
    written = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert written.keys() == on_disk.keys()
    back = adapter.from_hf(written)
    state = ours.state_dict()
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("case", CASES)
def test_conversion_round_trips_exactly(case):
    args = tiny_args(case)
    adapter = DeepSeekV3StateDictAdapter(args)
    ours = built(args).state_dict()
    if case == "v2_lite":  # the V2 format has no expert bias: a zero one round-trips
        assert all(not v.any() for k, v in ours.items() if k.endswith("expert_bias"))
    for fused in (False, True):
        back = adapter.from_hf(adapter.to_hf(ours, fused_experts=fused))
        assert set(back) == set(ours)
        assert all(torch.equal(back[k], ours[k]) for k in ours)
    # transformers -> ours -> transformers, from a model transformers initialised itself
    torch.manual_seed(1)
    hf = hf_model(adapter.hf_config())
    with torch.no_grad():
        for name, buffer in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.uniform_(-0.1, 0.1)
    hf_state = hf.state_dict()
    converted = adapter.from_hf(hf_state)
    adapter.check(converted)
    again = adapter.to_hf(converted, fused_experts=True)
    assert set(again) == set(hf_state)
    assert all(torch.equal(again[k], hf_state[k]) for k in hf_state)
    model = DeepSeekV3Transformer(args)
    model.load_state_dict(converted, strict=True)
    x = tokens(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), hf(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_conversion_key_by_key(case):
    """The checkpoint code converts one of our keys at a time (``to_hf({key: value})``) and
    reads back the Hugging Face tensors of one key at a time: the union is the whole."""
    args = tiny_args(case)
    adapter = DeepSeekV3StateDictAdapter(args)
    ours = built(args).state_dict()
    whole = adapter.to_hf(ours)
    groups = {key: adapter.to_hf({key: value}) for key, value in ours.items()}
    assert {k: v for g in groups.values() for k, v in g.items()}.keys() == whole.keys()
    back: dict[str, torch.Tensor] = {}
    derived: dict[str, torch.Tensor] = {}  # what a group implies for other keys (a zero expert bias)
    for key, group in groups.items():
        if group:
            converted = adapter.from_hf(group)
            back[key] = converted.pop(key)
            for k, v in converted.items():
                derived.setdefault(k, v)
    for k, v in derived.items():
        back.setdefault(k, v)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_key_names():
    """The Hub's names, layer by layer (dense block 0, MoE block 1; low-rank queries)."""
    args = tiny_args("debugmodel_lora")
    lora = DeepSeekV3StateDictAdapter(args).to_hf(built(args).state_dict())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for layer in ("0", "1"):
        p = f"model.layers.{layer}."
        expected |= {p + k for k in (
            "self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight",
            "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_layernorm.weight", "self_attn.kv_b_proj.weight",
            "self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
        )}
    expected |= {f"model.layers.0.mlp.{k}_proj.weight" for k in ("gate", "up", "down")}
    expected |= {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"}
    expected |= {f"model.layers.1.mlp.shared_experts.{k}_proj.weight" for k in ("gate", "up", "down")}
    expected |= {f"model.layers.1.mlp.experts.{j}.{k}_proj.weight" for j in range(8) for k in ("gate", "up", "down")}
    assert {k for k in lora if not k.startswith(("model.layers.2.", "model.layers.3."))} == expected
    args = tiny_args("debugmodel")
    plain = DeepSeekV3StateDictAdapter(args).to_hf(built(args).state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in plain and not any("q_a_proj" in k for k in plain)


def mtp_layer(n_layers: int) -> dict[str, torch.Tensor]:
    """Tensors of the released V3 checkpoint's multi-token-prediction layer, numbered
    ``n_layers`` (61 there): a decoder block plus its own norms, projection and head."""
    p = f"model.layers.{n_layers}."
    names = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight", "shared_head.norm.weight",
             "shared_head.head.weight", "self_attn.q_a_proj.weight", "mlp.experts.0.gate_proj.weight",
             "mlp.gate.e_score_correction_bias", "input_layernorm.weight")
    return {p + name: torch.ones(2, 2) for name in names}


def test_from_hf_drops_the_mtp_layer(tmp_path):
    """from_hf, the offline converter (scripts/convert_hf_to_dcp.py) and load_hf
    (checkpoint.initial_load_in_hf) skip the layers past n_layers; the layers before it are
    still checked."""
    from safetensors.torch import save_file

    from torchtitan.components.checkpoint import CheckpointError
    from torchtitan.components.checkpoint.hf import hf_to_dcp, load_hf
    from torchtitan.components.checkpoint.storage import read_model_state

    args = tiny_args("debugmodel_lora")
    adapter = DeepSeekV3StateDictAdapter(args)
    ours = built(args).state_dict()
    with_mtp = {**adapter.to_hf(ours), **mtp_layer(args.n_layers)}
    back = adapter.from_hf(with_mtp)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    assert adapter.ignores_hf_key("model.layers.4.enorm.weight")
    assert not adapter.ignores_hf_key("model.layers.3.mlp.gate.weight")
    with pytest.raises(KeyError, match="model.layers.3.enorm.weight"):
        adapter.from_hf({"model.layers.3.enorm.weight": torch.ones(2)})

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(with_mtp, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**adapter.hf_config(), "num_nextn_predict_layers": 1}))
    hf_to_dcp(str(folder), str(tmp_path / "dcp"), DeepSeekV3StateDictAdapter)
    converted = read_model_state(str(tmp_path / "dcp"))
    assert converted.keys() == ours.keys() and all(torch.equal(converted[k], ours[k]) for k in ours)
    model = DeepSeekV3Transformer(args)
    load_hf(str(folder), [model], adapter)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], ours[k]) for k in ours)

    class NoSkip:  # the same mapping without ignores_hf_key: the MTP tensors are unexpected
        to_hf, from_hf = adapter.to_hf, adapter.from_hf

    with pytest.raises(CheckpointError, match=r"has model\.layers\.4\."):
        load_hf(str(folder), [model], NoSkip())


def test_from_hf_rejects_incomplete_experts_and_unknown_tensors():
    args = tiny_args("debugmodel")
    adapter = DeepSeekV3StateDictAdapter(args)
    hf_state = adapter.to_hf(built(args).state_dict())
    del hf_state["model.layers.2.mlp.experts.5.up_proj.weight"]
    with pytest.raises(ValueError, match=r"layer 2 moe.experts.w3: experts \[0, 1, 2, 3, 4, 6, 7\] are not 0..6"):
        adapter.from_hf(hf_state)
    with pytest.raises(KeyError, match="no DeepSeek-V3 counterpart"):
        adapter.from_hf({"model.layers.0.mlp.shared_expert.up_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="FP8 block scale: dequantize"):
        adapter.from_hf({"model.layers.0.self_attn.o_proj.weight_scale_inv": torch.zeros(1)})


@pytest.mark.parametrize("flavor", sorted(deepseek_v3_configs))
def test_args_from_hf_config_round_trip(flavor):
    args = get_model_args("deepseek_v3", flavor)
    if args.vocab_size == -1:
        args.vocab_size = 2000
    config = DeepSeekV3StateDictAdapter(args).hf_config()
    assert DeepSeekV3StateDictAdapter.args_from_hf_config(config) == args
    # the form transformers writes (rope inside rope_parameters, its own defaults added)
    written = transformers.AutoConfig.for_model(**config).to_dict()
    assert DeepSeekV3StateDictAdapter.args_from_hf_config(written) == args
    # the older form: rope_scaling with "type", rope_theta beside it
    old = {k: v for k, v in config.items() if k != "rope_parameters"}
    rope = dict(config["rope_parameters"])
    old["rope_theta"] = rope.pop("rope_theta")
    if rope["rope_type"] != "default":
        old["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    assert DeepSeekV3StateDictAdapter.args_from_hf_config(old) == args


def test_args_from_hf_config_refuses_what_this_model_cannot_run():
    with pytest.raises(ValueError, match="group_limited_greedy"):  # DeepSeek-V2 (236B)'s routing
        DeepSeekV3StateDictAdapter.args_from_hf_config(
            {**V2_LITE_CONFIG, "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3}
        )
    with pytest.raises(ValueError, match="dequantize it to bf16"):
        DeepSeekV3StateDictAdapter.args_from_hf_config(
            {**V3_CONFIG, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}}
        )
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        DeepSeekV3StateDictAdapter.args_from_hf_config({**V3_CONFIG, "tie_word_embeddings": True})
    with pytest.raises(ValueError, match="mscale_all_dim without mscale"):
        DeepSeekV3StateDictAdapter.args_from_hf_config(
            {**V3_CONFIG, "rope_scaling": {**V3_CONFIG["rope_scaling"], "mscale": None}}
        )
    # no mscale_all_dim: transformers scales the rotary table by yarn_mscale(factor) and the
    # softmax not at all, which is our mscale 1 with mscale_all_dim 0
    rope = {k: v for k, v in V3_CONFIG["rope_scaling"].items() if k != "mscale_all_dim"}
    config = {**V3_CONFIG, "rope_scaling": {**rope, "mscale": 0.5}}
    args = DeepSeekV3StateDictAdapter.args_from_hf_config(config)
    assert (args.rope_scaling.mscale, args.rope_scaling.mscale_all_dim) == (1.0, 0.0)
    assert args.softmax_scale == args.qk_head_dim**-0.5
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, magnitude = ROPE_INIT_FUNCTIONS["yarn"](transformers.AutoConfig.for_model(**config))
    ours = precompute_freqs_cis(args.qk_rope_head_dim, 2, args.rope_theta, args.rope_scaling)
    torch.testing.assert_close(ours[1].abs(), torch.full((32,), magnitude), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours[1].angle(), inv_freq, rtol=1e-5, atol=0)


def test_hf_config_refuses_what_transformers_would_run_differently():
    def config_of(**moe):
        args = tiny_args("debugmodel")
        args.moe_args = MoEArgs(**{**dict(num_experts=8, num_shared_experts=1, top_k=2), **moe})
        return DeepSeekV3StateDictAdapter(args).hf_config()

    assert config_of(score_func="sigmoid")["model_type"] == "deepseek_v3"
    assert config_of(score_func="sigmoid")["n_group"] == 1  # no groups: one group of all experts
    assert config_of(score_func="softmax")["model_type"] == "deepseek_v2"
    with pytest.raises(ValueError, match="no expert groups and ignores norm_topk_prob"):
        config_of(score_func="softmax", route_norm=True)
    with pytest.raises(ValueError, match="no expert groups"):
        config_of(score_func="softmax", num_expert_groups=4, num_limited_groups=2)
    with pytest.raises(ValueError, match="shared expert"):
        config_of(num_shared_experts=0)
    args = tiny_args("debugmodel_lora")
    args.rope_scaling.mscale_all_dim = 0.0
    args.rope_scaling.mscale = 0.8
    with pytest.raises(ValueError, match="mscale"):
        DeepSeekV3StateDictAdapter(args).hf_config()


# ---- the model -------------------------------------------------------------------------


def test_pipeline_stages_reproduce_whole_model():
    """Llama 3's split (the family's pipelining_fn) cuts this model into stages that chain to it."""
    from torchtitan.distributed.pipeline import StageLayout
    from torchtitan.models.llama3.pipeline import split_llama

    model = built(tiny_args("debugmodel_lora"))
    layout = StageLayout(num_stages=3, layer_starts=(0, 1, 3), n_layers=4, rank_stages=((0, 1, 2),))
    first, middle, last = split_llama(model, layout, (0, 1, 2))
    assert first.output is None and middle.tok_embeddings is None and middle.norm is None
    assert list(first.layers) == ["0"] and list(middle.layers) == ["1", "2"] and list(last.layers) == ["3"]
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(last(middle(first(x))), model(x), rtol=0, atol=0)
    for stage in (first, middle, last):  # a stage initialises what it holds
        stage.init_weights()
    assert torch.isfinite(last(middle(first(x)))).all()


def test_causal():
    """Later tokens leave earlier logits alone (up to float rounding: they change which rows
    each expert's grouped GEMM holds)."""
    model = built(tiny_args("debugmodel_lora"))
    x = tokens(1, 12)
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % VOCAB
    with torch.no_grad():
        out_x, out_y = model(x), model(y)
    torch.testing.assert_close(out_x[:, :8], out_y[:, :8], rtol=0, atol=1e-6)
    assert (out_x[:, 8:] - out_y[:, 8:]).abs().max() > 0.1


@pytest.mark.parametrize("case", ["debugmodel", "debugmodel_lora"])
def test_init_is_deterministic_and_materialises_from_meta(case):
    args = tiny_args(case)
    with torch.device("meta"):
        a, b = DeepSeekV3Transformer(args), DeepSeekV3Transformer(args)
    for model in (a, b):
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        model.init_weights()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(v.is_meta for v in sa.values()) and not a.freqs_cis.is_meta
    torch.testing.assert_close(a.freqs_cis, DeepSeekV3Transformer(args).freqs_cis, rtol=0, atol=0)
    torch.manual_seed(1)
    b.init_weights()
    assert not torch.equal(a.layers["0"].attention.wkv_a.weight, b.layers["0"].attention.wkv_a.weight)
    assert torch.equal(a.layers["1"].moe.expert_bias, torch.zeros(8))
    assert torch.equal(a.layers["1"].attention.kv_norm.weight, torch.ones(64))
    assert torch.isfinite(a(tokens())).all()


# ---- args, registry --------------------------------------------------------------------


def test_update_from_config():
    job = JobConfig()
    job.training.seq_len = 512
    job.model.attention_backend = "math"
    args = get_model_args("deepseek_v3", "debugmodel")
    args.update_from_config(job, SimpleNamespace(vocab_size=2256))
    assert (args.vocab_size, args.max_seq_len, args.attn_backend) == (2256, 512, "math")
    real = get_model_args("deepseek_v3", "671B")
    real.update_from_config(job, SimpleNamespace(vocab_size=128000))
    assert real.vocab_size == 129280
    with pytest.raises(ValueError, match="model.flavor"):
        real.update_from_config(job, SimpleNamespace(vocab_size=200000))
    with pytest.raises(ValueError, match="model.tokenizer_path"):
        get_model_args("deepseek_v3", "debugmodel").update_from_config(job, None)


def test_registry():
    spec = get_model_spec("deepseek_v3")
    assert spec.model_cls is DeepSeekV3Transformer and spec.state_dict_adapter is DeepSeekV3StateDictAdapter
    assert set(spec.flavors) == {"debugmodel", "debugmodel_lora", "16B", "671B"}
    assert spec.validate_fn is not None and spec.build_step_hooks_fn is not None and spec.metrics_fn
    job = JobConfig()
    job.parallelism.expert_parallel_degree = 3
    with pytest.raises(ConfigError, match="expert_parallel_degree 3"):
        spec.validate_fn(job, get_model_args("deepseek_v3", "debugmodel"))
    job = JobConfig()
    job.parallelism.tensor_parallel_degree = 3
    with pytest.raises(ConfigError, match="tensor_parallel_degree 3"):
        spec.validate_fn(job, get_model_args("deepseek_v3", "debugmodel"))
    model = built(tiny_args("debugmodel"))
    with torch.no_grad():
        for layer in model.layers.values():
            if layer.moe_enabled:
                layer.moe.expert_bias.zero_()
    model(tokens())
    (hook,) = spec.build_step_hooks_fn([model], None)
    assert "moe/imbalance" in spec.metrics_fn([model])
    hook()
    assert float(model.layers["1"].moe.tokens_per_expert.sum()) == 0
    assert float(model.layers["1"].moe.expert_bias.abs().sum()) > 0
    assert not hasattr(model.layers["0"], "moe")  # the dense first block has no bias to move


@pytest.mark.parametrize("flavor,repo", [("16B", "deepseek-ai/DeepSeek-V2-Lite"), ("671B", "deepseek-ai/DeepSeek-V3")])
def test_missing_tokenizer_hint_names_the_hub_repository(flavor, repo):
    from torchtitan.components.tokenizer import TokenizerError, check_tokenizer_fits

    with pytest.raises(TokenizerError, match=f"--repo_id {repo} --local_dir ./assets/hf/{repo.split('/')[1]}"):
        check_tokenizer_fits(
            SimpleNamespace(vocab_size=2256), get_model_args("deepseek_v3", flavor).vocab_size,
            family="deepseek_v3", flavor=flavor, path="test.model", allow_small=False,
        )


# ---- the trainer ----------------------------------------------------------------------------


def test_trainer_trains_debugmodel_from_its_toml(tmp_path):
    """train_configs/deepseek_v3_debug.toml through the real Trainer (one CPU process): the
    loss falls and the expert bias moves."""
    from small_trainer import train_debug_toml

    trainer, losses = train_debug_toml(tmp_path, "deepseek_v3_debug.toml")
    assert (trainer.job_config.model.name, trainer.job_config.model.flavor) == ("deepseek_v3", "debugmodel")
    assert losses[-1] < losses[0] - 0.5, losses
    model = trainer.model_parts[0]
    assert float(model.layers["1"].moe.expert_bias.abs().sum()) > 0
