"""Checkpoints across CPU ranks (gloo): bit-exact resume and resharding between layouts.

The rank-side drivers live in this module too (the harness imports it by name on every
rank). Each launch builds several Trainers in-process, one after the other, so a launch's
start-up cost is paid once. The model is the Llama 3 Transformer shrunk to 2 layers of
dim 64 (4 query / 2 key-value heads; a flavor added for these tests only), trained at
seq_len 64, local batch 2, fp32, deterministic:

- 4 ranks: FSDP 4 trains 3 steps and saves (the resharding source, with its full
  parameters and optimizer state written aside); FSDP 2 x TP 2 loads it; then bit-exact
  resume under FSDP 2 x TP 2 for every async mode.
- 2 ranks: TP 2 loads the FSDP 4 checkpoint; bit-exact resume under FSDP 2 per async mode.
- 1 process (in the pytest process): loads the FSDP 4 checkpoint.

Bit-exact resume: a 6-step run (lr warmup 2 steps, then decay) saving every 3 steps is the
uninterrupted run; its step-6 checkpoint is deleted (the run "stopped" after step 3) and a
new Trainer resumes from step 3. Steps 4-6 must give the very same losses and final
parameters (``==``, not ``allclose``), and the saving run the same as a run without
checkpoints. (It was 20 steps resumed at 10: the check needs optimizer state, a data position
and an lr schedule past warmup to carry over, not many steps; the steps were most of the time.)
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from harness import launch
from small_trainer import small_trainer_config

pytestmark = pytest.mark.slow

MODES = ("disabled", "async", "async_with_pinned_mem")
RESUME_STEPS, RESUME_AT = 6, 3

FLAVOR = "ckpt_test"
FSDP4 = dict(dp_shard=4)
FSDP2_TP2 = dict(dp_shard=2, tp=2)
FSDP2 = dict(dp_shard=2)
TP2 = dict(dp_shard=1, tp=2)


# ---------------------------------------------------------------- rank side


def tiny_flavor():
    from torchtitan.models.llama3 import TransformerModelArgs

    return TransformerModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16)


def _register_flavor() -> None:
    """Rank processes are this test's own, so adding a flavor there touches nothing else."""
    from torchtitan.models.llama3 import llama3_configs

    llama3_configs.setdefault(FLAVOR, tiny_flavor())


def _config(dump_folder: str, layout: dict[str, int], *overrides: str):
    return small_trainer_config(
        dump_folder,
        "--job.no-print_config",
        "--model.flavor", FLAVOR,
        "--training.seq_len", "64",
        "--training.local_batch_size", "2",
        "--training.deterministic",
        "--activation_checkpoint.mode", "none",
        "--metrics.log_freq", "1",
        "--comm.trace_buf_size", "0",
        "--parallelism.data_parallel_shard_degree", str(layout.get("dp_shard", 1)),
        "--parallelism.tensor_parallel_degree", str(layout.get("tp", 1)),
        # Trainer.train_step adds the loss into a plain tensor, which fails for the
        # DTensor loss of loss parallel; gathering the logits sidesteps that here.
        "--parallelism.disable_loss_parallel",
        *overrides,
    )


def _release(trainer) -> None:
    """Trainer.close() minus destroying the process group, which the next Trainer reuses."""
    trainer.checkpointer.close()
    trainer.metrics.close()


def _full(value: Any) -> Any:
    if isinstance(value, DTensor):
        return value.full_tensor().detach().cpu().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    return value


def full_params(trainer) -> dict[str, torch.Tensor]:
    return {k: _full(v) for k, v in sorted(trainer.model_parts[0].named_parameters())}


