"""Float8 training through torchao, as a model converter.

A *model converter* rewrites a model on the meta device before any parallelism is applied,
and may act again after each optimizer step. The trainer does not know which converters
exist: it calls

    converters = build_model_converters(job_config, parallel_dims)
    converters.convert(model)                      # before parallelize_fn
    ...
    optimizers.step(); converters.post_optimizer_hook(model_parts)

``model.converters = ["float8"]`` swaps ``nn.Linear`` for torchao's ``Float8Linear``, which
casts input, weight and output gradient to float8 right before each of its three matmuls and
keeps the weight itself (and so the optimizer state and the checkpoint) in high precision.
Because the swap happens before sharding, TP plans, FSDP and compile see Float8Linear
modules; the parameter names do not change, so checkpoints load with or without float8.

Which linears are converted: every ``nn.Linear`` whose name contains none of
``float8.filter_fqns`` (default: the output projection, whose accuracy matters most for the
loss) and whose in/out features are both multiples of 16 (what float8 matmul kernels need).
Everything skipped is logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from torchtitan.config import ConfigError, JobConfig
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.tools.logging import logger

__all__ = [
    "MIN_TORCHAO_VERSION",
    "Float8Converter",
    "ModelConverter",
    "ModelConverters",
    "build_model_converters",
    "check_float8_device",
    "cpu_rowwise_float8",
    "cpu_rowwise_scaled_mm",
    "float8_module_filter",
    "native_cpu_float8_matmuls",
    "register_model_converter",
]

# The oldest torchao this converter is tested with (0.17 on the GPU machine, 0.18 on CPU);
# every API used here (Float8LinearConfig.from_recipe_name with all three recipes, the
# float8 TP plans, precompute_float8_dynamic_scale_for_fsdp) is present in both.
MIN_TORCHAO_VERSION = (0, 17)
RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
# float8 matmuls (torch._scaled_mm) exist from Ada / Hopper on: compute capability 8.9.
MIN_CUDA_CAPABILITY = (8, 9)


class ModelConverter(Protocol):
    """What a converter offers the trainer."""

    def convert(self, model: nn.Module) -> None: ...

    def post_optimizer_hook(self, model_parts: list[nn.Module]) -> None: ...


_REGISTRY: dict[str, Callable[[JobConfig, ParallelDims], ModelConverter]] = {}


def register_model_converter(name: str, factory: Callable[[JobConfig, ParallelDims], ModelConverter]) -> None:
    """Make ``name`` usable in ``model.converters`` (e.g. from ``experimental.custom_import``)."""
    if name in _REGISTRY:
        raise ValueError(f"model converter {name!r} is already registered")
    _REGISTRY[name] = factory


class ModelConverters:
    """The converters of one run, applied in the order ``model.converters`` lists them."""

    def __init__(self, converters: list[ModelConverter]):
        self.converters = converters

    def convert(self, model: nn.Module) -> None:
        for converter in self.converters:
            converter.convert(model)

    def post_optimizer_hook(self, model_parts: list[nn.Module]) -> None:
        for converter in self.converters:
            converter.post_optimizer_hook(model_parts)


def build_model_converters(job_config: JobConfig, parallel_dims: ParallelDims) -> ModelConverters:
    """Build the converters named by ``model.converters``; unknown names are a ConfigError."""
    converters = []
    for name in job_config.model.converters:
        if name not in _REGISTRY:
            raise ConfigError(
                f"model.converters: unknown converter {name!r}; known: {sorted(_REGISTRY)}"
            )
        converters.append(_REGISTRY[name](job_config, parallel_dims))
    return ModelConverters(converters)


# ---- float8 ----------------------------------------------------------------------------
def _version_tuple(version: str) -> tuple[int, ...]:
    """'0.17.0+cu128' -> (0, 17, 0); non-numeric tails (dev, rc) are ignored."""
    parts = []
    for piece in version.split("+")[0].split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def _import_torchao() -> Any:
    """torchao.float8, or a ConfigError naming the version to install."""
    need = ".".join(map(str, MIN_TORCHAO_VERSION))
    try:
        import torchao
        import torchao.float8 as float8
    except ImportError as e:
        raise ConfigError(
            f"model.converters float8 needs torchao >= {need}: pip install 'torchao>={need}' ({e})"
        ) from None
    version = getattr(torchao, "__version__", "0")
    if _version_tuple(version) < MIN_TORCHAO_VERSION or not hasattr(
        float8.Float8LinearConfig, "from_recipe_name"
    ):
        raise ConfigError(
            f"model.converters float8 needs torchao >= {need}, found {version}: "
            f"pip install -U 'torchao>={need}'"
        )
    return float8


def check_float8_device(emulate: bool, device_type: str, capability: tuple[int, int] | None = None) -> None:
    """Refuse float8 matmuls on a CUDA GPU older than SM 8.9 (before it wastes GPU time).

    CPUs are allowed: torch._scaled_mm has a CPU kernel, and ``emulate`` works everywhere.
    """
    if emulate or device_type != "cuda":
        return
    if capability is None:
        capability = torch.cuda.get_device_capability()
    if tuple(capability) < MIN_CUDA_CAPABILITY:
        raise ConfigError(
            f"float8 matmuls need a CUDA GPU with compute capability >= 8.9 (H100, L4, RTX 40xx); "
            f"this one is {capability[0]}.{capability[1]}: set float8.emulate = true to test the "
            "float8 path without float8 matmuls, or drop 'float8' from model.converters"
        )


@functools.cache
def cpu_rowwise_scaled_mm(onednn: bool) -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes row-wise scales, through oneDNN or
    through torch's own kernel: torch 2.13 does (its own kernel), 2.11 does neither ("only
    supports per-tensor scaling for CPU backend")."""
    a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
    with torch.backends.mkldnn.flags(enabled=onednn):
        try:
            torch._scaled_mm(a, a.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.bfloat16)
        except RuntimeError:
            return False
    return True


