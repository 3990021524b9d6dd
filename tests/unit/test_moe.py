"""The MoE layer: routing, dropless dispatch, grouped GEMM, load balancing, aux loss, HF parity."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from torchtitan.config import ConfigError
from torchtitan.models.common import moe as moe_mod
from torchtitan.models.common.moe import MoE, MoEArgs, sequence_aux_loss
from torchtitan.models.common.moe_balance import (
    build_moe_step_hooks,
    moe_metrics,
    update_expert_bias,
    validate_moe_config,
)

DIM, HIDDEN = 16, 32


def build(seed: int = 0, std: float = 0.3, **kw) -> MoE:
    args = MoEArgs(**{"num_experts": 4, "top_k": 2, **kw})
    torch.manual_seed(seed)
    moe = MoE(args, DIM, HIDDEN)
    moe.init_weights(std)
    with torch.no_grad():  # larger weights than a real init, so differences show
        for p in moe.parameters():
            p.normal_(0, std)
    return moe


def swiglu(x, w1, w2, w3):
    return (F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()


def dense_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: score, choose k experts, add their weighted outputs (and shared)."""
    a = moe.moe_args
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        xt = flat[t]
        logits = moe.router.gate.weight @ xt
        scores = logits.softmax(-1) if a.score_func == "softmax" else logits.sigmoid()
        chosen = torch.topk(scores + moe.expert_bias, a.top_k).indices
        w = scores[chosen]
        if a.route_norm:
            w = w / w.sum()
        w = w * a.route_scale
        acc = torch.zeros_like(xt)
        for j, e in enumerate(chosen.tolist()):
            acc = acc + w[j] * swiglu(xt, moe.experts.w1[e], moe.experts.w2[e], moe.experts.w3[e])
        if moe.shared_experts is not None:
            s = moe.shared_experts
            acc = acc + swiglu(xt, s.w1.weight, s.w2.weight, s.w3.weight)
        out[t] = acc
    return out.view_as(x)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(top_k=3, route_norm=True, route_scale=2.5, num_shared_experts=2),
        dict(score_func="sigmoid", route_norm=True, top_k=2),
        dict(top_k=1, use_grouped_mm=False),
    ],
)
def test_dropless_matches_dense_per_token_reference(kw):
    moe = build(**kw)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    x = torch.randn(3, 5, DIM)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense_reference(moe, x), rtol=1e-5, atol=1e-6)
    # Every token copy counted once: T * k routed copies.
    assert moe.tokens_per_expert.sum().item() == 15 * moe.top_k


def test_each_token_combined_exactly_once():
    """With identity-like experts the output is sum of weights times x: exactly k copies."""
    moe = build(top_k=2, route_norm=True)
    x = torch.randn(2, 7, DIM)
    # Replace the experts by a function we can predict: each expert returns its input.
    moe.experts.forward = lambda rows, counts: rows  # type: ignore[method-assign]
    with torch.no_grad():
        out = moe(x)
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)  # weights sum to 1 per token


def test_grouped_mm_equals_loop_forward_and_backward():
    x = torch.randn(4, 6, DIM)
    outs, grads = [], []
    for use in (True, False):
        moe = build(seed=1, use_grouped_mm=use, num_shared_experts=1)
        xi = x.clone().requires_grad_()
        out = moe(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in moe.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grouped_mm_padded_groups(monkeypatch):
    """The CUDA path pads each expert's rows to an aligned offset; run it on CPU too."""
    x = torch.randn(3, 7, DIM)
    ref = build(seed=2, use_grouped_mm=False)
    monkeypatch.setattr(moe_mod, "_group_alignment", lambda t: 8)
    padded = build(seed=2, use_grouped_mm=True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    oa, ob = ref(xa), padded(xb)
    torch.testing.assert_close(oa, ob, rtol=1e-5, atol=1e-6)
    oa.pow(2).sum().backward()
    ob.pow(2).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref.experts.w1.grad, padded.experts.w1.grad, rtol=1e-5, atol=1e-6)


def test_bias_changes_selection_not_weights():
    moe = build(top_k=1)
    x = torch.randn(1, 9, DIM).reshape(-1, DIM)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
        weights, experts, scores = moe.router(x, moe.expert_bias)
    assert (experts == 3).all()
    torch.testing.assert_close(weights[:, 0], scores[:, 3])  # the unbiased score
    assert (weights < 1).all()


def test_route_norm_and_scale():
    moe = build(top_k=3, route_norm=True, route_scale=1.7)
    x = torch.randn(11, DIM)
    with torch.no_grad():
        weights, _, _ = moe.router(x, moe.expert_bias)
    torch.testing.assert_close(weights.sum(-1), torch.full((11,), 1.7))
    plain = build(top_k=3)
    with torch.no_grad():
        w2, _, scores = plain.router(x, plain.expert_bias)
    torch.testing.assert_close(w2, torch.topk(scores, 3).values)


def test_bias_update_rule_and_accumulation():
    moe = build(num_experts=4, load_balance_coeff=0.01)
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleDict({"0": torch.nn.ModuleDict({"moe": moe})})})
    hooks = build_moe_step_hooks([model], None)
    assert len(hooks) == 1
    x1, x2 = torch.randn(2, 5, DIM), torch.randn(2, 5, DIM)
    with torch.no_grad():
        moe(x1)
        moe(x2)  # two micro-batches: the counts add up
    load = moe.tokens_per_expert.clone()
    assert load.sum().item() == 2 * 10 * 2
    hooks[0]()
    metrics = moe_metrics([model])  # after the step, as the trainer logs
    assert set(metrics) >= {"moe/imbalance", "moe/imbalance_max", "moe/max_load", "moe/min_load"}
    assert metrics["moe/worst_layer"] == 0.0
    torch.testing.assert_close(torch.tensor(metrics["moe/imbalance"]), load.max() / load.mean())
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(moe.expert_bias, expected)
    assert (moe.tokens_per_expert == 0).all()
    # No balancing: the bias stays put and selection ignores it.
    off = build(load_balance_coeff=None)
    with torch.no_grad():
        off(x1)
    build_moe_step_hooks([off], None)[0]()
    assert (off.expert_bias == 0).all()
    assert build_moe_step_hooks([torch.nn.Linear(2, 2)], None) == []


