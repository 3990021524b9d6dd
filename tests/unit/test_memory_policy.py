"""``activation_checkpoint.mode = "auto"``: the chooser, its end-of-run check, and the CPU
offload path it falls back on.

The chooser is checked against a brute-force scoring of every policy with the planner's own
``evaluate`` (not against numbers written down): it must pick the fastest predicted policy
that fits, never one that does not, offload only when nothing else fits, the same one every
time, and refuse with one line when nothing fits.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib

import pytest
import torch

from small_trainer import small_trainer_args, small_trainer_config
from torchtitan.config import ConfigError, ConfigManager
from torchtitan.planner.hardware import GIB, GPUS
from torchtitan.planner.layout import Layout
from torchtitan.planner.memory_policy import (
    MARGIN,
    Policy,
    candidate_policies,
    choose,
    headroom_gib,
    prediction_gap,
    resolve_auto,
)
from torchtitan.planner.search import check_legal, evaluate, model_geometry, tiny_model

H100 = GPUS["H100"].with_overrides(memory_gib=79.1)


def _cfg(flavor: str, batch: int, seq: int, *extra: str):
    return ConfigManager().parse_args([
        "--model.flavor", flavor, "--training.local_batch_size", str(batch), "--training.seq_len", str(seq),
        "--compile.enable", "--activation_checkpoint.mode", "auto", *extra,
    ])


def _evaluate(cfg, policy: Policy, gpu=GPUS["H200"], headroom: float = 0.0):
    """The planner's prediction for ``policy`` applied to ``cfg`` on one rank."""
    g = model_geometry(cfg)
    pcfg = policy.apply(cfg)
    lay = Layout.from_config(pcfg, 1)
    return evaluate(pcfg, lay, check_legal(pcfg, lay, tiny_model(cfg, g.vocab))[1], g, gpu, headroom, MARGIN)


def _score_all(cfg, gpu):
    """Every candidate policy scored independently of ``choose``: (policy, tps, peak, fits)."""
    g = model_geometry(cfg)
    tiny = tiny_model(cfg, g.vocab)
    out = []
    for policy in candidate_policies(g.n_layers):
        pcfg = policy.apply(cfg)
        lay = Layout.from_config(pcfg, 1)
        stages = check_legal(pcfg, lay, tiny)[1]
        c = evaluate(pcfg, lay, stages, g, gpu, headroom_gib(1, capped=False), MARGIN)
        out.append((policy, c.cost.tokens_per_s_per_gpu, c.memory.peak_reserved, c.fits))
    return out


@pytest.mark.parametrize("seq", [8192, 131072])
def test_auto_picks_the_fastest_fitting_policy_and_offloads_only_when_nothing_else_fits(seq, monkeypatch):
    """(Activation offload, scored after these, is the next test's.)"""
    import torchtitan.planner.memory_policy as mp

    monkeypatch.setattr(mp, "AUTO_OFFLOADS_ACTIVATIONS", False)
    cfg = _cfg("3B", 2 if seq == 8192 else 1, seq)
    scored = _score_all(cfg, H100)
    choice = choose(cfg, 1, H100)
    budget = (H100.memory_gib - headroom_gib(1, capped=False)) * GIB * (1 - MARGIN)
    assert choice.candidate.fits and choice.predicted_peak <= budget
    fitting = [s for s in scored if s[3]]
    on_device = [s for s in fitting if not s[0].cpu_offload]
    pool = on_device or fitting  # offload only when no on-device policy fits
    assert choice.predicted_tps == pytest.approx(max(s[1] for s in pool), rel=1e-12)
    assert choice.policy.cpu_offload == (not on_device)
    # the policies predicted faster than the choice are exactly those that do not fit
    faster = [s for s in scored if s[1] > choice.predicted_tps * (1 + 1e-12) and not s[0].cpu_offload]
    assert faster and not any(s[3] for s in faster)
    assert all(s[2] > budget for s in faster)
    if seq == 8192:  # trains on the device, with per-layer AC between all and attention-only
        assert not choice.policy.cpu_offload
    else:  # 131k tokens on one 80 GB card: nothing fits without offload
        assert choice.policy.cpu_offload and choice.predicted_tps > 0
    assert choose(cfg, 1, H100).policy == choice.policy  # deterministic


