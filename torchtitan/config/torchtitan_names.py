"""TorchTitan's option names and how each maps onto this project's config.

The tables ``ConfigManager`` reads (docs/config.md has them as a table): TorchTitan's
spellings of options this project names differently, the old v0.1 names, options accepted
and ignored, options whose feature is not built here (refused with the reason unless at the
value that asks for nothing), and TorchTitan's converter names. Torch-free, like all of config/.
"""

from __future__ import annotations

from typing import Any

from torchtitan.config.job_config import ConfigError

# TorchTitan v0.2's names of options this project spells differently (docs/config.md has the
# table): "section.key" (or "section.table.key" for its nested tables) -> ours. Hints for a
# mistyped TorchTitan name suggest the TorchTitan name.
TORCHTITAN_NAMES: dict[str, str] = {
    "checkpoint.initial_load_model_only": "checkpoint.initial_load_model_weights_only",
    "experimental.custom_args_module": "job.custom_config_module",
    "debug.seed": "training.seed",
    "debug.deterministic": "training.deterministic",
    "debug.deterministic_warn_only": "training.deterministic_warn_only",
    "training.dataloader.num_workers": "training.dataloader_num_workers",
    "training.dataloader.persistent_workers": "training.dataloader_persistent_workers",
    "training.dataloader.pin_memory": "training.dataloader_pin_memory",
    "training.dataloader.prefetch_factor": "training.dataloader_prefetch_factor",
    **{
        f"quantize.linear.float8.{key}": f"float8.{key}"
        for key in (
            "enable_fsdp_float8_all_gather",
            "precompute_float8_dynamic_scale_for_fsdp",
            "recipe_name",
            "filter_fqns",
            "emulate",
        )
    },
}

# Every other name of an option -> its name here: keys renamed since TorchTitan v0.1 (old
# "section.key" -> new "section.key"), and TorchTitan v0.2's names (TORCHTITAN_NAMES).
ALIASES: dict[str, str] = {
    "job.print_args": "job.print_config",
    "training.batch_size": "training.local_batch_size",
    "training.data_parallel_replicate_degree": "parallelism.data_parallel_replicate_degree",
    "training.data_parallel_shard_degree": "parallelism.data_parallel_shard_degree",
    "training.tensor_parallel_degree": "parallelism.tensor_parallel_degree",
    "training.disable_loss_parallel": "parallelism.disable_loss_parallel",
    "training.fsdp_reshard_after_forward": "parallelism.fsdp_reshard_after_forward",
    "training.compile": "compile.enable",
    "training.warmup_steps": "lr_scheduler.warmup_steps",
    "training.enable_fsdp_float8_all_gather": "float8.enable_fsdp_float8_all_gather",
    "training.precompute_float8_dynamic_scale_for_fsdp": (
        "float8.precompute_float8_dynamic_scale_for_fsdp"
    ),
    "experimental.pipeline_parallel_degree": "parallelism.pipeline_parallel_degree",
    "experimental.pipeline_parallel_split_points": "parallelism.pipeline_parallel_split_points",
    "experimental.pipeline_parallel_schedule": "parallelism.pipeline_parallel_schedule",
    "experimental.pipeline_parallel_schedule_csv": "parallelism.pipeline_parallel_schedule_csv",
    "experimental.pipeline_parallel_microbatches": "parallelism.pipeline_parallel_microbatches",
    "experimental.context_parallel_degree": "parallelism.context_parallel_degree",
    "experimental.context_parallel_rotate_method": "parallelism.context_parallel_rotate_method",
    "experimental.enable_async_tensor_parallel": "parallelism.enable_async_tensor_parallel",
    "experimental.enable_compiled_autograd": "parallelism.enable_compiled_autograd",
    "checkpoint.enable_checkpoint": "checkpoint.enable",
    "checkpoint.last_save_model_only": "checkpoint.model_weights_only",  # TorchTitan v0.2's name
    "lr_scheduler.lr_min": "lr_scheduler.min_lr_factor",
    "memory_estimation.enabled": "memory_estimation.enable",
    "validation.enabled": "validation.enable",  # TorchTitan before v0.2
    **TORCHTITAN_NAMES,
    # Special cases (boolean old keys, see _Option.kind):
    "metrics.disable_color_printing": "metrics.enable_color_printing",  # inverted
    "metrics.save_for_all_ranks": "metrics.rank_0_only",  # inverted
    # TorchTitan's CP balancer name: "headtail" = on, none = off ("ptrr" is refused)
    "parallelism.context_parallel_load_balancer": "parallelism.context_parallel_load_balance",
    # TorchTitan's per-stage module lists, turned into split points when they are contiguous
    "parallelism.module_fqns_per_model_part": "parallelism.pipeline_parallel_split_points",
    "training.enable_float8_linear": "model.converters",  # true -> append "float8"
    "float8.enable_float8_linear": "model.converters",  # same, from a later v0.1
}
_INVERTED = {"metrics.disable_color_printing", "metrics.save_for_all_ranks"}
_CP_BALANCER = "parallelism.context_parallel_load_balancer"
_MODULE_FQNS = "parallelism.module_fqns_per_model_part"
_ADD_FLOAT8 = {"training.enable_float8_linear", "float8.enable_float8_linear"}
# Old keys whose setting no longer has any effect; accepted so old files still load.
IGNORED: set[str] = {
    "model.norm_type",
    "job.use_for_integration_test",
    "memory_estimation.disable_fake_mode",  # the estimate is always a meta-device dry run
}


