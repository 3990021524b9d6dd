"""Rank-side code of the float8 distributed tests (one launch, several checks).

Each layout builds the shrunk debug model of llama_parity.py on meta, applies the float8
converter, parallelizes it with ``parallelize_llama``, loads the same initial weights and
trains a few AdamW steps on its slice of the global batch, calling the converter's
post-optimizer hook after every step exactly as the trainer does. Rank 0 also trains a
single-process float8 model (same converter) as the reference, and reports relative errors;
the pytest side decides pass/fail.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor

from llama_parity import (
    ARGS,
    GLOBAL_BATCH,
    LR,
    MAX_NORM,
    Layout,
    _job_config,
    _rel,
    batches,
    device,
    full_params,
    initial_state,
    load_full_state,
    loss_fn,
)
from torchtitan.components.float8 import build_model_converters, native_cpu_float8_matmuls
from torchtitan.distributed import utils as dist_utils
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models.llama3 import Transformer
from torchtitan.models.llama3.parallelize import parallelize_llama


def _float8_config(layout: Layout, recipe: str | None, all_gather: bool, precompute: bool):
    jc = _job_config(layout)
    jc.model.converters = ["float8"]
    jc.float8.recipe_name = recipe
    jc.float8.enable_fsdp_float8_all_gather = all_gather
    jc.float8.precompute_float8_dynamic_scale_for_fsdp = precompute
    return jc


def _build(jc, dp_shard: int, tp: int, state: dict[str, torch.Tensor]):
    world = dist.get_world_size() if dp_shard * tp > 1 else 1
    pd = ParallelDims(dp_replicate=1, dp_shard=dp_shard, cp=1, tp=tp, pp=1, world_size=world)
    if world > 1:
        pd.build_mesh(device().type)
    with torch.device("meta"):
        model = Transformer(ARGS)
    converters = build_model_converters(jc, pd)
    converters.convert(model)
    if world > 1:
        model = parallelize_llama(model, pd, jc)
    model.to_empty(device=device())
    with torch.no_grad():
        model.init_weights()
    load_full_state(model, state)
    return model, pd, converters


def _train(model: nn.Module, pd: ParallelDims, converters, distributed: bool) -> dict[str, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, eps=1e-6)
    if distributed:
        dp_rank, dp_size = pd.dp_rank_and_size(pd.world_mesh)
        train_context = dist_utils.get_train_context(pd.loss_parallel_enabled, False)
    else:
        dp_rank, dp_size = 0, 1
        train_context = dist_utils.get_train_context(False, False)
    rows = slice(dp_rank * GLOBAL_BATCH // dp_size, (dp_rank + 1) * GLOBAL_BATCH // dp_size)
    losses, norms = [], []
    for inputs, labels in batches():
        opt.zero_grad()
        with train_context():
            loss = loss_fn(model(inputs[rows]), labels[rows])
            loss.backward()
        if distributed:
            norms.append(dist_utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=True).item())
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        opt.step()
        converters.post_optimizer_hook([model])
        if isinstance(loss, DTensor):
            loss = loss.full_tensor()
        if distributed and pd.dp_enabled:
            losses.append(dist_utils.dist_mean(loss.detach(), pd.get_mesh("dp_cp")))
        else:
            losses.append(loss.item())
    return {"losses": losses, "norms": norms, "params": full_params(model)}


def _compare(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    return {
        "loss_rel_err": max(abs(a - b) / abs(b) for a, b in zip(result["losses"], reference["losses"])),
        "grad_norm_rel_err": max(abs(a - b) / abs(b) for a, b in zip(result["norms"], reference["norms"])),
        "param_rel_err": max(_rel(result["params"][k], reference["params"][k]) for k in reference["params"]),
        "param_names_differ": sorted(set(result["params"]) ^ set(reference["params"])),
    }


def _weight_kinds(model: nn.Module) -> dict[str, str]:
    """Class of each float8 linear and of its weight's local shard (shows float8 all-gather)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            local = w._local_tensor if isinstance(w, DTensor) else w
            out[name] = f"{type(module).__name__}/{type(local).__name__}"
    return out


