"""Rank-side code of the MoE parity tests: the real ``Trainer`` on an MoE debug flavor
(Qwen3 ``debugmodel_moe``, or DeepSeek-V3 ``debugmodel`` / ``debugmodel_lora``: ``MODELS``)
under several layouts, one after the other in one launch.

Each layout trains a few steps from the same seed on the same global batch (the
layout-independent data order of ``training.dataset_shards``), in fp32, and each rank
returns the logged losses, the full parameters (``full_tensor()``, only this rank's pipeline
stage) and every MoE layer's expert bias. The pytest side compares them with a one-process
run of the same config; a failure prints the numbers.
"""

from __future__ import annotations

import dataclasses
import gc
import tempfile
import time
from typing import Any

import torch
from torch.distributed.tensor import DTensor

STEPS = 3
COMMON = [
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
# The flavor's depth, experts and routing, at a quarter of its width (dim 64, 4 query / 2
# key-value heads of 16, experts of 64): what is compared does not depend on the width, and
# at 256 the steps and the full-tensor gathers were most of the launch.
SHAPE_OVERRIDES = {"dim": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "hidden_dim": 192, "moe_inter_dim": 64}
# DeepSeek-V3's debug flavors (1 dense + 3 MoE blocks, 8 experts in 4 groups, top 2 of the
# best 2 groups, one shared expert) at a quarter of their width: 4 heads, a key/value latent
# of 32, query/key heads of 16 + 8 (rotary), value heads of 16; low-rank queries of 24.
DEEPSEEK_V3_SHAPE_OVERRIDES = {
    "dim": 64, "n_heads": 4, "inter_dim": 192, "moe_inter_dim": 64,
    "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
}
# model name -> (the flavor a layout gets unless its arguments name another, the flavors
# use_test_flavor resizes and how)
MODELS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "qwen3": ("debugmodel_moe", {"debugmodel_moe": SHAPE_OVERRIDES}),
    "deepseek_v3": (
        "debugmodel",
        {
            "debugmodel": DEEPSEEK_V3_SHAPE_OVERRIDES,
            "debugmodel_lora": {**DEEPSEEK_V3_SHAPE_OVERRIDES, "q_lora_rank": 24},
        },
    ),
}


def use_test_flavor(model: str = "qwen3") -> None:
    """This rank process only: ``model``'s debug flavors as the tests want them (``MODELS``;
    Qwen3's with one shared expert added)."""
    from torchtitan.models import get_model_spec

    flavors = get_model_spec(model).flavors
    for name, overrides in MODELS[model][1].items():
        flavor = dataclasses.replace(flavors[name], **overrides)
        if model == "qwen3":
            flavor.moe_args = dataclasses.replace(flavor.moe_args, **MOE_OVERRIDES)
        flavors[name] = flavor


def model_args(model: str) -> list[str]:
    """The options naming ``model`` and its default test flavor (a layout may name another)."""
    return ["--model.name", model, "--model.flavor", MODELS[model][0]]


def ep_round_trip() -> dict[str, Any]:
    """``ExpertDispatcher`` over every rank (one expert each) with stand-in experts that scale
    expert ``e``'s rows by ``e + 1``: combine(dispatch(x)) must give each row back to its
    sender, scaled, and the backward the same scale. Rank r sends ``c[(d - r) % ep]`` rows
    to rank d: every rank sends and receives the same total but no split is its mirror, so a
    combine that reuses the dispatch's split sizes moves the right number of wrong rows."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from torchtitan.distributed.expert_parallel import ExpertDispatcher

    ep, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (ep,), mesh_dim_names=("ep",))
    dispatcher = ExpertDispatcher(mesh, num_experts=ep)
    counts = torch.tensor([(d - rank) % ep + 1 for d in range(ep)])
    expert_of_row = torch.repeat_interleave(torch.arange(ep), counts)
    x = (rank * 100 + torch.arange(int(counts.sum()), dtype=torch.float32)).unsqueeze(1).repeat(1, 3)
    x.requires_grad_(True)
    rows, local_counts = dispatcher.dispatch(None, (x, counts))
    out = dispatcher.combine(None, (rows, local_counts), rows * (rank + 1))
    scale = (expert_of_row + 1).float().unsqueeze(1)
    ok_shape = tuple(out.shape) == tuple(x.shape)
    out.sum().backward()
    return {
        "shape_ok": ok_shape,
        "value_err": (out.detach() - x.detach() * scale).abs().max().item() if ok_shape else float("inf"),
        "grad_err": (x.grad - scale.expand_as(x)).abs().max().item(),
        "received": local_counts.tolist(),
    }


def run_layouts(
    layouts: list[tuple[str, list[str]]],
    reshard: dict | None = None,
    round_trip: bool = False,
    model: str = "qwen3",
) -> dict[str, dict[str, Any]]:
    """Train each ``(name, extra_args)`` layout of ``model`` (``MODELS``); return name ->
    {losses, grad_norms, params, biases} (arrays by value: a rank exits before the launcher
    reads them).
    ``reshard``: also run :func:`reshard_across_ep` with these arguments (result under
    "reshard"), in the same launch; ``round_trip``: :func:`ep_round_trip` first (under
    "round_trip"; its error as text if it raised, so the layouts still run)."""
    import traceback

    round_trip_result: dict[str, Any] = {}
    if round_trip:
        try:
            round_trip_result = ep_round_trip()
        except Exception:
            round_trip_result = {"error": traceback.format_exc()}
    from small_trainer import small_trainer_args

    from torchtitan.config import ConfigManager
    from torchtitan.models.common.moe import MoE
    from torchtitan.trainer import Trainer

    use_test_flavor(model)

    from harness import layout_scope

    out: dict[str, dict[str, Any]] = {}
    for name, extra in layouts:
        t0 = time.perf_counter()
        with layout_scope(name), tempfile.TemporaryDirectory() as dump:
            cfg = ConfigManager().parse_args(small_trainer_args(dump, *model_args(model), *COMMON, *extra))
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
    if round_trip:
        out["round_trip"] = round_trip_result
    if reshard is not None:
        t0 = time.perf_counter()
        with layout_scope("reshard"):
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
    import torch.distributed as dist
    from small_trainer import small_trainer_args

    from torchtitan.config import ConfigManager
    from torchtitan.trainer import Trainer

    use_test_flavor()
    ckpt = ["--training.steps", "1", "--checkpoint.enable", "--checkpoint.interval", "1"]

    def config(extra: list[str]) -> Any:
        return ConfigManager().parse_args(small_trainer_args(workdir, *model_args("qwen3"), *COMMON, *extra, *ckpt))

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
