"""Typed job configuration: one dataclass per TOML section.

Each field here is the single source of truth for an option: its name, type, default,
one-line help (printed by ``--help``) and, where the value is one of a fixed set, its
choices. Loading from TOML and the command line lives in ``manager.py``; the rules a value
must obey live next to the fields, so ``JobConfig.validate()`` checks a config however it
was built (parsed, or assembled in code by a test).

This module must not import torch: ``--help`` and config errors have to be instant.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A bad option value, file or command line; the message is one line naming the fix."""


# The one spelling of each name set that options choose from; the torch objects they stand
# for live above this torch-free floor (torchtitan.distributed.utils.TORCH_DTYPE_MAP,
# torchtitan.distributed.pipeline.get_schedule_class).
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
PIPELINE_SCHEDULES: tuple[str, ...] = (
    "GPipe",
    "1F1B",
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
)


def _opt(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its ``--help`` text and allowed values (for lists: per item)."""
    metadata: dict[str, Any] = {"help": help}
    if choices:
        metadata["choices"] = choices
    if isinstance(default, list):
        frozen = tuple(default)
        return field(default_factory=lambda: list(frozen), metadata=metadata)
    return field(default=default, metadata=metadata)


# --- small type helpers shared with manager.py -------------------------------------------


def optional_inner(tp: Any) -> Any | None:
    """``X`` for ``X | None`` (or ``Optional[X]``), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def list_item(tp: Any) -> Any | None:
    """``X`` for ``list[X]``, else None."""
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0]
    return None


def type_name(tp: Any) -> str:
    inner = optional_inner(tp)
    if inner is not None:
        return f"{type_name(inner)} | None"
    item = list_item(tp)
    if item is not None:
        return f"list[{type_name(item)}]"
    return getattr(tp, "__name__", str(tp))


