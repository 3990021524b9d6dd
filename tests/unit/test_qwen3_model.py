"""Qwen3 model family (dense and MoE): counts, Hugging Face interop, FLOPs, init, hooks."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from torchtitan.config import ConfigError, JobConfig
from torchtitan.models import get_model_args, get_model_spec
from torchtitan.models.common.moe import MoE, MoEArgs
from torchtitan.models.qwen3 import Qwen3ModelArgs, Qwen3StateDictAdapter, Qwen3Transformer, qwen3_configs

transformers = pytest.importorskip("transformers")

VOCAB = 128

# The parameter counts of Hugging Face's published checkpoints (issue #24).
PUBLISHED = {
    "0.6B": 596_049_920,
    "1.7B": 1_720_574_976,
    "8B": 8_190_735_360,
    "32B": 32_762_123_264,
    "30B-A3B": 30_532_122_624,
    "235B-A22B": 235_093_634_560,
    "30B-A3B-6L": 4_361_055_744,
}
TIED = {"0.6B", "1.7B", "4B", "debugmodel_tied"}  # tie_word_embeddings in the published config.json files; the tied debug shape


def meta_model(flavor: str) -> tuple[Qwen3ModelArgs, Qwen3Transformer]:
    args = get_model_args("qwen3", flavor)
    if args.vocab_size == -1:
        args.vocab_size = 2000
    with torch.device("meta"):
        model = Qwen3Transformer(args)
    return args, model


def hf_classes(moe: bool):
    if moe:
        return transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM
    return transformers.Qwen3Config, transformers.Qwen3ForCausalLM


def nparams(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- parameter counts ------------------------------------------------------------------


@pytest.mark.parametrize("flavor", sorted(PUBLISHED))
def test_published_parameter_counts(flavor):
    _, model = meta_model(flavor)
    assert nparams(model) == PUBLISHED[flavor]


@pytest.mark.parametrize("flavor", sorted(qwen3_configs))
def test_every_flavor_counts_like_transformers(flavor):
    """Our model and transformers' model built from our hf_config() on meta agree, so the
    flavors not in the issue (4B, 14B, the debug ones) are checked too."""
    args, model = meta_model(flavor)
    config_cls, model_cls = hf_classes(args.moe_enabled)
    with torch.device("meta"):
        hf = model_cls(config_cls(**Qwen3StateDictAdapter(args).hf_config()))
    assert nparams(model) == nparams(hf)


@pytest.mark.parametrize("flavor", sorted(qwen3_configs))
def test_tied_embeddings_where_published(flavor):
    args, model = meta_model(flavor)
    assert args.enable_weight_tying == (flavor in TIED)
    assert (model.output.weight is model.tok_embeddings.weight) == (flavor in TIED)
    assert args.model_shape().tied_embeddings == (flavor in TIED)


def test_moe_flavors():
    for flavor in ("30B-A3B", "30B-A3B-6L", "235B-A22B", "debugmodel_moe"):
        args = qwen3_configs[flavor]
        m = args.moe_args
        assert args.moe_enabled and m.score_func == "softmax" and m.route_norm and m.num_shared_experts == 0
    assert qwen3_configs["debugmodel_moe"].moe_args.num_experts == 8
    assert qwen3_configs["debugmodel_moe"].moe_args.top_k == 2
    big = qwen3_configs["30B-A3B"]
    assert (big.moe_args.num_experts, big.moe_args.top_k, big.moe_inter_dim) == (128, 8, 768)
    six = qwen3_configs["30B-A3B-6L"]
    assert six.n_layers == 6 and dataclass_equal_except(six, big, "n_layers")
    _, model = meta_model("debugmodel_moe")
    assert all(isinstance(b.moe, MoE) and not hasattr(b, "feed_forward") for b in model.layers.values())


def dataclass_equal_except(a, b, field: str) -> bool:
    a, b = copy.deepcopy(a), copy.deepcopy(b)
    setattr(a, field, getattr(b, field))
    return a == b


# ---- FLOPs and the planner's shape ----------------------------------------------------


def closed_form_flops(a: Qwen3ModelArgs, seq_len: int) -> int:
    """6 x the parameters a token's matmuls touch + the attention term, by hand."""
    attention = a.dim * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads)
    norms = 2 * a.dim + 2 * a.head_dim
    if a.moe_enabled:
        ffn = a.dim * a.moe_args.num_experts + 3 * a.dim * a.moe_inter_dim * a.moe_args.top_k
    else:
        ffn = 3 * a.dim * a.hidden_dim
    active = a.n_layers * (attention + norms + ffn) + a.dim + a.vocab_size * a.dim  # + norm, output
    return 6 * active + 12 * a.n_layers * a.n_heads * a.head_dim * seq_len