def cpu_rowwise_float8() -> bool:
    """Whether the rowwise recipes can run real float8 matmuls on this torch's CPU at all."""
    return cpu_rowwise_scaled_mm(onednn=False) or cpu_rowwise_scaled_mm(onednn=True)


@contextlib.contextmanager
def native_cpu_float8_matmuls(recipe_name: str | None = None) -> Iterator[bool]:
    """Run CPU float8 matmuls on torch's own kernel instead of oneDNN's, where torch's
    handles the recipe's scales; yields whether it does.

    On CPUs with AVX512-FP16 / AMX oneDNN takes float8 x float8 matmuls and serves them
    with its reference kernel, ~600x slower than torch's (docs/float8.md). Turning oneDNN
    off affects CPU matmuls only (bf16 ones lose oneDNN's AMX kernels); both float8 kernels
    dequantize and accumulate in fp32. For tests and CPU experiments, not the trainer.
    """
    native = (recipe_name or "tensorwise") == "tensorwise" or cpu_rowwise_scaled_mm(onednn=False)
    with torch.backends.mkldnn.flags(enabled=not native):
        yield native


def float8_module_filter(
    filter_fqns: list[str], skipped: list[str] | None = None, tp_degree: int = 1
) -> Callable[[nn.Module, str], bool]:
    """The ``module_filter_fn`` for ``convert_to_float8_training``: which linears to convert.

    A linear is skipped when its name contains one of ``filter_fqns``, or when an in/out
    dimension is not a multiple of ``16 * tp_degree``: float8 matmuls need multiples of 16,
    and tensor parallelism hands each rank a ``1/tp_degree`` slice of one of the two dims
    (a 176-wide FFN under TP 2 multiplies 88-wide shards, which ``_scaled_mm`` refuses).
    The reason is appended to ``skipped``.
    """
    multiple = 16 * tp_degree

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        matched = [f for f in filter_fqns if f in fqn]
        if matched:
            reason = f"{fqn} (filter_fqns {matched[0]!r})"
        elif module.in_features % multiple or module.out_features % multiple:
            reason = f"{fqn} ({module.in_features}x{module.out_features}, not multiples of {multiple})"
        else:
            return True
        if skipped is not None:
            skipped.append(reason)
        return False

    return keep