def test_more_memory_never_chooses_a_slower_policy():
    cfg = _cfg("1B", 4, 8192)
    rates = [choose(cfg, 1, GPUS["H100"].with_overrides(memory_gib=m)).predicted_tps for m in (30.0, 50.0, 79.1, 139.8)]
    assert rates == sorted(rates) and rates[0] < rates[-1]


def test_resolve_auto_writes_a_repeatable_config_and_respects_the_memory_limit():
    cfg = _cfg("3B", 2, 8192, "--training.device_memory_limit_gib", "40")
    out, choice = resolve_auto(cfg, 1, GPUS["H200"])
    assert choice is not None and choice.gpu.memory_gib == 40.0  # capped, not the H200's 139.8
    assert out.activation_checkpoint.mode != "auto" and cfg.activation_checkpoint.mode == "auto"
    out.validate()
    # the written-out options reproduce the choice: the chooser's config parses back to itself
    again = ConfigManager().parse_args(["--model.flavor", "3B", *_ac_overrides(out)])
    for f in dataclasses.fields(out.activation_checkpoint):
        assert getattr(again.activation_checkpoint, f.name) == getattr(out.activation_checkpoint, f.name), f.name
    assert resolve_auto(out, 1, GPUS["H200"]) == (out, None)  # other modes pass through
    assert "auto chose" in choice.line() and "40.0 GiB" in choice.line()


def _ac_overrides(cfg) -> list[str]:
    ac, t = cfg.activation_checkpoint, cfg.training
    return [
        "--activation_checkpoint.mode", ac.mode, "--activation_checkpoint.selective_ac_option", ac.selective_ac_option,
        "--activation_checkpoint.op_saved_matmuls", ac.op_saved_matmuls,
        "--activation_checkpoint.op_ac_layers", str(ac.op_ac_layers), "--activation_checkpoint.later_layers", ac.later_layers,
        "--training.loss_chunk_size", str(t.loss_chunk_size), *(["--training.enable_cpu_offload"] if t.enable_cpu_offload else []),
    ]


def test_every_candidate_is_a_valid_config_the_planner_reads_back():
    cfg = _cfg("debugmodel", 2, 256)
    policies = candidate_policies(model_geometry(cfg).n_layers)
    assert len(set(policies)) == len(policies) and Policy("none") == policies[0]
    for policy in policies:
        pcfg = policy.apply(cfg)
        pcfg.validate()
        assert Layout.from_config(pcfg, 1) == policy.layout(Layout.from_config(pcfg, 1)), policy


def test_nothing_fits_is_one_line_naming_the_option():
    with pytest.raises(ConfigError) as e:
        choose(_cfg("8B", 8, 8192), 1, GPUS["H100"].with_overrides(memory_gib=8.0))
    text = str(e.value)
    assert "\n" not in text and "activation_checkpoint.mode = auto" in text and "local_batch_size" in text


def test_prediction_gap_flags_memory_beyond_the_margin():
    choice = choose(_cfg("1B", 4, 8192), 1, H100)
    line, over = prediction_gap(choice, choice.predicted_tps * 0.9, choice.predicted_peak * 1.02)
    assert not over and "-10.0%" in line and "+2.0%" in line
    line, over = prediction_gap(choice, choice.predicted_tps, choice.predicted_peak * 1.2)
    assert over and "exceeded" in line
    line, over = prediction_gap(choice, choice.predicted_tps, 0)
    assert not over and "no device memory" in line
    # the allocated peak beside the reserved one, against the model's active peak
    active = choice.candidate.memory.peak_active
    line, over = prediction_gap(choice, choice.predicted_tps, choice.predicted_peak, active * 0.9)
    assert not over and f"allocated at most {active * 0.9 / 2**30:.1f} GiB" in line and "-10.0%)" in line


