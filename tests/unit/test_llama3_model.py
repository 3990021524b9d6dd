"""Llama 3 model and model registry."""

import copy
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from torchtitan.models import get_model_args, get_model_spec, lazy_function
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.common.rope import precompute_freqs_cis
from torchtitan.models.llama3 import Transformer, TransformerModelArgs, llama3_configs

VOCAB = 512


def tiny_args(**overrides) -> TransformerModelArgs:
    base = dict(dim=64, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=32)
    base.update(overrides)
    return TransformerModelArgs(**base)


def build(args: TransformerModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    return model


def tokens(bs: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (bs, seq), generator=torch.Generator().manual_seed(seed))


# ---- parameter counts and flops -------------------------------------------------------

# Published SwiGLU hidden sizes (intermediate_size of the released checkpoints).
PUBLISHED_FFN = {"1B": 8192, "3B": 8192, "8B": 14336, "70B": 28672, "405B": 53248}


def closed_form_nparams(a: TransformerModelArgs, ffn: int) -> int:
    head_dim = a.dim // a.n_heads
    kv = a.n_kv_heads or a.n_heads
    attention = 2 * a.dim * a.n_heads * head_dim + 2 * a.dim * kv * head_dim
    per_layer = attention + 3 * a.dim * ffn + 2 * a.dim
    return 2 * a.vocab_size * a.dim + a.n_layers * per_layer + a.dim


def meta_model(flavor: str) -> tuple[TransformerModelArgs, Transformer]:
    args = get_model_args("llama3", flavor)
    if args.vocab_size == -1:
        args.vocab_size = 2000
    with torch.device("meta"):
        model = Transformer(args)
    return args, model


@pytest.mark.parametrize(
    "flavor,published",
    [("8B", 8.03e9), ("70B", 70.6e9), ("405B", 405.9e9), ("1B", None), ("3B", None)],
)
def test_parameter_counts_on_meta(flavor, published):
    args, model = meta_model(flavor)
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    nparams, _ = args.get_nparams_and_flops(model, seq_len=8192)
    assert nparams == closed_form_nparams(args, PUBLISHED_FFN[flavor])
    if published is not None:
        assert abs(nparams - published) / published < 0.005
    assert model.layers["0"].feed_forward.w1.out_features == PUBLISHED_FFN[flavor]


def test_untied_small_flavors_counts():
    # The released 1B/3B tie output to the embedding (1.24B / 3.21B); ours are untied.
    for flavor in ("1B", "3B"):
        args, model = meta_model(flavor)
        expected = closed_form_nparams(args, PUBLISHED_FFN[flavor])
        assert args.get_nparams_and_flops(model, 2048)[0] == expected
        tied = expected - args.vocab_size * args.dim
        assert abs(tied - {"1B": 1.236e9, "3B": 3.213e9}[flavor]) < 0.005e9


def test_debugmodel_flops_by_hand():
    args = get_model_args("llama3", "debugmodel")
    args.vocab_size = 2000
    model = Transformer(args)
    seq_len = 2048
    d, layers, heads, kv_heads, head_dim = 256, 6, 16, 8, 16
    hidden = 768  # int(8 * 256 / 3) = 682, rounded up to a multiple of 256
    linear_weights = layers * (
        d * heads * head_dim * 2 + d * kv_heads * head_dim * 2 + 3 * d * hidden
    ) + d * 2000
    norm_weights = layers * 2 * d + d
    # fwd+bwd = 3 x forward; forward = 2 flops per multiply-add of each weight, plus
    # scores q.k and weighted sum over seq_len keys: 2 * 2 * heads * head_dim * seq per layer.
    expected_flops = 6 * (linear_weights + norm_weights) + 3 * 2 * 2 * layers * heads * head_dim * seq_len
    nparams, flops = args.get_nparams_and_flops(model, seq_len)
    assert nparams == linear_weights + norm_weights + 2000 * d
    assert flops == expected_flops


# ---- forward behaviour -----------------------------------------------------------------


def test_module_names_and_state_dict():
    model = build(tiny_args(n_layers=1))
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for name in ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                 "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm"]:
        expected.add(f"layers.0.{name}.weight")
    assert set(model.state_dict()) == expected
    assert "freqs_cis" in dict(model.named_buffers())
    assert isinstance(model.norm, torch.nn.RMSNorm)