def test_activation_checkpoint_recompute_scales_counts_not_the_update():
    """A recompute counts a layer's tokens again: every expert's count doubles, so the
    bias update (a sign) and the load fractions equal those of a run without AC."""
    plain, ckpt = build(seed=5), build(seed=5)
    x = torch.randn(2, 4, DIM, requires_grad=True)
    plain(x).pow(2).sum().backward()
    out = torch.utils.checkpoint.checkpoint(ckpt, x, use_reentrant=False)
    out.pow(2).sum().backward()
    assert plain.tokens_per_expert.sum().item() == 8 * plain.top_k
    torch.testing.assert_close(ckpt.tokens_per_expert, 2 * plain.tokens_per_expert)
    update_expert_bias(plain, plain.tokens_per_expert)
    update_expert_bias(ckpt, ckpt.tokens_per_expert)
    torch.testing.assert_close(ckpt.expert_bias, plain.expert_bias)
    assert plain.expert_bias.abs().sum() > 0  # the update did move the bias


def test_aux_loss_gradient():
    x = torch.randn(3, 6, DIM)
    alpha = 0.37
    with_aux = build(seed=3, aux_loss_alpha=alpha, score_func="sigmoid", top_k=2)
    plain = build(seed=3, aux_loss_alpha=0.0, score_func="sigmoid", top_k=2)
    g = torch.randn(3, 6, DIM)
    out = with_aux(x)
    (out * g).sum().backward()
    # Reference: the main term plus alpha * aux, differentiated explicitly.
    out2 = plain(x)
    flat = x.reshape(-1, DIM)
    _, top, scores = plain.router(flat, plain.expert_bias)
    aux = alpha * sequence_aux_loss(scores, top, 3, 2, 4)
    ((out2 * g).sum() + aux).backward()
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(with_aux.router.gate.weight.grad, plain.router.gate.weight.grad)
    assert with_aux.last_aux_loss is not None
    torch.testing.assert_close(with_aux.last_aux_loss, aux.detach())
    # The aux term's gradient is not zero (otherwise the test proves nothing).
    bare = build(seed=3, score_func="sigmoid", top_k=2)
    (bare(x) * g).sum().backward()
    assert not torch.allclose(bare.router.gate.weight.grad, plain.router.gate.weight.grad)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_transformers_qwen3_moe_block(norm_topk_prob):
    modeling = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        hidden_size=DIM,
        moe_intermediate_size=HIDDEN,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=norm_topk_prob,
        hidden_act="silu",
    )
    torch.manual_seed(0)
    hf = modeling.Qwen3MoeSparseMoeBlock(cfg).float()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    ours = MoE(MoEArgs(num_experts=8, top_k=3, route_norm=norm_topk_prob), DIM, HIDDEN)
    ours.init_weights(0.02)
    with torch.no_grad():
        ours.router.gate.weight.copy_(hf.gate.weight)
        ours.experts.w1.copy_(hf.experts.gate_up_proj[:, :HIDDEN])
        ours.experts.w3.copy_(hf.experts.gate_up_proj[:, HIDDEN:])
        ours.experts.w2.copy_(hf.experts.down_proj)
    x = torch.randn(2, 9, DIM)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("biased", [False, True])