def test_offload_costs_host_time_and_frees_device_memory():
    cfg = _cfg("3B", 1, 8192)
    res = {o: _evaluate(cfg, Policy("full", cpu_offload=o), H100, headroom_gib(1, False)) for o in (False, True)}
    assert res[True].cost.host_s > 0 == res[False].cost.host_s
    assert res[True].cost.tokens_per_s_per_gpu < res[False].cost.tokens_per_s_per_gpu
    assert res[True].memory.host > 0 and res[True].memory.peak_reserved < res[False].memory.peak_reserved


def test_cpu_offload_on_one_rank_trains_like_no_offload(tmp_path):
    """One data rank with ``training.enable_cpu_offload``: the model is FSDP-wrapped over a
    mesh of one (the offload path needs FSDP) and trains exactly as without offload."""
    from torch.distributed.tensor import DTensor

    from torchtitan.trainer import Trainer

    def run(folder, *extra):
        cfg = small_trainer_config(tmp_path / folder, "--training.seq_len", "64", "--training.steps", "2",
                                   "--training.max_norm", "1.0", "--activation_checkpoint.mode", "none", *extra)
        trainer = Trainer(cfg)
        try:
            losses = trainer.train()
            params = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                      for k, v in trainer.model_parts[0].named_parameters()}
        finally:
            trainer.close()
        return losses, params

    base_losses, base = run("a")
    off_losses, off = run("b", "--training.enable_cpu_offload")
    assert off_losses == base_losses
    assert base.keys() == off.keys()
    for k in base:
        torch.testing.assert_close(off[k], base[k], rtol=0, atol=0, msg=k)


def test_launch_resolves_auto_dumps_the_choice_and_reports_the_gap(tmp_path):
    """``python -m torchtitan.train`` with mode auto (in process): the dumped config holds the
    chosen policy, the choice is logged before training and the gap after it."""
    from torchtitan import train as entry
    from torchtitan.tools.logging import logger

    args = small_trainer_args(tmp_path, "--training.seq_len", "64", "--training.steps", "2",
                              "--activation_checkpoint.mode", "auto", "--metrics.log_freq", "1")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)  # the entry point sets its own handler and stops propagation
    try:
        entry.main(args)
    finally:
        logger.removeHandler(handler)
    text = "\n".join(records)
    assert "activation_checkpoint.mode = auto chose: no AC" in text, text
    assert "auto memory policy (no AC): predicted" in text and "no device memory measured" in text
    dumped = tomllib.loads((tmp_path / "config.toml").read_text())
    assert dumped["activation_checkpoint"]["mode"] == "none"