def full_optimizer_state(trainer) -> dict[str, Any]:
    """The flattened, FQN-keyed optimizer state with every tensor gathered (collective)."""
    return {k: _full(v) for k, v in sorted(trainer.optimizers.state_dict().items())}


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Largest absolute difference per kind; a key present on one side only is reported."""
    if a.keys() != b.keys():
        return {"key_mismatch": sorted(set(a) ^ set(b))[:5]}
    worst = 0.0
    for k in a:
        if isinstance(a[k], torch.Tensor):
            if a[k].shape != b[k].shape:
                return {"shape_mismatch": k}
            worst = max(worst, (a[k].double() - b[k].double()).abs().max().item())
        elif a[k] != b[k]:
            return {"value_mismatch": (k, a[k], b[k])}
    return {"max_abs_diff": worst, "count": len(a)}


def resume_report(workdir: str, name: str, layout: dict[str, int]) -> dict[str, Any]:
    """Per async mode: the saving run's and the resumed run's losses and final parameters,
    compared with one run without checkpoints."""
    from torchtitan.trainer import Trainer

    base = os.path.join(workdir, name)
    # warmup 2: the resumed steps 4-6 run in the decay phase, so the lr scheduler's state matters
    steps = ["--training.steps", str(RESUME_STEPS), "--lr_scheduler.warmup_steps", "2"]
    trainer = Trainer(_config(os.path.join(base, "reference"), layout, *steps))
    reference_losses = trainer.train()
    reference = full_params(trainer)
    _release(trainer)
    report: dict[str, Any] = {"reference_losses": reference_losses}
    for mode in MODES:
        dump = os.path.join(base, mode)
        ckpt = [
            "--checkpoint.enable",
            "--checkpoint.interval",
            str(RESUME_AT),
            "--checkpoint.async_mode",
            mode,
        ]
        trainer = Trainer(_config(dump, layout, *steps, *ckpt))
        saving_losses = trainer.train()
        saving = full_params(trainer)
        _release(trainer)
        if dist.get_rank() == 0:  # the run "stopped" after its step-RESUME_AT checkpoint
            shutil.rmtree(os.path.join(dump, "checkpoint", f"step-{RESUME_STEPS}"))
        dist.barrier()
        trainer = Trainer(_config(dump, layout, *steps, *ckpt))
        resumed_losses = trainer.train()
        resumed = full_params(trainer)
        report[mode] = {
            "saving_losses": saving_losses,
            "resumed_losses": resumed_losses,
            "resumed_from_step": RESUME_STEPS - len(resumed_losses),
            "saving_vs_reference": _max_diff(saving, reference),
            "resumed_vs_saving": _max_diff(resumed, saving),
        }
        _release(trainer)
    return report


def save_reshard_source(workdir: str, layout: dict[str, int]) -> None:
    """Train 3 steps and save; write the full parameters and optimizer state aside."""
    from torchtitan.trainer import Trainer

    trainer = Trainer(_reshard_config(workdir, layout))
    trainer.train()
    expected = {
        "params": full_params(trainer),
        "optimizer": full_optimizer_state(trainer),
        "train_state": trainer.state_dict(),
        "lr_scheduler": trainer.lr_schedulers.state_dict(),
    }
    _release(trainer)
    if dist.get_rank() == 0:
        torch.save(expected, os.path.join(workdir, "reshard_expected.pt"))
    dist.barrier()


def _reshard_config(workdir: str, layout: dict[str, int]):
    return _config(
        os.path.join(workdir, "reshard"),
        layout,
        "--training.steps",
        "3",
        # the global batch and data position do not depend on the layout either
        "--training.global_batch_size",
        "8",
        "--training.dataset_shards",
        "4",
        "--checkpoint.enable",
        "--checkpoint.interval",
        "3",
    )


def reshard_report(workdir: str, layout: dict[str, int]) -> dict[str, Any]:
    """Load the FSDP 4 checkpoint under ``layout``; compare with what FSDP 4 had."""
    from torchtitan.trainer import Trainer

    trainer = Trainer(_reshard_config(workdir, layout))
    loaded = trainer.checkpointer.load()
    expected = torch.load(os.path.join(workdir, "reshard_expected.pt"), weights_only=True)
    report = {
        "loaded": loaded,
        "placements": sorted(
            {str(p.placements) for p in trainer.model_parts[0].parameters() if isinstance(p, DTensor)}
        ),
        "params": _max_diff(full_params(trainer), expected["params"]),
        "optimizer": _max_diff(full_optimizer_state(trainer), expected["optimizer"]),
        "train_state": trainer.state_dict() == expected["train_state"],
        "lr_scheduler": trainer.lr_schedulers.state_dict() == expected["lr_scheduler"],
        "lr": trainer.lr_schedulers.get_last_lr(),
    }
    _release(trainer)
    return report


def four_rank_main(workdir: str) -> dict[str, Any]:
    _register_flavor()
    save_reshard_source(workdir, FSDP4)
    return {
        "reshard_fsdp2_tp2": reshard_report(workdir, FSDP2_TP2),
        "resume_fsdp2_tp2": resume_report(workdir, "fsdp2_tp2", FSDP2_TP2),
    }


def two_rank_main(workdir: str) -> dict[str, Any]:
    _register_flavor()
    return {
        "reshard_tp2": reshard_report(workdir, TP2),
        "resume_fsdp2": resume_report(workdir, "fsdp2", FSDP2),
    }


# ---------------------------------------------------------------- pytest side


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ckpt_dist"))


@pytest.fixture(scope="module")
def four_ranks(workdir: str) -> dict:
    return launch("test_checkpoint_distributed:four_rank_main", 4, timeout=600, workdir=workdir)[0]


@pytest.fixture(scope="module")
def two_ranks(workdir: str, four_ranks: dict) -> dict:  # needs the FSDP 4 checkpoint
    return launch("test_checkpoint_distributed:two_rank_main", 2, timeout=600, workdir=workdir)[0]


def _assert_resumes_exactly(report: dict) -> None:
    reference = report["reference_losses"]
    assert len(reference) == RESUME_STEPS
    for mode in MODES:
        r = report[mode]
        assert r["resumed_from_step"] == RESUME_AT, (mode, r["resumed_from_step"])
        assert r["saving_losses"] == reference, (mode, r["saving_losses"], reference)
        assert r["resumed_losses"] == reference[RESUME_AT:], (mode, r["resumed_losses"])
        for key in ("saving_vs_reference", "resumed_vs_saving"):
            assert r[key].get("max_abs_diff") == 0.0, (mode, key, r[key])


def _assert_resharded(report: dict) -> None:
    assert report["loaded"]
    assert report["params"].get("max_abs_diff") == 0.0 and report["params"]["count"] > 0, report["params"]
    # exp_avg, exp_avg_sq, step per parameter, plus param-group values: all equal
    assert report["optimizer"].get("max_abs_diff") == 0.0, report["optimizer"]
    assert report["optimizer"]["count"] > 3 * report["params"]["count"], report["optimizer"]
    assert report["train_state"] and report["lr_scheduler"], report


def test_resume_is_bit_exact_fsdp2_tp2(four_ranks: dict) -> None:
    _assert_resumes_exactly(four_ranks["resume_fsdp2_tp2"])


def test_resume_is_bit_exact_fsdp2(two_ranks: dict) -> None:
    _assert_resumes_exactly(two_ranks["resume_fsdp2"])


def test_fsdp4_checkpoint_loads_into_fsdp2_tp2(four_ranks: dict) -> None:
    report = four_ranks["reshard_fsdp2_tp2"]
    _assert_resharded(report)
    # the target really is 2-D sharded (FSDP over TP)
    # (FSDP over TP shards a column-wise weight's TP shard again: _StridedShard)
    assert any("_StridedShard" in p for p in report["placements"]), report["placements"]


def test_fsdp4_checkpoint_loads_into_tp2(two_ranks: dict) -> None:
    report = two_ranks["reshard_tp2"]
    _assert_resharded(report)
    assert report["placements"], "TP 2 should hold DTensor parameters"


def test_fsdp4_checkpoint_loads_into_one_process(workdir: str, four_ranks: dict, monkeypatch) -> None:
    from torchtitan.models.llama3 import llama3_configs
    from torchtitan.trainer import Trainer

    monkeypatch.setitem(llama3_configs, FLAVOR, tiny_flavor())
    trainer = Trainer(_reshard_config(workdir, {}))
    try:
        assert trainer.checkpointer.load()
        expected = torch.load(os.path.join(workdir, "reshard_expected.pt"), weights_only=True)
        assert not any(isinstance(p, DTensor) for p in trainer.model_parts[0].parameters())
        report = {
            "loaded": True,
            "params": _max_diff(full_params(trainer), expected["params"]),
            "optimizer": _max_diff(full_optimizer_state(trainer), expected["optimizer"]),
            "train_state": trainer.state_dict() == expected["train_state"],
            "lr_scheduler": trainer.lr_schedulers.state_dict() == expected["lr_scheduler"],
        }
        _assert_resharded(report)
    finally:
        trainer.close()