@pytest.mark.parametrize("flavor", ["30B-A3B", "235B-A22B", "debugmodel_moe", "0.6B", "8B"])
def test_flops_from_active_parameters(flavor):
    args, model = meta_model(flavor)
    n, flops = args.get_nparams_and_flops(model, 4096)
    assert n == nparams(model)
    assert flops == closed_form_flops(args, 4096)


def test_flops_30b_a3b_by_hand():
    """30B-A3B: 8 of 128 experts of 3 x 2048 x 768 per token, plus everything else."""
    args, model = meta_model("30B-A3B")
    per_layer = (
        2048 * 128 * (2 * 32 + 2 * 4)  # wq, wk, wv, wo
        + 2 * 2048 + 2 * 128  # attention_norm, ffn_norm, q_norm, k_norm
        + 2048 * 128  # router
        + 8 * 3 * 2048 * 768  # the 8 routed experts a token visits
    )
    active = 48 * per_layer + 2048 + 151936 * 2048
    # 3.04B; with the 0.31B embedding table 3.35B, the "3.3B activated" of the model card
    assert active == 3_041_867_776
    _, flops = args.get_nparams_and_flops(model, 4096)
    assert flops == 6 * active + 12 * 48 * 32 * 128 * 4096


def test_tied_embedding_counted_once_as_output_matmul():
    untied = tiny_args(enable_weight_tying=False)
    tied = tiny_args(enable_weight_tying=True)
    with torch.device("meta"):
        n_u, f_u = untied.get_nparams_and_flops(Qwen3Transformer(untied), 64)
        n_t, f_t = tied.get_nparams_and_flops(Qwen3Transformer(tied), 64)
    assert n_u - n_t == VOCAB * 64
    assert f_u == f_t == closed_form_flops(tied, 64)


def test_model_shape():
    shape = qwen3_configs["30B-A3B"].model_shape()
    assert (shape.dim, shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.head_dim) == (2048, 48, 32, 4, 128)
    assert (shape.n_moe_layers, shape.num_experts, shape.top_k, shape.moe_hidden, shape.shared_hidden) == (
        48, 128, 8, 768, 0,
    )
    assert shape.vocab == 151936 and shape.qk_norm and not shape.tied_embeddings
    dense = qwen3_configs["0.6B"].model_shape()
    assert dense.hidden == 3072 and dense.n_moe_layers == 0 and dense.num_experts == 0
    assert dense.tied_embeddings and dense.head_dim == 128


# ---- Hugging Face interop --------------------------------------------------------------


def tiny_args(moe: bool = False, **overrides) -> Qwen3ModelArgs:
    base = dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=96, vocab_size=VOCAB,
        max_seq_len=32,
    )
    if moe:
        base.update(
            moe_enabled=True,
            moe_args=MoEArgs(num_experts=8, top_k=2, score_func="softmax", route_norm=True),
            moe_inter_dim=32,
        )
    base.update(overrides)
    return Qwen3ModelArgs(**base)


def built(args: Qwen3ModelArgs, seed: int = 0) -> Qwen3Transformer:
    """A model with random weights, norms included (so their permutation is exercised)."""
    torch.manual_seed(seed)
    model = Qwen3Transformer(args)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def tokens(bs: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (bs, seq), generator=torch.Generator().manual_seed(seed))


CASES = [(False, False), (False, True), (True, False), (True, True)]
IDS = ["dense", "dense-tied", "moe", "moe-tied"]


