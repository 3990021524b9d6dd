"""The float8 model converter on one CPU process (torch._scaled_mm has a CPU kernel).

What is checked: which linears are converted; that float8 training stays close to fp32 (and
is really float8, i.e. not identical); that its state dict is interchangeable with a plain
model's; the one-line errors; and the trainer end to end with ``--model.converters float8``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from small_trainer import small_trainer_config
from torchtitan.components.float8 import (
    Float8Converter,
    build_model_converters,
    check_float8_device,
    cpu_rowwise_float8,
    float8_module_filter,
    native_cpu_float8_matmuls,
)
from torchtitan.config import ConfigError, JobConfig
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models.llama3 import Transformer, llama3_configs

ONE = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, world_size=1)
# Tiny model for the numerics: 2 layers, dim 64; every block linear has dims divisible by 16.
TINY = dataclasses.replace(
    copy.deepcopy(llama3_configs["debugmodel"]),
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16, max_seq_len=32,
)


@pytest.fixture(autouse=True)
def _native_cpu_float8_matmul():
    """torch's CPU float8 kernel, not oneDNN's reference one (docs/float8.md); the rowwise
    recipes choose again below."""
    with native_cpu_float8_matmuls("tensorwise"):
        yield


def _job_config(recipe: str | None = None, **float8) -> JobConfig:
    jc = JobConfig()
    jc.model.converters = ["float8"]
    jc.float8.recipe_name = recipe
    for key, value in float8.items():
        setattr(jc.float8, key, value)
    return jc


def _float8_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"}


# ---- which modules ---------------------------------------------------------------------
def test_converts_every_block_linear_of_the_debug_model_but_not_output(caplog) -> None:
    args = dataclasses.replace(copy.deepcopy(llama3_configs["debugmodel"]), vocab_size=2000)
    with torch.device("meta"):
        model = Transformer(args)
        model.extra = nn.Linear(256, 100, bias=False)  # 100 is not a multiple of 16
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with caplog.at_level(logging.INFO, logger="torchtitan"):
        build_model_converters(_job_config(), ONE).convert(model)
    expected = {
        f"layers.{i}.{part}"
        for i in range(args.n_layers)
        for part in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                     "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    }
    assert expected < linears
    assert _float8_names(model) == expected
    assert type(model.output) is nn.Linear and type(model.extra) is nn.Linear
    assert "output (filter_fqns 'output')" in caplog.text
    assert "extra (256x100, not multiples of 16)" in caplog.text


def test_filter_matches_name_fragments() -> None:
    skipped: list[str] = []
    keep = float8_module_filter(["attention"], skipped)
    assert not keep(nn.Linear(32, 32), "layers.0.attention.wq")
    assert keep(nn.Linear(32, 48), "layers.0.feed_forward.w1")
    assert not keep(nn.Linear(32, 40), "layers.0.feed_forward.w1")
    assert not keep(nn.Embedding(32, 32), "tok_embeddings")
    assert len(skipped) == 2


def test_filter_under_tensor_parallel_needs_shards_of_16() -> None:
    """TP 2 hands each rank half of one dim: 176 -> 88 is no multiple of 16 (what the float8
    matmul needs), 192 -> 96 is."""
    skipped: list[str] = []
    keep = float8_module_filter([], skipped, tp_degree=2)
    assert not keep(nn.Linear(64, 176), "layers.0.feed_forward.w1")
    assert not keep(nn.Linear(176, 64), "layers.0.feed_forward.w2")
    assert keep(nn.Linear(64, 192), "layers.0.feed_forward.w1")
    assert skipped == [
        "layers.0.feed_forward.w1 (64x176, not multiples of 32)",
        "layers.0.feed_forward.w2 (176x64, not multiples of 32)",
    ]


# ---- numerics --------------------------------------------------------------------------
def _train(recipe: str | None, steps: int = 6) -> tuple[list[float], dict[str, torch.Tensor], nn.Module]:
    """AdamW on one repeated batch (the loss falls fast); the first step's gradients."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(TINY)
    if recipe is not None:
        build_model_converters(_job_config(recipe), ONE).convert(model)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    tokens = torch.randint(0, TINY.vocab_size, (8, 33), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, grads = [], {}
    for step in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return losses, grads, model


@pytest.fixture(scope="module")
def fp32_run():
    return _train(None)


ROWWISE_ON_CPU = pytest.mark.skipif(
    not cpu_rowwise_float8(),
    reason="this torch's CPU _scaled_mm takes per-tensor scales only (torch 2.11); the converter refuses rowwise",
)


@pytest.mark.parametrize(
    "recipe",
    [
        "tensorwise",
        pytest.param("rowwise", marks=ROWWISE_ON_CPU),
        pytest.param("rowwise_with_gw_hp", marks=ROWWISE_ON_CPU),
    ],
)
def test_float8_training_stays_close_to_fp32(fp32_run, recipe: str) -> None:
    """Tolerances from the formats: e4m3 keeps 3 mantissa bits (relative rounding <= 2^-4
    = 6%), e5m2 (gradients, tensorwise) 2 bits (12.5%). Per matmul the errors of K products
    partly cancel, so a gradient is off by a few % (measured <= 10%, on wq/wk whose
    gradients pass through softmax); allowed 25%. The loss over 6 AdamW steps moves from 6.06
    to ~2.6 and differs by < 1% (measured <= 0.7%); allowed 3%. A gradient must also differ
    from fp32 by more than fp32 noise, or nothing was cast."""
    ref_losses, ref_grads, _ = fp32_run
    with native_cpu_float8_matmuls(recipe):
        losses, grads, model = _train(recipe)
    assert len(_float8_names(model)) == 14
    assert ref_losses[-1] < 0.6 * ref_losses[0]  # the comparison spans real learning
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) / b < 3e-2, (losses, ref_losses)
    rel = {n: ((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()).item() for n in grads}
    assert max(rel.values()) < 0.25, rel
    assert rel["layers.0.feed_forward.w2.weight"] > 1e-4, rel


@pytest.mark.parametrize("recipe", ["tensorwise", pytest.param("rowwise", marks=ROWWISE_ON_CPU)])
def test_native_cpu_float8_matmuls_switches_onednn_and_restores_it(recipe: str) -> None:
    before = torch.backends.mkldnn.enabled
    with native_cpu_float8_matmuls(recipe) as native:
        assert torch.backends.mkldnn.enabled is (not native)
        assert native or recipe != "tensorwise"  # torch's kernel always takes tensor-wise scales
        a = torch.randn(32, 32).to(torch.float8_e4m3fn)
        scale = torch.ones(()) if recipe == "tensorwise" else (torch.ones(32, 1), torch.ones(1, 32))
        sa, sb = (scale, scale) if recipe == "tensorwise" else scale
        out = torch._scaled_mm(a, a.t(), sa, sb, out_dtype=torch.float32)
        torch.testing.assert_close(out, a.float() @ a.float().t())  # exact products, fp32 sums
    assert torch.backends.mkldnn.enabled is before


def test_rowwise_on_a_cpu_without_rowwise_kernels_is_refused(monkeypatch) -> None:
    from torchtitan.components import float8 as float8_component

    monkeypatch.setattr(float8_component, "cpu_rowwise_scaled_mm", lambda onednn: False)
    with pytest.raises(ConfigError, match=r"float8.recipe_name rowwise needs row-wise.*tensorwise.*emulate"):
        Float8Converter(_job_config("rowwise"), ONE, device_type="cpu")
    Float8Converter(_job_config("rowwise", emulate=True), ONE, device_type="cpu")  # emulate: fine
    Float8Converter(_job_config("tensorwise"), ONE, device_type="cpu")


def test_emulate_keeps_the_numerics_of_real_float8_matmuls() -> None:
    """emulate swaps torch._scaled_mm for a dequantized high-precision matmul: same casts."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    outs = []
    for emulate in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32, bias=False))
        converter = Float8Converter(_job_config(emulate=emulate), ONE, device_type="cpu")
        converter.convert(model)
        assert converter.config.emulate is emulate
        outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


# ---- checkpoints -----------------------------------------------------------------------
def test_state_dict_loads_without_float8_and_back() -> None:
    _, _, float8_model = _train("tensorwise", steps=1)
    saved = get_model_state_dict(float8_model)
    assert {v.dtype for v in saved.values()} == {torch.float32}
    plain = Transformer(TINY)
    set_model_state_dict(plain, {k: v.clone() for k, v in saved.items()})
    for k, v in plain.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # And back: a plain state dict into a fresh float8 model (same FQNs).
    with torch.device("meta"):
        fresh = Transformer(TINY)
    build_model_converters(_job_config(), ONE).convert(fresh)
    fresh.to_empty(device="cpu")
    fresh.init_weights()
    target = {k: v + 1.0 for k, v in plain.state_dict().items()}
    set_model_state_dict(fresh, dict(target))
    assert len(_float8_names(fresh)) == 14
    for k, v in get_model_state_dict(fresh).items():
        assert torch.equal(v, target[k]), k


# ---- errors ----------------------------------------------------------------------------
def test_unknown_converter_is_a_config_error() -> None:
    jc = JobConfig()
    jc.model.converters = ["int4"]
    with pytest.raises(ConfigError, match="model.converters: unknown converter 'int4'"):
        build_model_converters(jc, ONE)


def test_cuda_below_sm89_without_emulate_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"compute capability >= 8.9.*this one is 8.0.*float8.emulate"):
        check_float8_device(False, "cuda", (8, 0))
    check_float8_device(True, "cuda", (8, 0))  # emulate: allowed
    check_float8_device(False, "cuda", (9, 0))
    check_float8_device(False, "cpu")


def test_missing_or_old_torchao_names_the_version(monkeypatch) -> None:
    import torchao

    monkeypatch.setattr(torchao, "__version__", "0.9.0")
    with pytest.raises(ConfigError, match=r"torchao >= 0\.17, found 0\.9\.0"):
        build_model_converters(_job_config(), ONE)
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    with pytest.raises(ConfigError, match=r"needs torchao >= 0\.17: pip install"):
        build_model_converters(_job_config(), ONE)


@pytest.mark.parametrize(
    "recipe, float8, tp, match",
    [
        ("rowwise", dict(enable_fsdp_float8_all_gather=True), 1, "float8.enable_fsdp_float8_all_gather"),
        ("rowwise_with_gw_hp", {}, 2, "does not compose with tensor parallelism"),
        (None, dict(precompute_float8_dynamic_scale_for_fsdp=True), 1, "needs float8.enable_fsdp"),
    ],
)
def test_combinations_that_do_not_compose(recipe, float8, tp, match) -> None:
    pd = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=tp, pp=1, world_size=tp)
    with pytest.raises(ConfigError, match=match):
        Float8Converter(_job_config(recipe, **float8), pd, device_type="cpu")


# ---- the trainer -----------------------------------------------------------------------
def test_trainer_runs_with_float8_converter(tmp_path) -> None:
    from torchtitan.trainer import Trainer

    cfg = small_trainer_config(
        tmp_path,
        "--model.converters", "float8",
        "--training.seq_len", "32",
        "--training.local_batch_size", "2",
        "--training.steps", "3",
        "--metrics.log_freq", "1",
        "--activation_checkpoint.mode", "none",
    )
    trainer = Trainer(cfg)
    try:
        model = trainer.model_parts[0]
        assert len(_float8_names(model)) == 6 * 7 and type(model.output) is nn.Linear
        losses = trainer.train()
    finally:
        trainer.close()
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert 6.0 < losses[0] < 9.0  # ~ln(vocab 2256) = 7.7 at init


def test_tokens_per_rank_not_a_multiple_of_16_is_rejected() -> None:
    jc = _job_config()
    jc.training.seq_len = 200  # 200 % 16 = 8
    with pytest.raises(ConfigError, match=r"training.seq_len / context_parallel_degree \(200\)"):
        Float8Converter(jc, ONE, device_type="cpu")
    jc.float8.emulate = True  # the emulated matmul has no such constraint
    Float8Converter(jc, ONE, device_type="cpu")