def test_group_limited_routing_matches_transformers_deepseek_v3_moe(biased):
    """V3's routing: sigmoid, groups scored by their two best experts (bias included), the
    best groups only, renormalised and scaled weights; one shared expert. Experts are drawn
    so that the group limit changes the choice of some tokens (checked), i.e. it is exercised."""
    modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    experts, groups, limited, k = 16, 4, 2, 3
    cfg = DeepseekV3Config(
        hidden_size=DIM, moe_intermediate_size=HIDDEN, n_routed_experts=experts, num_experts_per_tok=k,
        n_group=groups, topk_group=limited, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    )
    torch.manual_seed(0)
    hf = modeling.DeepseekV3MoE(cfg).float()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
        if biased:
            hf.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    args = dict(num_experts=experts, top_k=k, score_func="sigmoid", route_norm=True, route_scale=2.5,
                num_shared_experts=1)
    ours = MoE(MoEArgs(**args, num_expert_groups=groups, num_limited_groups=limited), DIM, HIDDEN)
    ungrouped = MoE(MoEArgs(**args), DIM, HIDDEN)
    for moe in (ours, ungrouped):
        moe.init_weights(0.02)
        with torch.no_grad():
            moe.router.gate.weight.copy_(hf.gate.weight)
            moe.expert_bias.copy_(hf.gate.e_score_correction_bias)
            moe.experts.w1.copy_(hf.experts.gate_up_proj[:, :HIDDEN])
            moe.experts.w3.copy_(hf.experts.gate_up_proj[:, HIDDEN:])
            moe.experts.w2.copy_(hf.experts.down_proj)
            for ours_name, hf_name in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                getattr(moe.shared_experts, ours_name).weight.copy_(getattr(hf.shared_experts, hf_name).weight)
    x = torch.randn(2, 16, DIM)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)
        chosen = ours.router(x.view(-1, DIM), ours.expert_bias)[1].sort(-1).values
        free = ungrouped.router(x.view(-1, DIM), ungrouped.expert_bias)[1].sort(-1).values
    assert (chosen != free).any(dim=-1).sum() >= 3  # the limit mattered for several tokens
    # every chosen expert lies in one of the token's `limited` groups
    assert all(len(set((row // (experts // groups)).tolist())) <= limited for row in chosen)


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(num_expert_groups=4), "go together"),
        (dict(num_expert_groups=3, num_limited_groups=1), "divide num_experts"),
        (dict(num_expert_groups=8, num_limited_groups=2), "at least 2 experts"),
        (dict(num_expert_groups=4, num_limited_groups=5), "num_limited_groups"),
        (dict(num_expert_groups=4, num_limited_groups=1, top_k=3), "at least top_k"),
    ],
)
def test_group_limited_routing_arguments_are_checked(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        MoEArgs(**{"num_experts": 8, "top_k": 2, **kw})


def test_validate_moe_config():
    def job(ep):
        return SimpleNamespace(parallelism=SimpleNamespace(expert_parallel_degree=ep))

    moe_model = SimpleNamespace(moe_args=MoEArgs(num_experts=8, top_k=2))
    validate_moe_config(job(1), moe_model)
    validate_moe_config(job(4), moe_model)
    with pytest.raises(ConfigError, match="expert_parallel_degree 3 must divide"):
        validate_moe_config(job(3), moe_model)
    with pytest.raises(ConfigError, match="needs an MoE model"):
        validate_moe_config(job(2), SimpleNamespace(moe_args=None))
    validate_moe_config(job(1), SimpleNamespace())
    bad = SimpleNamespace(moe_args=SimpleNamespace(num_experts=4, top_k=5))
    with pytest.raises(ConfigError, match="top_k 5"):
        validate_moe_config(job(1), bad)
    with pytest.raises(ValueError, match="top_k"):
        MoEArgs(num_experts=4, top_k=5)


def test_masked_experts_equal_loop():
    """The host-sync-free fallback of compiled non-bf16 runs."""
    torch.manual_seed(0)
    w1, w3 = torch.randn(4, HIDDEN, DIM), torch.randn(4, HIDDEN, DIM)
    w2 = torch.randn(4, DIM, HIDDEN)
    x = torch.randn(13, DIM)
    counts = torch.tensor([3, 0, 6, 4])
    torch.testing.assert_close(
        moe_mod._experts_masked(x, counts, w1, w2, w3), moe_mod._experts_loop(x, counts, w1, w2, w3)
    )


def test_compiled_fullgraph_matches_eager():
    moe = build(seed=4)
    x = torch.randn(2, 8, DIM)
    with torch.no_grad():
        ref = moe(x)
        out = torch.compile(moe, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