@pytest.mark.parametrize("moe,tie", CASES, ids=IDS)
def test_logits_match_transformers(moe, tie):
    args = tiny_args(moe, enable_weight_tying=tie)
    ours = built(args)
    adapter = Qwen3StateDictAdapter(args)
    config_cls, model_cls = hf_classes(moe)
    hf = model_cls(config_cls(**adapter.hf_config())).eval()
    hf_state = adapter.to_hf(ours.state_dict(), fused_experts=True)  # transformers' in-memory layout
    assert ("lm_head.weight" in hf_state) == (not tie)
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if tie else [])
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("moe,tie", [(True, False), (False, True)], ids=["moe", "dense-tied"])
def test_checkpoint_files_load_in_transformers(moe, tie, tmp_path):
    """to_hf's per-expert tensors and hf_config() are what from_pretrained reads from disk
    (transformers fuses the experts itself when loading)."""
    from safetensors.torch import save_file

    args = tiny_args(moe, enable_weight_tying=tie)
    ours = built(args)
    adapter = Qwen3StateDictAdapter(args)
    on_disk = adapter.to_hf(ours.state_dict())
    if moe:
        assert "model.layers.0.mlp.experts.7.down_proj.weight" in on_disk
        assert on_disk["model.layers.0.mlp.experts.3.gate_proj.weight"].shape == (32, 64)
        assert not any("expert_bias" in k for k in on_disk)
    save_file(on_disk, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(adapter.hf_config()))
    _, model_cls = hf_classes(moe)
    hf = model_cls.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    x = tokens(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("moe,tie", CASES, ids=IDS)
def test_conversion_round_trips_exactly(moe, tie):
    args = tiny_args(moe, enable_weight_tying=tie)
    adapter = Qwen3StateDictAdapter(args)
    ours = built(args).state_dict()
    for fused in (False, True):
        back = adapter.from_hf(adapter.to_hf(ours, fused_experts=fused))
        assert set(back) == set(ours)
        assert all(torch.equal(back[k], ours[k]) for k in ours)
    # transformers -> ours -> transformers, from a model transformers initialised itself
    config_cls, model_cls = hf_classes(moe)
    torch.manual_seed(1)
    hf = model_cls(config_cls(**adapter.hf_config())).eval()
    hf_state = {k: v for k, v in hf.state_dict().items() if not (tie and k == "lm_head.weight")}
    converted = adapter.from_hf(hf_state)
    adapter.check(converted)
    again = adapter.to_hf(converted, fused_experts=True)
    assert set(again) == set(hf_state)
    assert all(torch.equal(again[k], hf_state[k]) for k in hf_state)
    model = Qwen3Transformer(args)
    model.load_state_dict(converted, strict=True)
    if tie:
        model.output.weight = model.tok_embeddings.weight
    x = tokens(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), hf(x).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("moe,tie", CASES, ids=IDS)
def test_conversion_key_by_key(moe, tie):
    """The checkpoint code converts one of our keys at a time (``to_hf({key: value})``) and
    reads back the Hugging Face tensors of one key at a time: the union is the whole."""
    args = tiny_args(moe, enable_weight_tying=tie)
    adapter = Qwen3StateDictAdapter(args)
    ours = built(args).state_dict()
    whole = adapter.to_hf(ours)
    groups = {key: adapter.to_hf({key: value}) for key, value in ours.items()}
    assert {k: v for g in groups.values() for k, v in g.items()}.keys() == whole.keys()
    back: dict[str, torch.Tensor] = {}
    derived: dict[str, torch.Tensor] = {}  # what a group implies for other keys (tied output)
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


def test_from_hf_tied_output_is_the_embedding():
    args = tiny_args(enable_weight_tying=True)
    adapter = Qwen3StateDictAdapter(args)
    converted = adapter.from_hf(adapter.to_hf(built(args).state_dict()))
    assert converted["output.weight"] is converted["tok_embeddings.weight"]
    untied = Qwen3StateDictAdapter(tiny_args())
    copied = untied.from_hf(adapter.to_hf(built(args).state_dict()))  # a tied file, untied model
    assert torch.equal(copied["output.weight"], copied["tok_embeddings.weight"])
    assert copied["output.weight"] is not copied["tok_embeddings.weight"]


def test_from_hf_rejects_incomplete_experts():
    args = tiny_args(moe=True)
    adapter = Qwen3StateDictAdapter(args)
    hf_state = adapter.to_hf(built(args).state_dict())
    del hf_state["model.layers.1.mlp.experts.5.up_proj.weight"]
    with pytest.raises(ValueError, match="layer 1 moe.experts.w3"):
        adapter.from_hf(hf_state)
    with pytest.raises(KeyError, match="no Qwen3 counterpart"):
        adapter.from_hf({"model.layers.0.mlp.shared_expert.up_proj.weight": torch.zeros(1)})


@pytest.mark.parametrize("flavor", ["0.6B", "8B", "30B-A3B", "235B-A22B"])
def test_args_from_hf_config_round_trip(flavor):
    args = get_model_args("qwen3", flavor)
    config = Qwen3StateDictAdapter(args).hf_config()
    assert Qwen3StateDictAdapter.args_from_hf_config(config) == args
    # the form transformers writes (rope theta inside rope_parameters, num_experts aliased)
    config_cls, _ = hf_classes(args.moe_enabled)
    written = config_cls(**config).to_dict()
    assert Qwen3StateDictAdapter.args_from_hf_config(written) == args


def test_hf_config_refuses_what_qwen3_cannot_express():
    with pytest.raises(ValueError, match="shared"):
        Qwen3StateDictAdapter(
            tiny_args(moe=True, moe_args=MoEArgs(num_experts=8, top_k=2, num_shared_experts=1))
        ).hf_config()
    with pytest.raises(ValueError, match="mixes dense and MoE"):
        Qwen3StateDictAdapter.args_from_hf_config(
            {**Qwen3StateDictAdapter(tiny_args(moe=True)).hf_config(), "mlp_only_layers": [0]}
        )


# ---- the model -------------------------------------------------------------------------


def test_module_names():
    names = set(built(tiny_args(moe=True)).state_dict())
    for key in (
        "tok_embeddings.weight", "norm.weight", "output.weight",
        "layers.1.attention.wq.weight", "layers.1.attention.q_norm.weight",
        "layers.1.attention.k_norm.weight", "layers.1.attention_norm.weight", "layers.1.ffn_norm.weight",
        "layers.1.moe.router.gate.weight", "layers.1.moe.experts.w1", "layers.1.moe.expert_bias",
    ):
        assert key in names
    dense = set(built(tiny_args()).state_dict())
    assert "layers.0.feed_forward.w2.weight" in dense and not any(".moe." in k for k in dense)


def test_causal_and_head_dim_independent_of_dim():
    model = built(tiny_args())  # head_dim 32, n_heads 4: 128 != dim 64
    assert model.layers["0"].attention.wq.weight.shape == (128, 64)
    x = tokens(1, 12)
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :8], model(y)[:, :8], rtol=0, atol=0)


