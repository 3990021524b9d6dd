"""Rank-side code of the MoE parity tests: the real ``Trainer`` on Qwen3 ``debugmodel_moe``
under several layouts, one after the other in one launch.

Each layout trains a few steps from the same seed on the same global batch (the
layout-independent data order of ``training.dataset_shards``), in fp32, and each rank
returns the logged losses, the full parameters (``full_tensor()``, only this rank's pipeline
stage) and every MoE layer's expert bias. The pytest side compares them with a one-process
run of the same config; a failure prints the numbers.
"""

from __future__ import annotations

import gc
import tempfile
import time
from typing import Any

import torch
from torch.distributed.tensor import DTensor

STEPS = 3
COMMON = [
    "--model.name", "qwen3",
    "--model.flavor", "debugmodel_moe",
    "--training.steps", str(STEPS),
    "--training.seq_len", "32",
    "--training.global_batch_size", "4",
    "--training.dataset_shards", "4",
    "--training.max_norm", "0.5",  # clipping active: a wrongly scaled gradient shows
    "--optimizer.lr", "1e-3",
    "--optimizer.eps", "1e-6",
    "--lr_scheduler.warmup_steps", "1",
    "--metrics.log_freq", "1",
    "--metrics.no-enable_color_printing",
    "--job.no-print_config",
    "--activation_checkpoint.mode", "none",
]


def _clean(name: str) -> str:
    for seg in ("_checkpoint_wrapped_module.", "_orig_mod.", "module."):
        name = name.replace(seg, "")
    return name


# The flavor's MoE, plus one shared expert (so the shared experts' TP plan is exercised).
MOE_OVERRIDES = {"num_shared_experts": 1}


def run_layouts(layouts: list[tuple[str, list[str]]], reshard: dict | None = None) -> dict[str, dict[str, Any]]:
    """Train each ``(name, extra_args)`` layout; return name -> {losses, grad_norms,
    params, biases} (arrays by value: a rank exits before the launcher reads them).
    ``reshard``: also run :func:`reshard_across_ep` with these arguments (result under
    "reshard"), in the same launch."""
    import dataclasses

    from small_trainer import small_trainer_args

    from torchtitan.config import ConfigManager
    from torchtitan.models.common.moe import MoE
    from torchtitan.models.qwen3 import qwen3_configs
    from torchtitan.trainer import Trainer

    # This rank process only: the flavor as the tests want it.
    flavor = qwen3_configs["debugmodel_moe"]
    flavor.moe_args = dataclasses.replace(flavor.moe_args, **MOE_OVERRIDES)

    out: dict[str, dict[str, Any]] = {}
    for name, extra in layouts:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as dump:
            cfg = ConfigManager().parse_args(small_trainer_args(dump, *COMMON, *extra))
            trainer = Trainer(cfg)
            grad_norms: list[float] = []
            step = trainer.train_step

            def recording_step(data_iterator: Any) -> Any:
                loss, grad_norm, lr = step(data_iterator)
                grad_norms.append(float(grad_norm))
                return loss, grad_norm, lr

            trainer.train_step = recording_step
            losses = trainer.train()
            params = {}
            for part in trainer.model_parts:
                for pname, p in part.named_parameters():
                    full = p.full_tensor() if isinstance(p, DTensor) else p
                    params[_clean(pname)] = full.detach().cpu().numpy().copy()  # by value: ranks exit before the reader
            biases = {
                _clean(mname): m.expert_bias.detach().cpu().numpy().copy()
                for part in trainer.model_parts
                for mname, m in part.named_modules()
                if isinstance(m, MoE)
            }
            out[name] = {"losses": losses, "grad_norms": grad_norms, "params": params, "biases": biases}
            out[name]["seconds"] = time.perf_counter() - t0
            trainer.checkpointer.close()
            trainer.metrics.close()
            del trainer
            gc.collect()
    if reshard is not None:
        t0 = time.perf_counter()
        out["reshard"] = reshard_across_ep(**reshard)
        out["reshard"]["seconds"] = time.perf_counter() - t0
    return out


def _full(value: Any) -> Any:
    if isinstance(value, DTensor):
        value = value.full_tensor()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    return value


def _snapshot(trainer: Any) -> dict[str, Any]:
    """Full parameters, expert biases and optimizer state (collective: every rank calls)."""
    from torchtitan.models.common.moe import MoE

    part = trainer.model_parts[0]
    return {
        "params": {_clean(k): _full(v) for k, v in part.named_parameters()},
        "biases": {_clean(k): _full(m.expert_bias) for k, m in part.named_modules() if isinstance(m, MoE)},
        "optimizer": {_clean(k): _full(v) for k, v in trainer.optimizers.state_dict().items()},
    }


def reshard_across_ep(workdir: str, save_args: list[str], load_layouts: list[tuple[str, list[str]]]) -> dict:
    """Train 1 step under ``save_args`` and checkpoint; load that checkpoint under each of
    ``load_layouts``; return every snapshot (rank 0's) for the pytest side to compare."""
    import dataclasses

    import torch.distributed as dist
    from small_trainer import small_trainer_args

    from torchtitan.config import ConfigManager
    from torchtitan.models.qwen3 import qwen3_configs
    from torchtitan.trainer import Trainer

    flavor = qwen3_configs["debugmodel_moe"]
    flavor.moe_args = dataclasses.replace(flavor.moe_args, **MOE_OVERRIDES)
    ckpt = ["--training.steps", "1", "--checkpoint.enable", "--checkpoint.interval", "1"]

    def config(extra: list[str]) -> Any:
        return ConfigManager().parse_args(small_trainer_args(workdir, *COMMON, *extra, *ckpt))

    trainer = Trainer(config(save_args))
    trainer.train()
    out = {"saved": _snapshot(trainer)}
    trainer.checkpointer.close()
    trainer.metrics.close()
    dist.barrier()
    for name, extra in load_layouts:
        trainer = Trainer(config(extra))
        out[name] = {"loaded": trainer.checkpointer.load(), **_snapshot(trainer)}
        trainer.checkpointer.close()
        trainer.metrics.close()
    return out