@pytest.mark.parametrize("layout", [
    ("--parallelism.tensor_parallel_degree", "2"),
    ("--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "4"),
    ("--parallelism.context_parallel_degree", "2"),
])
def test_every_layout_gets_a_choice_its_own_checks_accept(layout):
    """8 ranks: the chosen policy passes the trainer's checks for that layout (loss chunks,
    refused under TP's loss parallel, are never chosen there)."""
    from torchtitan.distributed.layout import validate_layout

    cfg = _cfg("8B", 1, 32768, *layout)
    out, choice = resolve_auto(cfg, 8, GPUS["H100"])
    out.validate()
    validate_layout(out, 8)
    assert choice.candidate.fits
    if "--parallelism.tensor_parallel_degree" in layout:
        assert choice.policy.loss_chunk == 0


def test_budget_headroom_and_margin_follow_the_layout():
    """Under a ``device_memory_limit_gib`` cap (the allocator's own limit) the CUDA context is
    not charged; NCCL's buffers are with more than one rank; TP and CP layouts get the wider
    margin their memory predictions need."""
    from torchtitan.planner.dry_run import TP_CP_MARGIN
    from torchtitan.planner.memory_policy import CONTEXT_GIB, NCCL_GIB

    assert headroom_gib(1, capped=True) == 0.0
    assert headroom_gib(1, capped=False) == CONTEXT_GIB
    assert headroom_gib(8, capped=True) == NCCL_GIB
    assert headroom_gib(8, capped=False) == CONTEXT_GIB + NCCL_GIB
    capped = resolve_auto(_cfg("1B", 4, 8192, "--training.device_memory_limit_gib", "79.1"), 1, GPUS["H200"])[1]
    assert capped.budget_bytes == pytest.approx(79.1 * GIB * (1 - MARGIN))
    assert capped.margin == MARGIN
    tp = resolve_auto(_cfg("8B", 1, 8192, "--parallelism.tensor_parallel_degree", "2"), 8, GPUS["H100"])[1]
    assert tp.margin == TP_CP_MARGIN
    assert tp.budget_bytes == pytest.approx((GPUS["H100"].memory_gib - CONTEXT_GIB - NCCL_GIB) * GIB * (1 - TP_CP_MARGIN))


def test_spare_memory_after_op_ac_goes_to_layers_without_ac():
    """1B at 48k tokens a step on an 80 GB card: no AC everywhere does not fit, op AC saving
    every matmul everywhere leaves memory over; the choice keeps op AC on the first layers
    and none on the others, which the build applies as written."""
    from torchtitan.distributed.activation_checkpoint import apply_ac

    cfg = _cfg("1B", 6, 8192, "--training.device_memory_limit_gib", "79.1")
    out, choice = resolve_auto(cfg, 1, GPUS["H200"])
    p = choice.policy
    assert (p.ac, p.later) == ("op_all", "none") and 0 < p.op_layers < 16
    ac = out.activation_checkpoint
    assert (ac.mode, ac.selective_ac_option, ac.op_ac_layers, ac.later_layers) == ("selective", "op", p.op_layers, "none")
    out.validate()

    class Block(torch.nn.Module):
        def forward(self, x):
            return x

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleDict({str(i): Block() for i in range(16)})
    apply_ac(model, ac.mode, ac.selective_ac_option, ac.op_saved_matmuls, ac.op_ac_layers, ac.later_layers)
    wrapped = [type(b) is not Block for b in model.layers.values()]
    assert wrapped == [True] * p.op_layers + [False] * (16 - p.op_layers)


def test_activation_offload_is_scored_for_the_fastest_policies_that_do_not_fit(monkeypatch):
    """At 65k tokens on an 80 GB card the choice offloads some layers' activations when that
    is predicted faster than every policy that fits on the device, never beyond the host's
    share, and only while the switch is on."""
    import torchtitan.planner.memory_policy as mp

    cfg = _cfg("3B", 1, 65536, "--training.device_memory_limit_gib", "79.1", "--training.loss_chunk_size", "2048")
    monkeypatch.setattr(mp, "host_budget_bytes", lambda: 64 * GIB)  # the H200 machine's share
    monkeypatch.setattr(mp, "AUTO_OFFLOADS_ACTIVATIONS", False)
    off = resolve_auto(cfg, 1, GPUS["H200"])[1]
    assert off.policy.offload_layers == 0
    monkeypatch.setattr(mp, "AUTO_OFFLOADS_ACTIVATIONS", True)
    out, on = resolve_auto(cfg, 1, GPUS["H200"])
    assert on.policy.offload_layers > 0 and on.candidate.fits
    assert on.predicted_tps > off.predicted_tps
    assert 0 < on.candidate.memory.host <= 64 * GIB
    assert out.activation_checkpoint.cpu_offload_layers == on.policy.offload_layers
    assert "in host memory" in on.line()
    # the fewest layers that fit: one fewer does not (the time only grows with the copies)
    fewer = dataclasses.replace(on.policy, offload_layers=on.policy.offload_layers - 1).apply(cfg)
    lay = Layout.from_config(fewer, 1)
    g = model_geometry(cfg)
    gpu = GPUS["H200"].with_overrides(memory_gib=79.1)
    c = evaluate(fewer, lay, check_legal(fewer, lay, tiny_model(cfg, g.vocab))[1], g, gpu, 0.0, MARGIN)
    assert not c.fits and c.cost.tokens_per_s_per_gpu >= on.predicted_tps
    # the offloaded policy is the one it came from with memory moved to the host, so that
    # policy did not fit on the device
    plain = dataclasses.replace(on.policy, offload_layers=0)
    assert plain.apply(cfg).activation_checkpoint.cpu_offload_layers == 0
    monkeypatch.setattr(mp, "host_budget_bytes", lambda: 0.5 * GIB)
    assert resolve_auto(cfg, 1, GPUS["H200"])[1].policy.offload_layers == 0  # no room on the host


# Measured on one H200 capped at 79.1 GiB, compile, bf16 (docs/performance.md, session 15):
# the policy auto chose, tokens/s, reserved peak GiB. All on 2026-12-03: L2 beside the by-hand
# settings on one machine, L1 and L3-L5 in two calls on another.
CAP_GIB = 79.1
MEASURED_AUTO = {
    "L1 1B lb4 8k": (("1B", 4, 8192), Policy("op_all", 1, "none"), 55_059, 73.6),
    "L2 3B lb2 8k": (("3B", 2, 8192), Policy("op_all", 27, "none", loss_chunk=8192), 22_056, 75.4),
    "L3 3B 32k": (("3B", 1, 32768), Policy("op_all", loss_chunk=8192, offload_layers=16), 13_592, 75.5),
    "L4 3B 65k": (("3B", 1, 65536), Policy("op", 26, "none", loss_chunk=16384, offload_layers=23), 9_220, 76.3),
    "L5 3B 131k": (("3B", 1, 131072), Policy("op_attn", loss_chunk=32768, offload_layers=24), 5_420, 78.7),
}
# L5's reserved peak went past its prediction by more than the margin in both of that day's
# runs (78.7 and 78.3 GiB against 73.9; the end-of-run warning fired, the cap held): the
# memory model's known miss, kept visible here until a measurement says where it is.
OVER_MARGIN = {"L5 3B 131k"}


@pytest.mark.parametrize("name", list(MEASURED_AUTO))
def test_measured_auto_choices_were_predicted_within_10_percent_and_the_margin(name):
    """The issue's bar: an auto run's predicted tokens/s within 10% of the measured, and its
    reserved peak under the cap; and (but for the known miss) within the memory margin of
    the prediction."""
    (flavor, batch, seq), policy, tps, peak_gib = MEASURED_AUTO[name]
    cfg = _cfg(flavor, batch, seq, "--training.device_memory_limit_gib", str(CAP_GIB))
    cand = _evaluate(cfg, policy)
    assert cand.cost.tokens_per_s_per_gpu == pytest.approx(tps, rel=0.10)
    assert peak_gib < CAP_GIB
    within = peak_gib * GIB <= cand.memory.peak_reserved * (1 + MARGIN)
    assert within != (name in OVER_MARGIN)


# scripts/benchmark_chunked_loss.py on an H200 (docs/performance.md, sessions 14 and 15):
# 16,384 tokens through 3B's output layer, compiled; GiB above the hidden states and the
# weight at the peak of forward + backward, by loss chunk size (16,384: one chunk).
MEASURED_LOSS_GIB = {16384: 4.74, 8192: 3.52, 4096: 2.54, 2048: 2.30}


@pytest.mark.parametrize("chunk", list(MEASURED_LOSS_GIB))
def test_loss_chunk_memory_covers_the_measured_peak(chunk):
    """The memory model's loss term for 16,384 tokens of 3B is never below what the chunked
    loss measured, and above it by at most the weight gradient's bf16 copy: counted at the
    chunks' peak, it is made after the last chunk is freed (a conservative 0.73 GiB)."""
    cfg = _cfg("3B", 2, 8192, "--training.device_memory_limit_gib", "79.1")
    g = model_geometry(cfg)
    cand = _evaluate(cfg, Policy("op_all", loss_chunk=chunk))
    predicted, measured = cand.memory.loss / GIB, MEASURED_LOSS_GIB[chunk]
    bf16_weight_grad = 2 * g.vocab * g.dim / GIB if chunk < 16384 else 0.0
    assert measured - 0.01 <= predicted <= measured + bf16_weight_grad + 0.01, (predicted, measured)


@pytest.mark.parametrize("k", [4, 16])
def test_activation_offload_in_the_memory_and_cost_models(k):
    """k of 3B's identical blocks (op AC on every one, 65,536 tokens) offloaded: the device
    still holds two blocks' worth in flight (one copied out while the next is packed; in
    backward, one in use while the one before is fetched), so the predicted peak drops by
    k - 2 blocks; and the step pays ``OFFLOAD_BYTE_COST`` bytes of device-memory traffic per
    byte offloaded (the copies, hooks and waits, as measured)."""
    from torchtitan.planner.cost import OFFLOAD_BYTE_COST

    cfg = _cfg("3B", 1, 65536, "--training.device_memory_limit_gib", "79.1")
    res = {n: _evaluate(cfg, Policy("op_all", loss_chunk=16384, offload_layers=n)) for n in (0, k)}
    moved = res[k].memory.offloaded
    block = moved / k
    assert moved > 0 and res[0].memory.offloaded == 0
    assert res[0].memory.peak_reserved - res[k].memory.peak_reserved == pytest.approx(moved - 2 * block, rel=1e-9)
    hbm = GPUS["H200"].hbm_tbps * 1e12 * GPUS["H200"].hbm_efficiency
    extra_s = res[k].cost.memory_s - res[0].cost.memory_s
    assert extra_s == pytest.approx(OFFLOAD_BYTE_COST * moved / hbm, rel=1e-9)
    assert res[k].cost.tokens_per_s_per_gpu < res[0].cost.tokens_per_s_per_gpu


def test_host_budget_is_the_nodes_share_and_bounds_activation_offload(capsys):
    """The pinned memory auto may use is half the node's over its ranks; a plan made on
    another machine names the training node's (``--host_memory_gib``); a smaller budget never
    gives a faster prediction, and the offloaded bytes always fit it."""
    import torchtitan.planner.memory_policy as mp
    from torchtitan.planner import cli

    assert mp.host_budget_bytes(128 * GIB, 8) == 8 * GIB and mp.host_budget_bytes(64 * GIB, 1) == 32 * GIB
    cfg = _cfg("3B", 1, 65536, "--training.device_memory_limit_gib", "79.1")
    gpu = GPUS["H200"].with_overrides(memory_gib=79.1)
    choices = [mp.choose(cfg, 1, gpu, capped=True, host_budget=b * GIB) for b in (0, 4, 16, 64)]
    for budget, c in zip((0, 4, 16, 64), choices):
        assert c.candidate.fits and c.candidate.memory.host <= budget * GIB
    assert choices[0].policy.offload_layers == 0 and choices[-1].policy.offload_layers > 0
    tps = [c.predicted_tps for c in choices]
    assert tps == sorted(tps) and tps[-1] > tps[0]
    opts, _ = cli.parse(["--world_size", "8", "--host_memory_gib", "256"])
    assert opts.host_memory_gib == 256.0
    with pytest.raises(SystemExit) as bad:
        cli.main(["--world_size", "1", "--host_memory_gib", "-1"])
    assert bad.value.code == 2 and "--host_memory_gib -1.0: must be >= 0" in capsys.readouterr().err