def test_pipeline_stages_reproduce_whole_model():
    from torchtitan.distributed import pipeline as pp_lib

    model = built(tiny_args(moe=True, n_layers=4))
    pieces = ["tok_embeddings"] + [f"layers.{i}" for i in range(4)] + ["norm", "output"]
    first = pp_lib.prune_to_stage(copy.deepcopy(model), ["tok_embeddings", "layers.0", "layers.1"], pieces)
    last = pp_lib.prune_to_stage(copy.deepcopy(model), ["layers.2", "layers.3", "norm", "output"], pieces)
    assert first.output is None and last.tok_embeddings is None and list(last.layers) == ["2", "3"]
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(last(first(x)), model(x), rtol=0, atol=0)
    first.init_weights()  # a stage initialises what it holds
    last.init_weights()
    assert torch.isfinite(last(first(x))).all()


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_equals_plain_loss(tie):
    from torchtitan.components.chunked_loss import apply_chunked_loss, labels_for_loss

    model = built(tiny_args(moe=True, enable_weight_tying=tie)).train()
    x, labels = tokens(seed=3), tokens(seed=4)
    plain = F.cross_entropy(model(x).flatten(0, 1).float(), labels.flatten())
    (grad_plain,) = torch.autograd.grad(plain, model.tok_embeddings.weight)
    apply_chunked_loss(model, chunk_size=5)
    with labels_for_loss(model, labels):
        chunked = model(x)
    (grad_chunked,) = torch.autograd.grad(chunked, model.tok_embeddings.weight)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_chunked, grad_plain, rtol=1e-5, atol=1e-7)