_AC_NOT_EXPOSED = "torch.utils.checkpoint's option is not exposed here (activation_checkpoint.mode: none, full, selective)"
_TORCHFT = (
    "torchft fault tolerance is not built here ([fault_tolerance] here handles preemption signals and "
    "non-finite steps; see docs/fault_tolerance.md)"
)
_MX = "MX (mxfp8) training is not built here; float8 is (model.converters = [\"float8\"], [float8])"
# TorchTitan options whose feature is not built here: the value that asks for nothing (the
# TorchTitan default) is accepted, any other value is refused with the reason.
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "optimizer.early_step_in_backward": (False, "optimizer steps inside backward are not built here"),
    "lr_scheduler.total_steps": (
        None, "a schedule length apart from training.steps is not built here (the schedule spans training.steps)"
    ),
    "training.dtype": (
        "float32",
        "pure bfloat16 training (parameters and optimizer states in bfloat16) is not built here; "
        "mixed precision is training.mixed_precision_param",
    ),
    "training.gc_debug": (False, "the garbage-collector debug mode is not built here"),
    "parallelism.expert_tensor_parallel_degree": (1, "expert tensor parallelism is not built here"),
    "parallelism.expert_parallel_comm_backend": ("standard", "the DeepEP backend is not built here"),
    "parallelism.pipeline_parallel_expert_parallel_overlap": (
        True, "the DualPipeV EP/PP overlap is not built here"
    ),
    "checkpoint.initial_load_in_hf_quantized": (False, "loading quantized Hugging Face weights is not built here"),
    "checkpoint.enable_ft_dataloader_checkpoints": (True, _TORCHFT),
    "activation_checkpoint.memory_budget": (
        0.5, "memory-budget activation checkpointing (the compiler's partitioner) is not built here yet"
    ),
    "activation_checkpoint.visualize_memory_budget_pareto": (
        False, "memory-budget activation checkpointing is not built here yet"
    ),
    "activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns": (
        ["moe.router.gate"], "forcing the recompute of chosen matmul shapes is not built here"
    ),
    "activation_checkpoint.early_stop": (False, _AC_NOT_EXPOSED),
    "activation_checkpoint.preserve_rng_state": (False, _AC_NOT_EXPOSED),
    "activation_checkpoint.determinism_check": ("default", _AC_NOT_EXPOSED),
    "activation_checkpoint.debug": (False, _AC_NOT_EXPOSED),
    "quantize.grouped_mm.float8.fqns": ([], "float8 grouped GEMMs for MoE experts are not built here"),
    "float8.moe_fqns": ([], "float8 grouped GEMMs for MoE experts are not built here"),  # v0.1's name
    "quantize.linear.mx.mxfp8_dim1_cast_kernel_choice": ("triton", _MX),
    "quantize.linear.mx.recipe_name": ("mxfp8_cublas", _MX),
    "quantize.linear.mx.filter_fqns": (["output"], _MX),
    "quantize.grouped_mm.mx.recipe_name": ("mxfp8", _MX),
    "quantize.grouped_mm.mx.fqns": ([], _MX),
    **{
        f"validation.dataloader.{key}": (
            default,
            "worker processes for the validation data are not built here (it loads in the training "
            "process); training.dataloader_* applies to the training data",
        )
        for key, default in (
            ("num_workers", 0), ("persistent_workers", False), ("pin_memory", False), ("prefetch_factor", None)
        )
    },
    "debug.moe_force_load_balance": (
        False,
        "the MoE router here has no forced round-robin mode (models/common/moe.py routes by top-k "
        "scores; load balance comes from the expert bias and the auxiliary loss)",
    ),
    **{
        f"fault_tolerance.{key}": (default, _TORCHFT)
        for key, default in (
            ("enable", False),
            ("process_group", "gloo"),
            ("process_group_timeout_ms", 10000),
            ("replica_id", 0),
            ("group_size", 0),
            ("min_replica_size", 1),
            ("semi_sync_method", None),
        )
    },
}
# Values of a supported option that name a feature not built here.
_REFUSED_VALUES: dict[tuple[str, Any], str] = {
    ("activation_checkpoint.mode", "memory_budget"): (
        "the compiler's memory-budget partitioner is not built here; mode = \"auto\" fits the run to "
        "the device's memory instead (per-layer AC, loss chunks, CPU offload: docs/planning.md)"
    ),
}
# model.converters: TorchTitan v0.2's names -> ours; the others are refused with the reason.
_CONVERTER_NAMES = {"quantize.linear.float8": "float8"}
_REFUSED_CONVERTERS = {
    "quantize.grouped_mm.float8": "float8 grouped GEMMs for MoE experts are not built here",
    "quantize.linear.mx": _MX,
    "quantize.grouped_mm.mx": _MX,
    "mx": _MX,
}