class Float8Converter:
    """``model.converters = ["float8"]``: see the module docstring and docs/float8.md."""

    def __init__(self, job_config: JobConfig, parallel_dims: ParallelDims, device_type: str | None = None):
        cfg = job_config.float8
        float8 = _import_torchao()
        if device_type is None:
            from torchtitan.distributed.utils import device_type as default_device_type

            device_type = default_device_type
        check_float8_device(cfg.emulate, device_type)

        self.recipe_name = cfg.recipe_name or "tensorwise"
        if self.recipe_name not in RECIPES:
            raise ConfigError(f"float8.recipe_name {cfg.recipe_name!r} is not one of {RECIPES}")
        rowwise = self.recipe_name != "tensorwise"
        if rowwise and cfg.enable_fsdp_float8_all_gather:
            raise ConfigError(
                f"float8.enable_fsdp_float8_all_gather works only with the tensorwise recipe, "
                f"not {self.recipe_name}: turn it off or set float8.recipe_name = tensorwise"
            )
        if cfg.precompute_float8_dynamic_scale_for_fsdp and not cfg.enable_fsdp_float8_all_gather:
            raise ConfigError(
                "float8.precompute_float8_dynamic_scale_for_fsdp needs "
                "float8.enable_fsdp_float8_all_gather = true"
            )
        if rowwise and parallel_dims.tp_enabled:
            # torchao's float8 TP plans assume tensorwise scales; with plain TP plans a rowwise
            # Float8Linear would cast DTensor shards per row of the *local* shard only.
            raise ConfigError(
                f"float8.recipe_name {self.recipe_name} does not compose with tensor parallelism "
                "in this torchtitan; use float8.recipe_name = tensorwise with "
                "parallelism.tensor_parallel_degree > 1"
            )
        if rowwise and device_type == "cpu" and not cfg.emulate:
            if not cpu_rowwise_float8():
                raise ConfigError(
                    f"float8.recipe_name {self.recipe_name} needs row-wise scaled float8 matmuls, "
                    f"which torch {torch.__version__}'s CPU kernels lack (torch >= 2.13 has them): "
                    "use float8.recipe_name = tensorwise, set float8.emulate = true, or run on a GPU"
                )

        # Float8 all-gather only means something where FSDP shards the weights.
        self.fsdp_float8_all_gather = cfg.enable_fsdp_float8_all_gather and parallel_dims.fsdp_enabled
        if cfg.enable_fsdp_float8_all_gather and not self.fsdp_float8_all_gather:
            logger.info("float8: enable_fsdp_float8_all_gather has no effect without FSDP (dp_shard = 1)")
        self.precompute_scale = self.fsdp_float8_all_gather and cfg.precompute_float8_dynamic_scale_for_fsdp

        if rowwise:
            config = float8.Float8LinearConfig.from_recipe_name(self.recipe_name)
            config = dataclasses.replace(config, emulate=cfg.emulate)
        else:
            config = float8.Float8LinearConfig(
                enable_fsdp_float8_all_gather=self.fsdp_float8_all_gather, emulate=cfg.emulate
            )
        if cfg.force_recompute_fp8_weight_in_bwd:  # deprecated (a no-op) in recent torchao
            config = dataclasses.replace(config, force_recompute_fp8_weight_in_bwd=True)
        self.config = config
        self.filter_fqns = list(cfg.filter_fqns)
        self.tp_degree = parallel_dims.tp
        # The weight-gradient matmul contracts over this rank's tokens: a multiple of 16 too.
        seq_per_rank = job_config.training.seq_len // parallel_dims.cp
        if not cfg.emulate and seq_per_rank % 16:
            raise ConfigError(
                f"float8 needs training.seq_len / context_parallel_degree ({seq_per_rank}) to be "
                "a multiple of 16 (float8 matmuls contract over the tokens in backward); pick "
                "another training.seq_len"
            )
        self._float8 = float8
        self._precompute = float8.precompute_float8_dynamic_scale_for_fsdp

    def convert(self, model: nn.Module) -> None:
        """Swap the selected ``nn.Linear`` modules of ``model`` for Float8Linear, in place."""
        skipped: list[str] = []
        self._float8.convert_to_float8_training(
            model,
            config=self.config,
            module_filter_fn=float8_module_filter(self.filter_fqns, skipped, self.tp_degree),
        )
        converted = [n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"]
        logger.info(
            f"float8 ({self.recipe_name}, fsdp float8 all-gather {self.fsdp_float8_all_gather}, "
            f"emulate {self.config.emulate}): converted {len(converted)} linear layers"
        )
        if skipped:
            logger.info(f"float8: kept in high precision: {', '.join(skipped)}")
        if not converted:
            logger.warning("float8: no linear layer was converted (see filter_fqns and the dims above)")

    def post_optimizer_hook(self, model_parts: list[nn.Module]) -> None:
        """With float8 all-gather, compute next step's weight scales in one all-reduce."""
        if not self.precompute_scale:
            return
        for model in model_parts:
            self._precompute(model)


register_model_converter("float8", Float8Converter)