# ---- initialisation --------------------------------------------------------------------


@pytest.mark.parametrize("moe", [False, True])
def test_init_is_deterministic_and_materialises_from_meta(moe):
    args = tiny_args(moe, enable_weight_tying=True)
    with torch.device("meta"):
        a, b = Qwen3Transformer(args), Qwen3Transformer(args)
    for model, seed in ((a, 0), (b, 0)):
        model.to_empty(device="cpu")
        torch.manual_seed(seed)
        model.init_weights()
    assert a.output.weight is a.tok_embeddings.weight  # the tie to_empty broke is restored
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.manual_seed(1)
    b.init_weights()
    assert not torch.equal(a.layers["0"].attention.wq.weight, b.layers["0"].attention.wq.weight)
    if moe:
        assert torch.equal(a.layers["1"].moe.expert_bias, torch.zeros(8))
    assert torch.equal(a.layers["1"].attention.q_norm.weight, torch.ones(32))


def test_init_weights_statistics():
    args = Qwen3ModelArgs(
        dim=256, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=512, vocab_size=1024,
        max_seq_len=64, enable_weight_tying=True, moe_enabled=True,
        moe_args=MoEArgs(num_experts=16, top_k=2), moe_inter_dim=256,
    )
    with torch.device("meta"):
        model = Qwen3Transformer(args)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()

    def assert_std(t: torch.Tensor, expected: float) -> None:
        assert abs(t.float().std().item() - expected) / expected < 0.05, (t.std().item(), expected)

    # tied: drawn once with the output layer's truncated init
    out_std = 256**-0.5
    assert model.output.weight.abs().max() <= 3 * out_std + 1e-6
    assert_std(model.tok_embeddings.weight, out_std * 0.986)  # N(0, s) truncated at 3s
    for layer_id, layer in model.layers.items():
        scaled = 0.02 / math.sqrt(2 * (int(layer_id) + 1))
        assert_std(layer.attention.wq.weight, 0.02)
        assert_std(layer.attention.wo.weight, scaled)
        assert_std(layer.moe.experts.w2, scaled)
        assert_std(layer.moe.experts.w1, 0.02)
    assert model.freqs_cis.shape == (64, 32)


def test_init_weights_buffer_device():
    with torch.device("meta"):
        model = Qwen3Transformer(tiny_args(moe=True))
    model.to_empty(device="cpu")
    model.init_weights(buffer_device="meta")
    assert model.freqs_cis.is_meta and model.layers["0"].moe.expert_bias.is_meta
    assert not model.output.weight.is_meta


# ---- args, registry --------------------------------------------------------------------


def test_update_from_config():
    job = JobConfig()
    job.training.seq_len = 512
    job.model.attention_backend = "math"
    args = get_model_args("qwen3", "debugmodel_moe")
    args.update_from_config(job, SimpleNamespace(vocab_size=2256))
    assert (args.vocab_size, args.max_seq_len, args.attn_backend) == (2256, 512, "math")
    real = get_model_args("qwen3", "8B")
    real.update_from_config(job, SimpleNamespace(vocab_size=151643))
    assert real.vocab_size == 151936
    with pytest.raises(ValueError, match="model.flavor"):
        real.update_from_config(job, SimpleNamespace(vocab_size=200000))
    with pytest.raises(ValueError, match="model.tokenizer_path"):
        get_model_args("qwen3", "debugmodel").update_from_config(job, None)
    job.parallelism.pipeline_parallel_degree = 2
    real.update_from_config(job, None)  # untied: fine
    with pytest.raises(ConfigError, match="pipeline_parallel_degree 2.*ties"):
        get_model_args("qwen3", "0.6B").update_from_config(job, None)


@pytest.mark.parametrize("option", ["pipeline_parallel_degree", "tensor_parallel_degree"])
def test_validate_refuses_splitting_a_tied_embedding(option):
    spec = get_model_spec("qwen3")
    job = JobConfig()
    setattr(job.parallelism, option, 2)
    spec.validate_fn(job, get_model_args("qwen3", "8B"))  # untied: fine
    with pytest.raises(ConfigError, match=f"parallelism.{option} 2: .*ties the output"):
        spec.validate_fn(job, get_model_args("qwen3", "1.7B"))