def _split_points_from_fqns(parts: list[list[str]], where: str) -> list[str]:
    """TorchTitan's ``module_fqns_per_model_part`` as split points: each part after the first
    must start at the layer after the previous part's last (embedding first, norm and output
    last); other groupings are not expressible here and are refused."""
    layers: list[list[int]] = []
    for i, part in enumerate(parts):
        numbers = []
        for name in part:
            head, _, index = name.rpartition(".")
            if head == "layers" and index.isdigit():
                numbers.append(int(index))
            elif not ((name == "tok_embeddings" and i == 0) or (name in ("norm", "output") and i == len(parts) - 1)):
                raise ConfigError(
                    f"{where}: {name!r} in part {i}: only tok_embeddings (first part), layers.N and "
                    "norm/output (last part) can be placed here; use pipeline_parallel_split_points"
                )
        if not numbers:
            raise ConfigError(f"{where}: part {i} holds no layer; every stage needs one here")
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            raise ConfigError(f"{where}: part {i} is not a run of consecutive layers")
        layers.append(numbers)
    for i in range(1, len(layers)):
        if layers[i][0] != layers[i - 1][-1] + 1:
            raise ConfigError(f"{where}: part {i} does not start right after part {i - 1}'s last layer")
    if layers and layers[0][0] != 0:
        raise ConfigError(f"{where}: the first part must start at layers.0")
    return [f"layers.{numbers[0]}" for numbers in layers[1:]]