def test_forward_shapes_and_dtype():
    model = build(tiny_args())
    logits = model(tokens(3, 20))
    assert logits.shape == (3, 20, VOCAB) and logits.dtype == torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model_bf16 = build(tiny_args())
    finally:
        torch.set_default_dtype(previous)
    assert model_bf16.freqs_cis.dtype == torch.complex64
    assert model_bf16(tokens(3, 20)).dtype == torch.bfloat16
    logits.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_causal():
    model = build(tiny_args())
    x = tokens(1, 16)
    t = 7
    y = x.clone()
    y[0, t + 1] = (x[0, t + 1] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])


def test_sequence_longer_than_max_seq_len_rejected():
    model = build(tiny_args(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 9))


def manual_attention(attn, x: torch.Tensor, freqs_cis: torch.Tensor, n_heads: int, n_kv: int):
    """Float64 attention with kv repeated explicitly and an explicit causal mask."""
    bs, seq, _ = x.shape
    hd = attn.head_dim
    xd = x.double()
    q = (xd @ attn.wq.weight.double().T).view(bs, seq, n_heads, hd)
    k = (xd @ attn.wk.weight.double().T).view(bs, seq, n_kv, hd)
    v = (xd @ attn.wv.weight.double().T).view(bs, seq, n_kv, hd)
    rot = freqs_cis[:seq].to(torch.complex128)[None, :, None, :]
    q = torch.view_as_real(torch.view_as_complex(q.reshape(bs, seq, n_heads, -1, 2)) * rot).flatten(3)
    k = torch.view_as_real(torch.view_as_complex(k.reshape(bs, seq, n_kv, -1, 2)) * rot).flatten(3)
    k = k.repeat_interleave(n_heads // n_kv, dim=2)
    v = v.repeat_interleave(n_heads // n_kv, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(hd)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    out = torch.einsum("bhst,bthd->bshd", probs, v).reshape(bs, seq, -1)
    return out @ attn.wo.weight.double().T


def manual_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def test_whole_model_matches_float64_reference():
    args = tiny_args()
    model = build(args)
    with torch.no_grad():  # norm weights other than ones, so their use is checked
        for module in model.modules():
            if isinstance(module, torch.nn.RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    x = tokens(2, 12)
    h = model.tok_embeddings.weight.double()[x]
    for layer in model.layers.values():
        n = manual_rmsnorm(h, layer.attention_norm.weight, args.norm_eps)
        h = h + manual_attention(layer.attention, n.float(), model.freqs_cis, args.n_heads, args.n_kv_heads)
        n = manual_rmsnorm(h, layer.ffn_norm.weight, args.norm_eps)
        ff = layer.feed_forward
        gate = F.silu(n @ ff.w1.weight.double().T) * (n @ ff.w3.weight.double().T)
        h = h + gate @ ff.w2.weight.double().T
    expected = manual_rmsnorm(h, model.norm.weight, args.norm_eps) @ model.output.weight.double().T
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_kv_heads", [2, 8])
def test_gqa_attention_matches_explicit_repeat(n_kv_heads):
    args = tiny_args(n_kv_heads=n_kv_heads)
    model = build(args)
    attn = model.layers["1"].attention
    x = torch.randn(2, 16, args.dim, generator=torch.Generator().manual_seed(3))
    got = attn(x, model.freqs_cis)
    expected = manual_attention(attn, x, model.freqs_cis, args.n_heads, n_kv_heads)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_attention_with_tensor_parallel_local_heads():
    # Column-wise sharding of wq/wk/wv over 2 ranks: each rank holds half the heads;
    # the unmodified module must compute those heads' outputs.
    args = tiny_args(n_heads=8, n_kv_heads=2)
    model = build(args)
    attn = model.layers["0"].attention
    x = torch.randn(1, 12, args.dim, generator=torch.Generator().manual_seed(4))
    full = attn(x, model.freqs_cis)
    hd = attn.head_dim
    shard = copy.deepcopy(attn)
    partial = torch.zeros_like(full)
    for rank in range(2):
        q_rows = slice(rank * 4 * hd, (rank + 1) * 4 * hd)
        kv_rows = slice(rank * hd, (rank + 1) * hd)
        shard.wq = torch.nn.Linear(args.dim, 4 * hd, bias=False)
        shard.wk = torch.nn.Linear(args.dim, hd, bias=False)
        shard.wv = torch.nn.Linear(args.dim, hd, bias=False)
        shard.wo = torch.nn.Linear(4 * hd, args.dim, bias=False)
        with torch.no_grad():
            shard.wq.weight.copy_(attn.wq.weight[q_rows])
            shard.wk.weight.copy_(attn.wk.weight[kv_rows])
            shard.wv.weight.copy_(attn.wv.weight[kv_rows])
            shard.wo.weight.copy_(attn.wo.weight[:, q_rows])
        partial += shard(x, model.freqs_cis)  # row-wise wo: partial sums over ranks
    torch.testing.assert_close(partial, full, rtol=1e-5, atol=1e-5)


def test_sdpa_module_native_and_repeat_paths_agree():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 8, 10, 16, generator=gen)
    k = torch.randn(2, 2, 10, 16, generator=gen)
    v = torch.randn(2, 2, 10, 16, generator=gen)
    got = ScaledDotProductAttention()(q, k, v)
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True
    )
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="multiple"):
        ScaledDotProductAttention()(q, k[:, :1].expand(2, 3, 10, 16), v[:, :1].expand(2, 3, 10, 16))