def _checkpoint_round_trip(jc, dp_shard: int, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """float8 (FSDP, float8 all-gather) -> plain model -> float8, via full state dicts."""
    model, _, _ = _build(jc, dp_shard, 1, state)
    options = StateDictOptions(full_state_dict=True)
    sd = get_model_state_dict(model, options=options)
    plain = Transformer(ARGS).to(device())
    missing, unexpected = plain.load_state_dict(sd, strict=True)
    to_plain_err = max(_rel(plain.state_dict()[k], state[k]) for k in state)
    # Back: a plain state dict (perturbed, so the load is visible) into a fresh float8 model.
    fresh, _, _ = _build(jc, dp_shard, 1, state)
    perturbed = {k: v + 0.5 for k, v in plain.state_dict().items()}
    # set_model_state_dict may replace the dict's values by shards: hand it a copy.
    set_model_state_dict(fresh, dict(perturbed), options=StateDictOptions(full_state_dict=True))
    back = full_params(fresh)
    return {
        "keys_equal": set(sd) == set(state),
        "to_plain_rel_err": to_plain_err,
        "back_rel_err": max(_rel(back[k], perturbed[k].cpu()) for k in back),
        "dtypes": sorted({str(v.dtype) for v in sd.values()}),
    }


class _AllGatherBytes:
    """Records the bytes each rank sends into FSDP's all-gathers while active."""

    NAMES = ("all_gather_single", "all_gather_into_tensor")

    def __enter__(self) -> "_AllGatherBytes":
        self.bytes, self.dtypes, self._saved = 0, set(), {}
        for name in self.NAMES:
            if hasattr(dist, name):
                self._saved[name] = original = getattr(dist, name)
                setattr(dist, name, self._wrap(original))
        return self

    def _wrap(self, original):
        def recording(output_tensor, input_tensor, *args, **kwargs):
            self.bytes += input_tensor.numel() * input_tensor.element_size()
            self.dtypes.add(str(input_tensor.dtype))
            return original(output_tensor, input_tensor, *args, **kwargs)

        return recording

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)


def _expected_all_gather_bytes(model: nn.Module, float8_weights: bool) -> int:
    """One forward all-gathers every local shard once: 1 byte per float8 weight element."""
    total = 0
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        is_float8 = float8_weights and type(local).__name__ == "WeightWithDynamicFloat8CastTensor"
        total += local.numel() * (1 if is_float8 else local.element_size())
    return total


def _forward_all_gather(model: nn.Module, pd: ParallelDims) -> dict[str, Any]:
    inputs, _ = batches()[0]
    dp_rank, dp_size = pd.dp_rank_and_size(pd.world_mesh)
    rows = slice(dp_rank * GLOBAL_BATCH // dp_size, (dp_rank + 1) * GLOBAL_BATCH // dp_size)
    with torch.no_grad(), _AllGatherBytes() as rec:
        model(inputs[rows])
    return {"bytes": rec.bytes, "dtypes": sorted(rec.dtypes)}


def main(layouts: list[dict[str, Any]]) -> dict[str, Any]:
    """Every float8 layout on every rank; rank 0 returns the comparisons.

    A layout is a Layout's fields plus ``recipe``, ``all_gather``, ``precompute``; with
    ``compare_to`` (an earlier layout's name) it is also compared with that layout.
    """
    state = initial_state()
    references: dict[str | None, dict[str, Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {}
    for spec in layouts:
        spec = dict(spec)
        name = spec.pop("name")
        recipe = spec.pop("recipe", None)
        # torch's CPU float8 matmul, not oneDNN's reference kernel, where it takes the recipe
        with native_cpu_float8_matmuls(recipe):
            report[name] = _run_layout(name, recipe, spec, state, references, results)
        dist.barrier()
    jc = _float8_config(Layout("ckpt", dp_shard=dist.get_world_size()), None, True, True)
    with native_cpu_float8_matmuls("tensorwise"):
        report["checkpoint"] = _checkpoint_round_trip(jc, dist.get_world_size(), state)
    return report


def _run_layout(
    name: str,
    recipe: str | None,
    spec: dict[str, Any],
    state: dict[str, torch.Tensor],
    references: dict[str | None, dict[str, Any]],
    results: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """One layout's report entry; ``references`` (one process per recipe) and ``results``
    (by layout name, for ``compare_to``) fill up on rank 0 as layouts run."""
    all_gather = spec.pop("all_gather", False)
    precompute = spec.pop("precompute", False)
    compare_to = spec.pop("compare_to", None)
    layout = Layout(name=name, **spec)
    jc = _float8_config(layout, recipe, all_gather, precompute)
    try:
        model, pd, converters = _build(jc, layout.dp_shard, layout.tp, state)
    except ValueError as e:  # a rejected combination (ConfigError) is a result
        return {"error": f"{type(e).__name__}: {e}"}
    entry: dict[str, Any] = {"kinds": _weight_kinds(model)}
    started = time.perf_counter()
    result = _train(model, pd, converters, distributed=True)
    entry["seconds"] = round(time.perf_counter() - started, 2)  # watches suite time
    entry["precomputed_scales"] = sum(
        getattr(getattr(p, "_local_tensor", None), "_precomputed_scale", None) is not None
        for p in model.parameters()
    )
    if pd.fsdp_enabled:  # after training: a forward leaves some units unsharded
        expected = _expected_all_gather_bytes(model, all_gather)
        entry["all_gather"] = {**_forward_all_gather(model, pd), "expected_bytes": expected}
    if dist.get_rank() == 0:
        if recipe not in references:
            ref_jc = _float8_config(Layout("reference"), recipe, False, False)
            ref_model, ref_pd, ref_conv = _build(ref_jc, 1, 1, state)
            references[recipe] = _train(ref_model, ref_pd, ref_conv, distributed=False)
        results[name] = result
        entry["vs_single_process"] = _compare(result, references[recipe])
        if compare_to is not None:
            entry["vs_" + compare_to] = _compare(result, results[compare_to])
        entry["losses"] = result["losses"]
    return entry