def test_registry():
    spec = get_model_spec("qwen3")
    assert spec.model_cls is Qwen3Transformer and spec.state_dict_adapter is Qwen3StateDictAdapter
    assert set(PUBLISHED) | {"debugmodel", "debugmodel_moe"} <= set(spec.flavors)
    assert spec.validate_fn is not None and spec.build_step_hooks_fn is not None and spec.metrics_fn
    job = JobConfig()
    job.parallelism.expert_parallel_degree = 3
    with pytest.raises(ConfigError, match="expert_parallel_degree 3"):
        spec.validate_fn(job, get_model_args("qwen3", "debugmodel_moe"))
    with pytest.raises(ConfigError, match="dense"):
        spec.validate_fn(job, get_model_args("qwen3", "debugmodel"))
    model = built(tiny_args(moe=True))
    model(tokens())
    (hook,) = spec.build_step_hooks_fn([model], None)
    assert "moe/imbalance" in spec.metrics_fn([model])
    hook()
    assert float(model.layers["0"].moe.tokens_per_expert.sum()) == 0
    assert float(model.layers["0"].moe.expert_bias.abs().sum()) > 0


# ---- scripts/generate.py ------------------------------------------------------------------


def test_generate_script_selects_the_family(tmp_path, capsys):
    from pathlib import Path

    from torchtitan.components.checkpoint.storage import write_model_state
    from torchtitan.components.tokenizer import build_tokenizer

    repo = Path(__file__).resolve().parents[2]
    tokenizer_path = str(repo / "tests/assets/test_tiktoken.model")
    tokenizer = build_tokenizer(tokenizer_path)
    args = get_model_args("qwen3", "debugmodel_moe")
    args.vocab_size, args.max_seq_len = tokenizer.vocab_size, 64
    model = built(args)
    write_model_state(model.state_dict(), str(tmp_path / "ckpt"))
    from torchtitan import generate  # scripts/generate.py's logic
    prompt = "The quick brown fox"
    text = generate.main(
        ["--model.name", "qwen3", "--flavor", "debugmodel_moe", "--checkpoint", str(tmp_path / "ckpt"),
         "--tokenizer", tokenizer_path, "--prompt", prompt, "--max-new-tokens", "4", "--temperature", "0"]
    )
    ids = tokenizer.encode(prompt, bos=True, eos=False)
    expected: list[int] = []
    for _ in range(4):  # greedy by hand
        with torch.no_grad():
            next_id = int(model(torch.tensor([ids + expected]))[0, -1].argmax())
        expected.append(next_id)
        if next_id == tokenizer.eos_id:
            break
    assert text == tokenizer.decode(expected)
    assert capsys.readouterr().out.startswith(prompt)
    with pytest.raises(SystemExit, match="flavor"):  # the llama3 default does not fit it
        generate.main(["--flavor", "debugmodel_moe", "--checkpoint", str(tmp_path / "ckpt"),
                       "--tokenizer", tokenizer_path, "--max-new-tokens", "1"])


# ---- the trainer ----------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["debugmodel_moe", "tied"])
def test_trainer_trains_debugmodel_moe_from_its_toml(tmp_path, monkeypatch, tied):
    """train_configs/qwen3_debug_moe.toml through the real Trainer (one CPU process): the
    loss falls and the expert bias moves; a tied variant stays tied (one parameter)."""
    from small_trainer import train_debug_toml

    if tied:
        flavor = copy.deepcopy(qwen3_configs["debugmodel_moe"])
        flavor.enable_weight_tying = True
        monkeypatch.setitem(qwen3_configs, "debugmodel_moe", flavor)
    trainer, losses = train_debug_toml(tmp_path, "qwen3_debug_moe.toml")
    assert (trainer.job_config.model.name, trainer.job_config.model.flavor) == ("qwen3", "debugmodel_moe")
    assert losses[-1] < losses[0] - 0.5, losses
    model = trainer.model_parts[0]
    assert float(model.layers["0"].moe.expert_bias.abs().sum()) > 0
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    assert len(trainer.params) == len({id(p) for p in trainer.params})