@pytest.mark.gpu
def test_sdpa_native_gqa_on_cuda_matches_repeat():
    gen = torch.Generator(device="cuda").manual_seed(6)
    shape = dict(device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(2, 32, 256, 64, **shape)
    k, v = torch.randn(2, 8, 256, 64, **shape), torch.randn(2, 8, 256, 64, **shape)
    native = ScaledDotProductAttention(native_gqa=True)(q, k, v)
    repeated = ScaledDotProductAttention(native_gqa=False)(q, k, v)
    torch.testing.assert_close(native, repeated, rtol=2e-2, atol=2e-2)


def test_pipeline_split_reproduces_whole_model():
    model = build(tiny_args())
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    first.norm, first.output = None, None
    for key in ["2", "3"]:
        del first.layers[key]
    last.tok_embeddings = None
    for key in ["0", "1"]:
        del last.layers[key]
    x = tokens(2, 16)
    with torch.no_grad():
        hidden = first(x)
        assert hidden.shape == (2, 16, 64)
        torch.testing.assert_close(last(hidden), model(x), rtol=0, atol=0)
    # A stage initialises what it holds.
    first.init_weights()
    last.init_weights()
    assert torch.isfinite(last(first(x))).all()


# ---- initialisation --------------------------------------------------------------------


def truncated_std(std: float, cutoff_in_std: float) -> float:
    c = cutoff_in_std
    pdf = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(c / math.sqrt(2))
    return std * math.sqrt(1 - 2 * c * pdf / mass)


@pytest.mark.parametrize("depth_init", [True, False])
def test_init_weights_statistics(depth_init):
    args = TransformerModelArgs(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=1024, max_seq_len=64,
        depth_init=depth_init,
    )
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()

    def assert_std(t: torch.Tensor, expected: float) -> None:
        assert abs(t.float().std().item() - expected) / expected < 0.03, (t.std().item(), expected)

    out_std = 256**-0.5
    assert_std(model.output.weight, truncated_std(out_std, 3.0))
    assert model.output.weight.abs().max() <= 3 * out_std + 1e-6
    assert_std(model.tok_embeddings.weight, 1.0)
    for layer_id, layer in model.layers.items():
        depth = int(layer_id) + 1 if depth_init else 4
        scaled = 0.02 / math.sqrt(2 * depth)
        assert_std(layer.attention.wo.weight, scaled)
        assert_std(layer.feed_forward.w2.weight, scaled)
        assert_std(layer.feed_forward.w3.weight, scaled)
        assert_std(layer.attention.wq.weight, 0.02)
        assert_std(layer.feed_forward.w1.weight, 0.02)
        assert torch.equal(layer.attention_norm.weight, torch.ones(256))
        assert torch.equal(layer.ffn_norm.weight, torch.ones(256))
    assert torch.equal(model.norm.weight, torch.ones(256))
    assert torch.equal(model.freqs_cis, precompute_freqs_cis(32, 64, 500000.0, args.rope_scaling))


def test_init_weights_buffer_device():
    with torch.device("meta"):
        model = Transformer(tiny_args())
    model.to_empty(device="cpu")
    model.init_weights(buffer_device="meta")
    assert model.freqs_cis.is_meta and not model.output.weight.is_meta


# ---- args and registry -----------------------------------------------------------------


def job_config(seq_len: int, attention_backend: str = "auto"):
    return SimpleNamespace(
        training=SimpleNamespace(seq_len=seq_len),
        model=SimpleNamespace(attention_backend=attention_backend),
    )


def test_update_from_config():
    args = get_model_args("llama3", "debugmodel")
    args.update_from_config(job_config(512), SimpleNamespace(vocab_size=2256))
    assert args.vocab_size == 2256 and args.max_seq_len == 512
    real = get_model_args("llama3", "8B")
    real.update_from_config(job_config(8192), SimpleNamespace(vocab_size=128000))
    assert real.vocab_size == 128256 and real.max_seq_len == 8192
    real.update_from_config(job_config(8192, "math"), None)
    assert real.attn_backend == "math"
    with pytest.raises(ValueError, match="model.flavor.*model.tokenizer_path"):
        real.update_from_config(job_config(8192), SimpleNamespace(vocab_size=200000))
    with pytest.raises(ValueError, match="model.tokenizer_path"):
        get_model_args("llama3", "debugmodel").update_from_config(job_config(8), None)


def test_bad_args_rejected():
    with pytest.raises(ValueError, match="n_kv_heads"):
        TransformerModelArgs(dim=64, n_heads=8, n_kv_heads=3)
    with pytest.raises(ValueError, match="n_heads"):
        TransformerModelArgs(dim=60, n_heads=8)
    with pytest.raises(ValueError, match="update_from_config"):
        Transformer(get_model_args("llama3", "debugmodel"))


def test_registry():
    spec = get_model_spec("llama3")
    assert spec.model_cls is Transformer and spec.flavors is llama3_configs
    # other tests may register extra (test) flavors in this process, as users can
    assert {"debugmodel", "1B", "3B", "8B", "70B", "405B"} <= set(spec.flavors)
    with pytest.raises(ValueError, match="model.name 'nope'.*llama3"):
        get_model_spec("nope")
    with pytest.raises(ValueError, match="model.flavor '9B'.*debugmodel, 1B"):
        get_model_args("llama3", "9B")
    args = get_model_args("llama3", "8B")
    args.vocab_size = 7
    args.rope_scaling.factor = 2.0
    assert llama3_configs["8B"].vocab_size == 128256
    assert llama3_configs["8B"].rope_scaling.factor == 8.0


def test_lazy_function():
    sqrt = lazy_function("math:sqrt")
    assert sqrt(16.0) == 4.0 and sqrt.__name__ == "sqrt"
    with pytest.raises(ValueError, match="package.module:function"):
        lazy_function("math.sqrt")
    # Importing the registry must not import the parallelization code.
    code = (
        "import sys, torchtitan.models as m; m.get_model_spec('llama3'); "
        "print(sorted(k for k in sys.modules if k.startswith('torchtitan.models.llama3.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "parallelize" not in out.stdout and "pipeline" not in out.stdout
    assert "torchtitan.models.llama3.model" in out.stdout


@pytest.mark.parametrize("backend", ["auto", "math", "flash"])
def test_attention_backend_option_gives_the_same_output(backend):
    """A forced backend changes only the kernel: each equals causal GQA attention written
    out in fp64 (an independent reference: "auto" and "flash" run the same CPU kernel)."""
    from torchtitan.models.common.attention import ScaledDotProductAttention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 16, 8, generator=g) for h in (4, 2, 2))
    kd, vd = (t.double().repeat_interleave(2, dim=1) for t in (k, v))  # 2 query heads per kv head
    scores = q.double() @ kd.transpose(-1, -2) / 8**0.5
    scores = scores.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.softmax(scores, dim=-1) @ vd
    out = ScaledDotProductAttention(backend=backend)(q, k, v)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert f"backend={backend}" in repr(ScaledDotProductAttention(backend=backend))


def test_attention_backend_rejects_unknown_name():
    from torchtitan.models.common.attention import ScaledDotProductAttention

    with pytest.raises(ValueError, match="attention backend 'fast'"):
        ScaledDotProductAttention(backend="fast")