def matches_type(value: Any, tp: Any) -> bool:
    """isinstance for the handful of option types (bool is not an int; an int is a float)."""
    inner = optional_inner(tp)
    if inner is not None:
        return value is None or matches_type(value, inner)
    item = list_item(tp)
    if item is not None:
        return isinstance(value, list) and all(matches_type(v, item) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (this module uses postponed annotations); cached,
    as resolving them is most of the cost of ``validate`` (callers must not mutate it)."""
    return typing.get_type_hints(cls)


def _plain_text(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 and used as a path: lone surrogates (from
    undecodable bytes on the command line) and NUL would fail later, when the config is saved
    or a file is opened, far from the option that caused it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


# Upper bounds beyond which a value is a typo, not a plan: no model has a 16M-token context,
# and a collective timeout beyond 30 days overflows nothing but hides a hang for a month.
MAX_SEQ_LEN = 2**24
MAX_TIMEOUT_SECONDS = 30 * 24 * 3600
# A microbatch beyond 2**31 tokens fits no device (its activations alone are terabytes), and
# the loader would spin on packing it; a Flight Recorder ring beyond 10**6 entries is
# allocated up front in host memory on every rank (2**40 aborts the process).
MAX_MICROBATCH_TOKENS = 2**31
MAX_TRACE_BUF_SIZE = 10**6


def _check_microbatch(section: Section) -> None:
    tokens = section.local_batch_size * section.seq_len  # type: ignore[attr-defined]
    if tokens > MAX_MICROBATCH_TOKENS:
        section._fail(
            "local_batch_size",
            f"x seq_len = {tokens} tokens per microbatch; more than 2**31 fits no device",
        )


# --- sections ------------------------------------------------------------------------------


class Section:
    """Base of every section: type and choice checks from the field metadata, then ``check``."""

    _section: ClassVar[str] = ""

    def validate(self) -> None:
        hints = field_types(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            tp = hints[f.name]
            if not matches_type(value, tp):
                self._fail(f.name, f"expected {type_name(tp)}")
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, int) and not -(2**63) <= item < 2**63:
                    self._fail(f.name, "out of range (must fit in a 64-bit integer)")
                if isinstance(item, str) and not _plain_text(item):
                    self._fail(
                        f.name, "is not plain text (a NUL character, or undecodable bytes on the command line); use UTF-8"
                    )
            choices = f.metadata.get("choices")
            if choices:
                items = value if isinstance(value, list) else [value]
                for item in items:
                    if item is not None and item not in choices:
                        self._fail(f.name, f"must be one of {', '.join(choices)}")
        self.check()

    def check(self) -> None:
        """Value rules beyond type and choices; overridden per section."""

    # helpers for ``check``
    def _fail(self, key: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{self._section}.{key} = {getattr(self, key)!r}: {message}")

    def _at_least(self, key: str, low: float) -> None:
        if not getattr(self, key) >= low:  # also rejects nan
            self._fail(key, f"must be >= {low}")

    def _positive(self, key: str) -> None:
        if not getattr(self, key) > 0:
            self._fail(key, "must be > 0")

    def _at_most(self, key: str, high: float, why: str = "") -> None:
        if not getattr(self, key) <= high:
            self._fail(key, f"must be <= {high}{why}")

    def _between(self, key: str, low: float, high: float) -> None:
        if not low <= getattr(self, key) <= high:
            self._fail(key, f"must be in [{low}, {high}]")

    def _nonempty(self, *keys: str) -> None:
        for key in keys:
            value = getattr(self, key)
            if isinstance(value, list):
                if any(not v for v in value):
                    self._fail(key, "entries must be non-empty")
            elif not value:
                self._fail(key, "must not be empty")


@dataclass
class Job(Section):
    """Where the run writes its outputs and how it is described."""

    _section: ClassVar[str] = "job"
    config_file: str | None = _opt(None, "TOML file to read options from (CLI options override it)")
    dump_folder: str = _opt("./outputs", "folder for checkpoints, traces and TensorBoard logs")
    description: str = _opt("default job", "free-text description of this run")
    print_config: bool = _opt(True, "print the final config at start on rank 0")
    save_config_file: str | None = _opt(
        None,
        "also write the final config to this file, inside job.dump_folder (JSON if it ends in "
        ".json, else TOML); <dump_folder>/config.toml is always written",
    )
    custom_config_module: str = _opt(
        "",
        "dotted module defining a JobConfig dataclass whose extra fields (sections, or fields "
        "added to existing sections) extend this config; imported before the file is read",
    )

    def check(self) -> None:
        self._nonempty("dump_folder")
        if self.save_config_file is not None:
            self._nonempty("save_config_file")
        _check_module_name(self, "custom_config_module")


@dataclass
class Profiling(Section):
    """PyTorch profiler traces and CUDA memory snapshots."""

    _section: ClassVar[str] = "profiling"
    enable_profiling: bool = _opt(False, "record profiler traces")
    save_traces_folder: str = _opt("profile_traces", "trace folder, inside job.dump_folder")
    profile_freq: int = _opt(10, "record one trace every this many steps")
    profiler_warmup: int = _opt(3, "profiler warmup steps before each active window")
    profiler_active: int = _opt(1, "steps recorded in each trace")
    enable_memory_snapshot: bool = _opt(False, "record CUDA memory history and dump snapshots")
    save_memory_snapshot_folder: str = _opt(
        "memory_snapshot", "memory snapshot folder, inside job.dump_folder"
    )
    memory_snapshot_step: int = _opt(
        -1, "step at which to dump a memory snapshot; -1 = only on OOM"
    )

    def check(self) -> None:
        self._positive("profile_freq")
        self._at_least("profiler_warmup", 0)
        self._at_least("profiler_active", 1)
        if self.profiler_warmup + self.profiler_active > self.profile_freq:
            self._fail(
                "profiler_active", "profiler_warmup + profiler_active must be <= profile_freq"
            )
        self._at_least("memory_snapshot_step", -1)
        self._nonempty("save_traces_folder", "save_memory_snapshot_folder")


@dataclass
class Metrics(Section):
    """Training metrics: console, TensorBoard, Weights & Biases, MFU."""

    _section: ClassVar[str] = "metrics"
    log_freq: int = _opt(10, "log metrics every this many steps")
    enable_tensorboard: bool = _opt(False, "write TensorBoard event files")
    save_tb_folder: str = _opt("tb", "TensorBoard folder, inside job.dump_folder")
    enable_wandb: bool = _opt(False, "log to Weights & Biases")
    wandb_project: str = _opt(
        "", "Weights & Biases project; empty = $WANDB_PROJECT, else torchtitan"
    )
    wandb_mode: str = _opt(
        "",
        "Weights & Biases mode; empty = $WANDB_MODE, else online",
        choices=("", "online", "offline", "disabled"),
    )
    rank_0_only: bool = _opt(True, "only rank 0 logs (else every rank writes its own logs)")
    enable_color_printing: bool = _opt(False, "colour the console metrics line")
    peak_tflops: float = _opt(
        0.0, "peak bf16 TFLOP/s of one device for MFU; 0 = look the GPU up in the peak table"
    )
    enable_jsonl: bool = _opt(
        False,
        "append one JSON record per logged window to <save_jsonl_folder>/rank_<r>.jsonl "
        "(read by scripts/benchmark.py)",
    )
    save_jsonl_folder: str = _opt("metrics_jsonl", "JSONL metrics folder, inside job.dump_folder")

    def check(self) -> None:
        self._positive("log_freq")
        self._nonempty("save_tb_folder", "save_jsonl_folder")
        self._at_least("peak_tflops", 0.0)
        if math.isinf(self.peak_tflops):
            self._fail("peak_tflops", "must be finite")


@dataclass
class Model(Section):
    """Which model to build and the converters applied to it before parallelizing."""

    _section: ClassVar[str] = "model"
    name: str = _opt("llama3", "model family, a key of the model registry")
    flavor: str = _opt("debugmodel", "model size, a key of the family's flavors")
    tokenizer_path: str = _opt(
        "./tests/assets/test_tiktoken.model",
        "tokenizer file (tokenizer.model or tokenizer.json) or a folder holding one; when not "
        "given, model.hf_assets_path's folder is used",
    )
    hf_assets_path: str | None = _opt(
        None,
        "folder of a Hugging Face model's files (tokenizer.json, tokenizer_config.json, "
        "original/tokenizer.model, config.json, *.safetensors), as scripts/download_tokenizer.py "
        "writes it; sets the tokenizer unless model.tokenizer_path is given",
    )
    allow_small_tokenizer: bool = _opt(
        False,
        "train a flavor whose fixed vocabulary is far (> 2x) larger than the tokenizer's, e.g. 8B "
        "shapes with the 2,256-token test tokenizer for benchmarks; off = stop and name the download",
    )
    converters: list[str] = _opt(
        [], "module swaps applied before parallelizing", choices=("float8",)
    )
    print_after_conversion: bool = _opt(False, "print the model after the converters ran")
    attention_backend: str = _opt(
        "auto",
        "SDPA kernel: auto (cuDNN first on Hopper in bf16, else torch's order), or force one",
        choices=("auto", "cudnn", "flash", "efficient", "math"),
    )

    def check(self) -> None:
        self._nonempty("name", "flavor", "tokenizer_path")
        if self.hf_assets_path is not None:
            self._nonempty("hf_assets_path")
        if len(set(self.converters)) != len(self.converters):
            self._fail("converters", "entries must not repeat")


@dataclass
class Optimizer(Section):
    """The optimizer and its hyper-parameters."""

    _section: ClassVar[str] = "optimizer"
    name: str = _opt("AdamW", "optimizer", choices=("AdamW", "Adam"))
    lr: float = _opt(8e-4, "peak learning rate")
    beta1: float = _opt(0.9, "Adam beta1")
    beta2: float = _opt(0.95, "Adam beta2")
    eps: float = _opt(1e-8, "Adam epsilon")
    weight_decay: float = _opt(0.1, "weight decay (decoupled for AdamW)")
    implementation: str = _opt(
        "fused",
        "kernel: fused (falls back where unsupported), foreach or for-loop",
        choices=("fused", "foreach", "for-loop"),
    )

    def check(self) -> None:
        for key in ("lr", "eps"):
            self._positive(key)
            if math.isinf(getattr(self, key)):
                self._fail(key, "must be finite")
        self._between("beta1", 0.0, 1.0)
        self._between("beta2", 0.0, 1.0)
        for key in ("beta1", "beta2"):
            if getattr(self, key) == 1.0:
                self._fail(key, "must be < 1")
        self._at_least("weight_decay", 0.0)
        if math.isinf(self.weight_decay):
            self._fail("weight_decay", "must be finite")


@dataclass
class LRScheduler(Section):
    """Learning-rate schedule: linear warmup, optional stable phase, then decay."""

    _section: ClassVar[str] = "lr_scheduler"
    warmup_steps: int = _opt(200, "steps of linear warmup from ~0 to optimizer.lr")
    decay_ratio: float | None = _opt(
        None, "fraction in [0, 1] of the post-warmup steps spent decaying; none = all of them"
    )
    decay_type: str = _opt("linear", "decay curve", choices=("linear", "cosine", "sqrt"))
    min_lr_factor: float = _opt(0.0, "lr decays to optimizer.lr * min_lr_factor, in [0, 1]")

    def check(self) -> None:
        self._at_least("warmup_steps", 0)
        if self.decay_ratio is not None:
            self._between("decay_ratio", 0.0, 1.0)
        self._between("min_lr_factor", 0.0, 1.0)


@dataclass
class Training(Section):
    """Data, batch shape, step count, precision and reproducibility."""

    _section: ClassVar[str] = "training"
    dataset: str = _opt("c4", "dataset name, a key of the dataset registry")
    dataset_path: str | None = _opt(None, "local path or hub id overriding the dataset's default")
    dataset_text_field: str = _opt("text", "field of each sample holding the text")
    dataset_infinite: bool = _opt(True, "loop over the dataset instead of stopping at its end")
    dataset_shards: int = _opt(
        0,
        "0 = one data shard per dp rank; N > 0 = N fixed shards so the global batch does not "
        "depend on the dp degree (dp must divide N)",
    )
    local_batch_size: int = _opt(8, "samples per data-parallel rank per microstep")
    global_batch_size: int = _opt(
        -1, "samples per optimizer step; -1 = local_batch_size x dp degree (no accumulation)"
    )
    seq_len: int = _opt(2048, "tokens per sample")
    max_norm: float = _opt(1.0, "gradient-norm clipping threshold; <= 0 disables clipping")
    steps: int = _opt(10000, "optimizer steps to train for")
    enable_cpu_offload: bool = _opt(False, "keep FSDP parameters and optimizer state on the CPU")
    mixed_precision_param: str = _opt(
        "bfloat16", "dtype of FSDP's unsharded parameters", choices=("bfloat16", "float32")
    )
    mixed_precision_reduce: str = _opt(
        "float32", "dtype of FSDP's gradient reduce-scatter", choices=("float32", "bfloat16")
    )
    gc_freq: int = _opt(50, "run Python's garbage collector every this many steps")
    seed: int | None = _opt(None, "random seed; none = not seeded")
    deterministic: bool = _opt(False, "use deterministic algorithms (slower)")
    deterministic_warn_only: bool = _opt(
        False, "with deterministic: warn about ops without a deterministic kernel instead of failing"
    )
    dataloader_num_workers: int = _opt(
        0,
        "data loader worker processes: tokenizing and packing move off the training process "
        "(same batches, same resumable state); 0 = in the training process",
    )
    dataloader_persistent_workers: bool = _opt(
        False, "keep the workers alive between iterations (needs dataloader_num_workers > 0)"
    )
    dataloader_pin_memory: bool = _opt(False, "put batches in pinned memory (faster host-to-GPU copy)")
    dataloader_prefetch_factor: int | None = _opt(
        None, "batches each worker loads ahead (needs dataloader_num_workers > 0); none = 2"
    )
    loss_chunk_size: int = _opt(
        0,
        "tokens per chunk of the output projection + cross-entropy, so full fp32 logits are "
        "never materialised (same loss and gradients; a chunk's gradient is written over its bf16 "
        "logits; a size >= a microbatch's tokens is one chunk); 0 = off. Works with PP (the last stage "
        "returns the loss); not with TP (loss parallel shards the logits by vocabulary)",
    )
    device_memory_limit_gib: float = _opt(
        0.0,
        "cap each process's CUDA caching allocator at this many GiB (e.g. 79.1 to size a run "
        "for an 80 GB H100 on a larger card); 0 = the whole device",
    )

    def check(self) -> None:
        self._nonempty("dataset", "dataset_text_field")
        if self.dataset_path is not None:
            self._nonempty("dataset_path")
        self._at_least("dataset_shards", 0)
        self._at_least("local_batch_size", 1)
        gbs = self.global_batch_size
        if gbs != -1 and not (gbs > 0 and gbs % self.local_batch_size == 0):
            self._fail(
                "global_batch_size",
                f"must be -1 or a positive multiple of training.local_batch_size "
                f"({self.local_batch_size})",
            )
        self._at_least("seq_len", 1)
        self._at_most("seq_len", MAX_SEQ_LEN, " (2**24)")
        _check_microbatch(self)
        self._at_least("device_memory_limit_gib", 0.0)
        if math.isinf(self.device_memory_limit_gib):
            self._fail("device_memory_limit_gib", "must be finite (0 = the whole device)")
        if math.isnan(self.max_norm):
            self._fail("max_norm", "must be a number (<= 0 disables clipping)")
        self._at_least("steps", 1)
        self._at_least("gc_freq", 1)
        self._at_least("loss_chunk_size", 0)
        if self.seed is not None and not 0 <= self.seed < 2**63:
            self._fail("seed", "must be in [0, 2**63)")
        self._at_least("dataloader_num_workers", 0)
        if self.dataloader_prefetch_factor is not None:
            self._at_least("dataloader_prefetch_factor", 1)
        if self.dataloader_num_workers == 0:
            for key in ("dataloader_persistent_workers", "dataloader_prefetch_factor"):
                if getattr(self, key) not in (False, None):
                    self._fail(key, "needs training.dataloader_num_workers > 0")

    @property
    def chunked_loss(self) -> bool:
        """Whether the output projection and the loss run in chunks of ``loss_chunk_size``
        tokens (the one reading of "is the loss chunked" for builders and the planner)."""
        return self.loss_chunk_size > 0


@dataclass
class Parallelism(Section):
    """Degrees of each parallelism and their settings; degrees multiply to the world size."""

    _section: ClassVar[str] = "parallelism"
    data_parallel_replicate_degree: int = _opt(1, "DDP / HSDP replica groups")
    data_parallel_shard_degree: int = _opt(-1, "FSDP shard group size; -1 = what is left over")
    tensor_parallel_degree: int = _opt(1, "tensor parallel degree")
    pipeline_parallel_degree: int = _opt(1, "pipeline parallel stages (over ranks)")
    context_parallel_degree: int = _opt(1, "context parallel degree (sequence split)")
    expert_parallel_degree: int = _opt(
        1, "expert parallel degree: MoE routed experts sharded over this many of the dp_shard x cp ranks"
    )
    fsdp_reshard_after_forward: str = _opt(
        "default",
        "free unsharded params after forward: default (yes unless PP), always, never",
        choices=("default", "always", "never"),
    )
    disable_loss_parallel: bool = _opt(False, "gather logits instead of a vocab-parallel loss")
    enable_async_tensor_parallel: bool = _opt(
        False, "overlap TP comms with compute (needs compile)"
    )
    enable_compiled_autograd: bool = _opt(
        False, "compile the backward graph with compiled autograd"
    )
    pipeline_parallel_schedule: str = _opt(
        "1F1B",
        f"schedule: {', '.join(PIPELINE_SCHEDULES)} (any name when pipeline_parallel_schedule_csv "
        "is set)",
    )
    pipeline_parallel_schedule_csv: str = _opt("", "CSV file describing a custom schedule")
    pipeline_parallel_split_points: list[str] = _opt(
        [], "module names starting each stage after the first, e.g. layers.4,layers.8"
    )
    pipeline_parallel_layers_per_stage: int | None = _opt(
        None, "transformer layers per stage, instead of split points"
    )
    pipeline_parallel_microbatch_size: int = _opt(1, "samples per pipeline microbatch")
    pipeline_parallel_microbatches: int | None = _opt(
        None, "microbatch count; overrides pipeline_parallel_microbatch_size when set"
    )
    context_parallel_rotate_method: str = _opt(
        "allgather", "how CP exchanges keys/values", choices=("allgather", "alltoall")
    )
    context_parallel_load_balance: bool = _opt(True, "reorder the sequence to balance causal work")
    pipeline_parallel_first_stage_less_layers: int = _opt(
        0,
        "the automatic stage split counts the embedding as this many layers of the first stage "
        "(TorchTitan's weighting; its default is 1, 0 here = an even split)",
    )
    pipeline_parallel_last_stage_less_layers: int = _opt(
        0, "the same for the output projection on the last stage (TorchTitan's default is 1)"
    )

    SCHEDULES: ClassVar[tuple[str, ...]] = PIPELINE_SCHEDULES

    def check(self) -> None:
        for key in (
            "data_parallel_replicate_degree",
            "tensor_parallel_degree",
            "pipeline_parallel_degree",
            "context_parallel_degree",
            "expert_parallel_degree",
        ):
            self._at_least(key, 1)
        if self.data_parallel_shard_degree != -1:
            if not self.data_parallel_shard_degree >= 1:
                self._fail("data_parallel_shard_degree", "must be -1 (auto) or >= 1")
        if not self.pipeline_parallel_schedule_csv:
            if self.pipeline_parallel_schedule not in self.SCHEDULES:
                self._fail(
                    "pipeline_parallel_schedule",
                    f"must be one of {', '.join(self.SCHEDULES)} "
                    "(or set pipeline_parallel_schedule_csv)",
                )
        self._nonempty("pipeline_parallel_split_points")
        if self.pipeline_parallel_layers_per_stage is not None:
            self._at_least("pipeline_parallel_layers_per_stage", 1)
            if self.pipeline_parallel_split_points:
                self._fail(
                    "pipeline_parallel_layers_per_stage",
                    "set either this or pipeline_parallel_split_points, not both",
                )
        self._at_least("pipeline_parallel_microbatch_size", 1)
        if self.pipeline_parallel_microbatches is not None:
            self._at_least("pipeline_parallel_microbatches", 1)
        for key in ("pipeline_parallel_first_stage_less_layers", "pipeline_parallel_last_stage_less_layers"):
            self._at_least(key, 0)
            explicit = self.pipeline_parallel_split_points or self.pipeline_parallel_layers_per_stage
            if getattr(self, key) > 1 and explicit:
                self._fail(
                    key,
                    "weights the automatic stage split only; with pipeline_parallel_split_points or "
                    "pipeline_parallel_layers_per_stage set, leave it at 0 (or TorchTitan's 1)",
                )


@dataclass
class Checkpoint(Section):
    """Distributed checkpointing (DCP): what to save, when, and what to load."""

    _section: ClassVar[str] = "checkpoint"
    enable: bool = _opt(False, "save and resume checkpoints")
    folder: str = _opt("checkpoint", "checkpoint folder, inside job.dump_folder")
    interval: int = _opt(500, "save every this many steps")
    initial_load_path: str | None = _opt(
        None, "checkpoint to start from when the folder has none"
    )
    initial_load_model_weights_only: bool = _opt(
        True, "load only model weights from initial_load_path"
    )
    model_weights_only: bool = _opt(False, "the last checkpoint holds model weights only")
    export_dtype: str = _opt(
        "float32",
        "dtype of a model_weights_only checkpoint",
        choices=DTYPE_NAMES,
    )
    async_mode: str = _opt(
        "disabled",
        "save in the background: disabled, async, async_with_pinned_mem",
        choices=("disabled", "async", "async_with_pinned_mem"),
    )
    keep_latest_k: int = _opt(10, "keep only the newest k checkpoints; 0 = keep all")
    load_step: int = _opt(-1, "step to resume from; -1 = the latest")
    exclude_from_loading: list[str] = _opt([], "state keys not to load, e.g. optimizer,dataloader")
    create_seed_checkpoint: bool = _opt(
        False, "write a step-0 checkpoint of the initialised model and exit (one rank)"
    )
    enable_first_step_checkpoint: bool = _opt(
        False, "also save right after the first step (checks that saving works on a new cluster)"
    )
    load_only: bool = _opt(
        False, "load checkpoints as usual but never save one during training"
    )
    fail_on_save_error: bool = _opt(True, "stop training if a save fails (else log and go on)")
    initial_load_in_hf: bool = _opt(
        False,
        "initial_load_path (when unset: model.hf_assets_path, as in TorchTitan) is a Hugging Face "
        "folder (model.safetensors, or shards with model.safetensors.index.json), read through the "
        "model family's state-dict adapter and resharded to this run's layout",
    )
    last_save_in_hf: bool = _opt(
        False,
        "write the last step's model as a Hugging Face folder (safetensors shards, index, "
        "config.json) in <folder>/step-N-hf instead of a DCP checkpoint; needs "
        "last_save_model_only (alias of model_weights_only), dtype from export_dtype",
    )

    def check(self) -> None:
        self._nonempty("folder", "exclude_from_loading")
        if self.initial_load_path is not None:
            self._nonempty("initial_load_path")
        self._at_least("interval", 1)
        self._at_least("keep_latest_k", 0)
        self._at_least("load_step", -1)
        if self.create_seed_checkpoint and not self.enable:
            self._fail("create_seed_checkpoint", "needs checkpoint.enable = true")
        if self.initial_load_in_hf and not self.enable:
            self._fail("initial_load_in_hf", "needs checkpoint.enable = true")
        if self.last_save_in_hf and not (self.enable and self.model_weights_only):
            self._fail(
                "last_save_in_hf",
                "needs checkpoint.enable = true and checkpoint.last_save_model_only = true "
                "(a Hugging Face folder holds the model only)",
            )


@dataclass
class Validation(Section):
    """Periodic validation: the loss (and perplexity) on a held-out dataset, no gradients."""

    _section: ClassVar[str] = "validation"
    enable: bool = _opt(False, "compute the loss on a held-out dataset every validation.freq steps")
    dataset: str = _opt(
        "c4_validation", "held-out dataset, a key of the dataset registry (c4_validation: C4's validation split)"
    )
    dataset_path: str | None = _opt(None, "local path or hub id overriding the dataset's default")
    local_batch_size: int = _opt(8, "samples per data-parallel rank per validation batch")
    seq_len: int = _opt(2048, "tokens per validation sample")
    freq: int = _opt(10, "validate after every this many training steps")
    steps: int = _opt(-1, "batches per validation (per data-parallel rank); -1 = the whole dataset")

    def check(self) -> None:
        self._nonempty("dataset")
        if self.dataset_path is not None:
            self._nonempty("dataset_path")
        self._at_least("local_batch_size", 1)
        self._at_least("seq_len", 1)
        self._at_most("seq_len", MAX_SEQ_LEN, " (2**24)")
        _check_microbatch(self)
        self._at_least("freq", 1)
        if self.steps != -1 and self.steps < 1:
            self._fail("steps", "must be -1 (the whole dataset) or >= 1")


@dataclass
class ActivationCheckpoint(Section):
    """Activation checkpointing: trade recompute for memory."""

    _section: ClassVar[str] = "activation_checkpoint"
    mode: str = _opt(
        "selective",
        'none, full, selective, or auto (the planner picks per-layer AC, loss chunks and CPU offload '
        "for the fastest predicted step that fits the device memory; docs/planning.md)",
        choices=("none", "full", "selective", "auto"),
    )
    selective_ac_option: str = _opt(
        "2", '"op" (save selected op outputs) or N (checkpoint every N-th block)'
    )
    op_saved_matmuls: str = _opt(
        "every_other",
        'op AC: matmul outputs to save: "every_other" (half their memory, recomputes half), "all", '
        'or "none" (only attention\'s output: full AC without rerunning attention, for long sequences)',
        choices=("every_other", "all", "none"),
    )
    op_ac_layers: int = _opt(
        -1, "op AC on layers 0..N-1 only, full AC on the later ones (less memory than op); -1 = all"
    )
    later_layers: str = _opt(
        "full",
        'with op_ac_layers >= 0, AC of the later layers: "full", "attention" (op AC saving '
        "attention's output only: full AC's matmul reruns without attention's), or \"none\" (no AC: "
        "memory left over after op AC spent on speed)",
        choices=("full", "attention", "none"),
    )

    cpu_offload_layers: int = _opt(
        0,
        "keep what N blocks, spread evenly from block 0 (the last two only when more are asked for), "
        "save for backward in pinned host memory from their forward to their backward (copies on a "
        "side stream, overlapped with compute); 0 = none",
    )

    def check(self) -> None:
        self._at_least("cpu_offload_layers", 0)
        option = self.selective_ac_option
        if option != "op" and not (option.isdigit() and int(option) >= 1):
            self._fail("selective_ac_option", 'must be "op" or a positive integer such as "2"')
        self._at_least("op_ac_layers", -1)
        if self.op_ac_layers >= 0 and not (self.mode == "selective" and option == "op"):
            self._fail(
                "op_ac_layers",
                'applies to mode = "selective" with selective_ac_option = "op"; set it to -1',
            )
        if self.later_layers != "full" and self.op_ac_layers < 0:
            self._fail("later_layers", "applies to the layers after op_ac_layers; set op_ac_layers >= 0 or leave it full")


@dataclass
class Compile(Section):
    """torch.compile of model blocks and loss."""

    _section: ClassVar[str] = "compile"
    enable: bool = _opt(False, "torch.compile the components below")
    components: list[str] = _opt(
        ["model", "loss"], "what to compile: model (per block), loss", choices=("model", "loss")
    )
    backend: str = _opt("inductor", "torch.compile backend")

    def check(self) -> None:
        self._nonempty("backend")
        if len(set(self.components)) != len(self.components):
            self._fail("components", "entries must not repeat")


@dataclass
class Float8(Section):
    """Float8 training settings (enable it with model.converters = ["float8"])."""

    _section: ClassVar[str] = "float8"
    enable_fsdp_float8_all_gather: bool = _opt(False, "all-gather FSDP weights in float8")
    precompute_float8_dynamic_scale_for_fsdp: bool = _opt(
        False, "one fused amax for all float8 weights after each step"
    )
    recipe_name: str | None = _opt(
        None,
        "scaling recipe: tensorwise, rowwise, rowwise_with_gw_hp; none = tensorwise",
        choices=("tensorwise", "rowwise", "rowwise_with_gw_hp"),
    )
    filter_fqns: list[str] = _opt(
        ["output"], "linear layers (by name fragment) kept in high precision"
    )
    emulate: bool = _opt(False, "emulate float8 matmuls (for CPU tests and older GPUs)")
    force_recompute_fp8_weight_in_bwd: bool = _opt(
        False, "recompute the float8 weight in backward instead of saving it"
    )

    def check(self) -> None:
        self._nonempty("filter_fqns")
        if self.precompute_float8_dynamic_scale_for_fsdp and not self.enable_fsdp_float8_all_gather:
            self._fail(
                "precompute_float8_dynamic_scale_for_fsdp",
                "needs float8.enable_fsdp_float8_all_gather = true",
            )
        if self.enable_fsdp_float8_all_gather and self.recipe_name not in (None, "tensorwise"):
            self._fail(
                "enable_fsdp_float8_all_gather", "works only with recipe_name tensorwise (or none)"
            )


@dataclass
class Comm(Section):
    """Collective communication timeouts and the NCCL Flight Recorder."""

    _section: ClassVar[str] = "comm"
    init_timeout_seconds: int = _opt(300, "collective timeout until the first step ends")
    train_timeout_seconds: int = _opt(100, "collective timeout after the first step")
    trace_buf_size: int = _opt(20000, "Flight Recorder entries kept per rank; 0 = off")
    save_traces_folder: str = _opt("comm_traces", "Flight Recorder trace folder, inside job.dump_folder")
    save_traces_file_prefix: str = _opt(
        "rank_", "Flight Recorder trace files are <prefix><rank> (scripts/analyze_flight_recorder.py reads any)"
    )
    mode: str = _opt(
        "default",
        "default: train; fake_backend: plan instead (the dry run of scripts/plan.py for "
        "$WORLD_SIZE ranks on a fake process group, as DRY_RUN=1 ./run_train.sh does)",
        choices=("default", "fake_backend", "local_tensor"),
    )

    def check(self) -> None:
        if self.mode == "local_tensor":
            self._fail(
                "mode", "LocalTensor simulation is not built here; use fake_backend (the dry-run planner)"
            )
        for key in ("init_timeout_seconds", "train_timeout_seconds"):
            self._positive(key)
            self._at_most(key, MAX_TIMEOUT_SECONDS, " (30 days)")
        self._at_least("trace_buf_size", 0)
        self._at_most("trace_buf_size", MAX_TRACE_BUF_SIZE, " entries (each is kept in host memory)")
        self._nonempty("save_traces_folder", "save_traces_file_prefix")
        if "/" in self.save_traces_file_prefix or self.save_traces_file_prefix[-1:].isdigit():
            self._fail("save_traces_file_prefix", "must be a file name start without '/' that does not end in a digit")


@dataclass
class MemoryEstimation(Section):
    """Estimate each rank's peak memory before training (docs/planning.md)."""

    _section: ClassVar[str] = "memory_estimation"
    enable: bool = _opt(
        False,
        "before training, rank 0 runs the planner's dry run of this config for the launch's world "
        "size (meta model, fake process group) and logs each rank role's memory estimate",
    )


@dataclass
class FaultTolerance(Section):
    """Preemption signals and non-finite steps (docs/fault_tolerance.md)."""

    _section: ClassVar[str] = "fault_tolerance"
    non_finite_policy: str = _opt(
        "skip",
        "on a non-finite loss or grad norm: skip the step (no optimizer update) or stop with "
        "a checkpoint of the last good state",
        choices=("skip", "stop"),
    )
    max_consecutive_skips: int = _opt(
        3, "with policy skip: stop once more than this many steps in a row were non-finite"
    )
    preemption_signals: list[str] = _opt(
        ["SIGTERM", "SIGUSR1"],
        "signals that finish the current step, save a checkpoint and exit; empty = default handling",
        choices=("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"),
    )
    preemption_grace_seconds: float = _opt(
        120.0, "after a preemption signal, exit anyway once this many seconds pass; 0 = no limit"
    )
    preemption_exit_code: int = _opt(
        3, "exit code after a preemption checkpoint (3..125; 2 is bad input, 4 non-finite stop)"
    )

    def check(self) -> None:
        self._at_least("max_consecutive_skips", 0)
        self._at_least("preemption_grace_seconds", 0.0)
        if math.isinf(self.preemption_grace_seconds):
            self._fail("preemption_grace_seconds", "must be finite; use 0 for no limit")
        code = self.preemption_exit_code
        if not 3 <= code <= 125 or code in (4, 5):
            self._fail("preemption_exit_code", "must be in [3, 125] and not 4 or 5 (used for other exits)")


@dataclass
class Experimental(Section):
    """Extension hooks."""

    _section: ClassVar[str] = "experimental"
    custom_import: str = _opt("", "module to import before building (registers models/datasets)")

    def check(self) -> None:
        _check_module_name(self, "custom_import")


def _check_module_name(section: Section, key: str) -> None:
    name = getattr(section, key)
    if name and not all(part.isidentifier() for part in name.split(".")):
        section._fail(key, "must be a dotted module name such as my_pkg.my_module")


@dataclass
class JobConfig:
    """The whole run's configuration: one attribute per TOML section."""

    job: Job = field(default_factory=Job)
    profiling: Profiling = field(default_factory=Profiling)
    metrics: Metrics = field(default_factory=Metrics)
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    validation: Validation = field(default_factory=Validation)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    float8: Float8 = field(default_factory=Float8)
    comm: Comm = field(default_factory=Comm)
    memory_estimation: MemoryEstimation = field(default_factory=MemoryEstimation)
    fault_tolerance: FaultTolerance = field(default_factory=FaultTolerance)
    experimental: Experimental = field(default_factory=Experimental)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{section: {key: value}}``, deep-copied."""
        return asdict(self)

    def sections(self) -> dict[str, Section]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self) -> None:
        """Every option's own rule, then the rules that tie sections together.

        Checks that need the world size (degrees multiplying to it, dp dividing
        training.dataset_shards or the global batch) happen when the trainer builds ParallelDims.
        """
        for section in self.sections().values():
            section.validate()
        ckpt = self.checkpoint
        if ckpt.initial_load_in_hf and not (ckpt.initial_load_path or self.model.hf_assets_path):
            raise ConfigError(
                "checkpoint.initial_load_in_hf = True: set checkpoint.initial_load_path (or "
                "model.hf_assets_path) to the Hugging Face folder to start from"
            )
        training, par = self.training, self.parallelism
        if par.pipeline_parallel_degree > 1:
            what = "pipeline_parallel_microbatch_size"
            if par.pipeline_parallel_microbatches is not None:
                what = "pipeline_parallel_microbatches"
            count = getattr(par, what)
            if training.local_batch_size % count != 0:
                raise ConfigError(
                    f"training.local_batch_size = {training.local_batch_size} must be divisible "
                    f"by parallelism.{what} = {count}"
                )
        if training.chunked_loss and par.tensor_parallel_degree > 1:
            raise ConfigError(
                "training.loss_chunk_size > 0 does not compose with tensor parallelism "
                "(vocab-sharded logits: loss parallel); set training.loss_chunk_size = 0"
            )
        cp = par.context_parallel_degree
        if cp > 1:
            chunks = 2 * cp if par.context_parallel_load_balance else cp
            if training.seq_len % chunks != 0:
                raise ConfigError(
                    f"training.seq_len = {training.seq_len} must be divisible by {chunks} "
                    f"(context_parallel_degree {cp}"
                    + (" x 2 for load balancing)" if par.context_parallel_load_balance else ")")
                )
