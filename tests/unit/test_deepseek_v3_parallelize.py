"""DeepSeek-V3's parallelize function on a fake process group (one process, meta model):
the planner's dry run builds it, and the TP plan of multi-head latent attention refuses
head counts TP cannot split. Numerics against one process: tests/distributed/test_deepseek_v3_parity.py."""

from __future__ import annotations

import math

import pytest
import torch

from small_trainer import small_trainer_config
from torchtitan.config import ConfigError
from torchtitan.planner import dry_run, get_gpu
from torchtitan.planner.memory import analytical_states


@pytest.mark.parametrize("flavor", ["debugmodel", "debugmodel_lora"])
def test_dry_run_tp2_ep2_builds_with_finite_memory(tmp_path, flavor):
    """FSDP 2 x TP 2 x EP 2 on 4 fake ranks: the built (meta) parameters hold exactly what the
    planner's shapes and TP styles say (latents replicated, heads split), and every memory
    term is finite and positive."""
    cfg = small_trainer_config(tmp_path, "--model.name", "deepseek_v3", "--model.flavor", flavor,
                               "--training.seq_len", "64", "--training.local_batch_size", "2",
                               "--parallelism.tensor_parallel_degree", "2", "--parallelism.expert_parallel_degree", "2")
    plan = dry_run(cfg, 4, get_gpu("H100"))
    lay, g, r = plan.layout, plan.geometry, plan.ranks[0]
    assert (lay.tp, lay.ep, lay.dp_shard) == (2, 2, 2) and g.kv_lora_rank > 0
    a = analytical_states(g, lay.tp, lay.dp_shard * lay.cp, sum(r.stage_layers), r.first, r.last, gather_bytes=4,
                          ep=lay.ep, moe_layers=g.n_moe_layers)
    b = r.states
    assert (a.params, a.grads, a.optimizer, a.stage_params, a.output_params) == (
        b.params, b.grads, b.optimizer, b.stage_params, b.output_params)
    m = r.memory
    assert all(math.isfinite(v) and v > 0 for v in (m.peak_reserved, m.activations, plan.cost.step_s))
    assert plan.fits


def test_tp_must_split_whole_latent_attention_heads():
    from torch.distributed.device_mesh import init_device_mesh

    from torchtitan.models import get_model_args, get_model_spec
    from torchtitan.models.deepseek_v3.parallelize import apply_deepseek_v3_tp
    from torchtitan.planner.dry_run import fake_process_group

    args = get_model_args("deepseek_v3", "debugmodel")
    args.vocab_size, args.n_heads = 2000, 6
    with torch.device("meta"):
        model = get_model_spec("deepseek_v3").model_cls(args)
    with fake_process_group(0, 4):
        mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
        with pytest.raises(ConfigError, match="tensor_parallel_degree 4 must divide the model's 6"):
            apply_deepseek_v3_tp(model, mesh, loss_parallel=True)


def test_attention_with_narrower_values_runs_the_cpu_flash_kernel():
    """MLA's values (16 wide) are narrower than its queries and keys (24): on the CPU they are
    zero-padded for the flash kernel (the one ring attention runs under CP; it takes equal
    widths only), and output and gradients equal attention written out in fp64."""
    from torchtitan.models.common.attention import ScaledDotProductAttention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, d, generator=g, requires_grad=True) for d in (24, 24, 16))
    out = ScaledDotProductAttention(backend="flash", scale=0.3)(q, k, v)
    assert out.shape == (2, 4, 16, 16)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = (qd @ kd.transpose(-1, -2) * 0.3).masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.softmax(scores, dim=-1) @ vd
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    for got, want in ((q, qd), (k, kd), (v, vd)):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)
