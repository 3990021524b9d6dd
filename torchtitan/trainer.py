"""The trainer: build everything from a JobConfig, then run the loop.

Launched by torchtitan/train.py (``python -m torchtitan.train``). Build order (the legal one, see docs/composability.md): config → process group and mesh →
tokenizer and data → model on meta → parallelize (TP, AC, compile, FSDP/DDP) → materialise
and init → optimizer and lr schedule → loop.
"""

from __future__ import annotations

import gc
import importlib
import os
import time
from typing import Any, Iterator

import torch
from torch.distributed.tensor import DTensor

from torchtitan.components.checkpoint import CheckpointManager, CheckpointSettings
from torchtitan.components.chunked_loss import labels_for_loss
from torchtitan.components.data import build_dataloader
from torchtitan.components.fault_tolerance import (
    FaultInjector,
    NonFiniteError,
    Preempted,
    PreemptionHandler,
    StepGuard,
)
from torchtitan.components.float8 import build_model_converters
from torchtitan.components.loss import build_loss_fn
from torchtitan.components.lr_scheduler import LRScheduleSettings, build_lr_schedulers
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import OptimizerSettings, build_optimizers
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.config import JobConfig
from torchtitan.distributed import utils as dist_utils
from torchtitan.distributed.context_parallel import cp_context
from torchtitan.distributed.layout import validate_layout
from torchtitan.distributed.pipeline import pipeline_step, share_last_stage_loss
from torchtitan.models import check_model_config, get_model_args, get_model_spec
from torchtitan.tools.device_info import limit_device_memory, peak_flops
from torchtitan.tools.flight_recorder import dump_trace, trace_dir
from torchtitan.tools.logging import logger
from torchtitan.tools.profiling import MemorySnapshotter, maybe_enable_profiling


class Trainer:
    def __init__(self, job_config: JobConfig):
        self.job_config = cfg = job_config
        if cfg.experimental.custom_import:
            importlib.import_module(cfg.experimental.custom_import)

        # The layout first, from torchrun's WORLD_SIZE (or the caller's process group): a bad
        # one is refused before any rendezvous (which on a multi-node job waits for every
        # node) or device is touched.
        if torch.distributed.is_initialized():
            expected_world = torch.distributed.get_world_size()
        else:
            expected_world = int(os.environ.get("WORLD_SIZE", "1"))
        layout = validate_layout(cfg, expected_world)
        check_model_config(cfg)

        # Process group, device, mesh.
        world_size = dist_utils.init_distributed(
            init_timeout_seconds=cfg.comm.init_timeout_seconds,
            trace_buf_size=cfg.comm.trace_buf_size,
            dump_folder=cfg.job.dump_folder,
        )
        if world_size != expected_world:  # a process group made by the caller
            layout = validate_layout(cfg, world_size)
        self.rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        dev = dist_utils.device_type
        self.device = torch.device(f"{dev}:{local_rank}" if dev == "cuda" else dev)
        limit_device_memory(self.device, cfg.training.device_memory_limit_gib)
        p = cfg.parallelism
        self.parallel_dims = pd = layout.parallel_dims
        self.world_mesh = pd.build_mesh(dev)
        dp_rank, dp_degree = pd.dp_rank_and_size(self.world_mesh)
        self.seed = dist_utils.set_determinism(
            self.world_mesh, self.device, cfg.training.seed, cfg.training.deterministic
        )
        self._resolve_cpu_precision(cfg)
        t = cfg.training
        global_batch = layout.global_batch
        self.grad_accumulation_steps = layout.grad_accumulation_steps
        self.global_batch_size = global_batch

        # Tokenizer, data.
        self.tokenizer = build_tokenizer(cfg.model.tokenizer_path)
        self.dataloader = build_dataloader(
            dataset=t.dataset,
            dataset_path=t.dataset_path,
            tokenizer=self.tokenizer,
            seq_len=t.seq_len,
            local_batch_size=t.local_batch_size,
            global_batch_size=global_batch,
            dp_rank=dp_rank,
            dp_world_size=dp_degree,
            text_field=t.dataset_text_field,
            num_shards=t.dataset_shards,
            infinite=t.dataset_infinite,
            seed=t.seed or 0,
        )

        # Model on meta, then parallelize, then materialise.
        self.model_spec = get_model_spec(cfg.model.name)
        self.model_args = get_model_args(cfg.model.name, cfg.model.flavor)
        self.model_args.update_from_config(cfg, self.tokenizer)
        logger.info(f"building {cfg.model.name} {cfg.model.flavor}: {self.model_args}")
        with torch.device("meta"):
            model = self.model_spec.model_cls(self.model_args)
        nparams, self.flops_per_token = self.model_args.get_nparams_and_flops(model, t.seq_len)
        logger.info(f"model has {nparams:,} parameters, {self.flops_per_token:,} FLOPs per token")
        # Converters (float8) swap modules on the meta model, before any parallelism.
        self.model_converters = build_model_converters(cfg, pd)
        self.model_converters.convert(model)
        if cfg.model.print_after_conversion:
            logger.info(f"model after conversion:\n{model}")

        # Under PP the model is cut into stages first; each stage is then parallelized like a
        # whole model. model_parts are the stages on this rank (one model without PP).
        self.pp_schedule = None
        if pd.pp_enabled:
            self.pp_schedule, parts, self.pp_has_first_stage, self.pp_has_last_stage = (
                self.model_spec.pipelining_fn(
                    model, pd, cfg, self.device, self.model_args, self.model_spec.parallelize_fn,
                    self._pipeline_loss_fn,
                )
            )
            del model
        else:
            parts = [self.model_spec.parallelize_fn(model, pd, cfg)]
        init_device = "cpu" if t.enable_cpu_offload or cfg.checkpoint.create_seed_checkpoint else self.device
        for part in parts:
            self._materialize(part, init_device, buffer_device=self.device if t.enable_cpu_offload else None)
            part.train()
        self.model_parts = parts
        # Fixed from here on (the optimizer holds the same objects): computed once, not per step.
        self.params = [p for m in parts for p in m.parameters()]
        spec = self.model_spec
        self.step_hooks = spec.build_step_hooks_fn(parts, pd) if spec.build_step_hooks_fn else []
        self.pp_mesh = pd.get_mesh("pp") if pd.pp_enabled else None

        self.optimizers = build_optimizers(self.model_parts, OptimizerSettings.from_config(cfg.optimizer))
        self.lr_schedulers = build_lr_schedulers(
            self.optimizers, t.steps, LRScheduleSettings.from_config(cfg.lr_scheduler)
        )
        self.loss_fn = build_loss_fn(
            compile_loss=cfg.compile.enable and "loss" in cfg.compile.components,
            backend=cfg.compile.backend,
        )
        self.train_context = dist_utils.get_train_context(
            pd.loss_parallel_enabled, p.enable_compiled_autograd
        )
        self.amp_context = dist_utils.maybe_enable_amp(pd.fsdp_enabled, t.mixed_precision_param, dev)

        log_here = self.rank == 0 or not cfg.metrics.rank_0_only
        dump = cfg.job.dump_folder
        self.metrics = MetricsProcessor(
            device=self.device,
            log_freq=cfg.metrics.log_freq,
            flops_per_token=self.flops_per_token,
            peak_flops=peak_flops(self.device, cfg.metrics.peak_tflops),
            color=cfg.metrics.enable_color_printing,
            tb_dir=os.path.join(dump, cfg.metrics.save_tb_folder, f"rank_{self.rank}")
            if cfg.metrics.enable_tensorboard and log_here
            else None,
            wandb_dir=dump if cfg.metrics.enable_wandb and self.rank == 0 else None,
            wandb_project=cfg.metrics.wandb_project,
            wandb_mode=cfg.metrics.wandb_mode,
            config_for_wandb=cfg.to_dict() if cfg.metrics.enable_wandb else None,
            jsonl_path=os.path.join(dump, cfg.metrics.save_jsonl_folder, f"rank_{self.rank}.jsonl")
            if cfg.metrics.enable_jsonl and log_here
            else None,
        )
        self.step = 0
        self.ntokens_seen = 0
        # Model, optimizer, lr schedule, data position and step: everything a resume needs.
        self.checkpointer = CheckpointManager(
            CheckpointSettings.from_config(cfg.checkpoint),
            dump_folder=cfg.job.dump_folder,
            model_parts=self.model_parts,
            states={
                "optimizer": self.optimizers,
                "lr_scheduler": self.lr_schedulers,
                "dataloader": self.dataloader,
                "train_state": self,
            },
        )
        # Preemption signals, non-finite steps, test-only faults (docs/fault_tolerance.md).
        ft = cfg.fault_tolerance
        self.preemption = PreemptionHandler(
            ft.preemption_signals, ft.preemption_grace_seconds, ft.preemption_exit_code
        )
        self.step_guard = StepGuard(ft.non_finite_policy, ft.max_consecutive_skips, self.device)
        self.fault_injector = FaultInjector.from_env(self.rank, once_dir=cfg.job.dump_folder)
        self.preempt_after_step = False
        # With fused optimizers a non-finite step is skipped on device and the host reads the
        # agreed verdict one step later, so the check costs no host sync (docs/fault_tolerance.md).
        self.lagged_guard = self.optimizers.supports_found_inf
        self.pending_flags: tuple[int, torch.Tensor] | None = None
        self.last_good_step = 0
        logger.info(
            f"device {self.device}, world {world_size}, mesh {self.world_mesh}, global batch "
            f"{global_batch} = local {t.local_batch_size} × dp {dp_degree} × accumulation "
            f"{self.grad_accumulation_steps}, seq_len {t.seq_len}"
        )

    def _resolve_cpu_precision(self, cfg: JobConfig) -> None:
        """bf16 matmuls on a CPU without native bf16 support run ~10× slower than fp32:
        train in fp32 there, and say so, rather than crawl."""
        t = cfg.training
        if self.device.type != "cpu" or t.mixed_precision_param == "float32":
            return
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return
        logger.warning(
            "this CPU has no native bf16 matmul: training.mixed_precision_param "
            f"{t.mixed_precision_param} -> float32 for this run (bf16 is used on GPUs)"
        )
        t.mixed_precision_param = "float32"

    def _materialize(self, model: torch.nn.Module, init_device, buffer_device) -> None:
        """Allocate the (sharded) parameters and initialise them identically to one process.

        The init draws from a generator seeded with the run's seed, so every layout starts
        from the same weights. On CUDA, DTensor's offset-based RNG makes a sharded init equal
        to the full one; on CPU it has none (every shard would draw the same numbers), so
        there one full replica is initialised and scattered into the shards. A pipeline
        stage draws in a different order than the whole model, so on CPU it is loaded from a
        full replica too. On GPUs a pipeline stage initialises itself (a full fp32 replica
        of a large model would not fit in host memory): to start PP and non-PP layouts from
        identical weights there, start from a seed checkpoint (docs/checkpoint.md).
        """
        model.to_empty(device=init_device)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            model.init_weights(buffer_device=buffer_device)
            has_dtensor = any(isinstance(p, DTensor) for p in model.parameters())
            if self.device.type == "cpu" and (has_dtensor or self.parallel_dims.pp_enabled):
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                with torch.device("meta"):  # a CPU constructor would consume the generator
                    full = self.model_spec.model_cls(self.model_args)
                full.to_empty(device="cpu")
                torch.manual_seed(self.seed)
                full.init_weights()
                set_model_state_dict(
                    model, full.state_dict(), options=StateDictOptions(full_state_dict=True, strict=False)
                )
                del full

    # ---- checkpointed train state ----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = state_dict["step"]
        self.ntokens_seen = state_dict["ntokens_seen"]

    # ---- one step -------------------------------------------------------------------
    def _pipeline_loss_fn(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of one microbatch at the last stage; with the chunked loss that stage
        returns the loss itself (it got the labels as a keyword argument)."""
        if self.job_config.training.loss_chunk_size > 0:
            return pred / self.grad_accumulation_steps
        return self.loss_fn(pred, labels) / self.grad_accumulation_steps

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p = self.job_config.parallelism
        # CP: every rank of a cp group holds the same batch; the context shards inputs,
        # labels and the rotary tables along the sequence and makes SDPA ring attention.
        cp = (
            cp_context(
                self.parallel_dims.get_mesh("cp"), self.model_parts, inputs, labels,
                p.context_parallel_rotate_method, p.context_parallel_load_balance,
            )
            if self.parallel_dims.cp_enabled
            else None
        )
        if self.pp_schedule is not None:
            # Inputs enter at the first stage, labels meet the logits at the last; the loss
            # (already scaled by the pipelining loss_fn) is known only where the last stage is.
            with self.train_context(cp), self.amp_context:
                return pipeline_step(
                    self.pp_schedule, inputs, labels, self.pp_has_first_stage, self.pp_has_last_stage,
                    labels_to_stages=self.job_config.training.loss_chunk_size > 0,
                )
        model = self.model_parts[0]
        with self.train_context(cp):
            with self.amp_context:
                if self.job_config.training.loss_chunk_size > 0:
                    with labels_for_loss(model, labels):  # model returns the (chunked) loss
                        loss = model(inputs) / self.grad_accumulation_steps
                else:
                    pred = model(inputs)
                    loss = self.loss_fn(pred, labels) / self.grad_accumulation_steps
                    del pred
            loss.backward()
        loss = loss.detach()
        # Under loss parallel the loss is a replicated DTensor; the loop sums plain tensors.
        return loss.full_tensor() if isinstance(loss, DTensor) else loss

    def train_step(self, data_iterator: Iterator) -> tuple[torch.Tensor, torch.Tensor, float]:
        self.optimizers.zero_grad()
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(self.grad_accumulation_steps):
            t0 = time.perf_counter()
            inputs, labels = next(data_iterator)
            self.metrics.add_data_loading_time(time.perf_counter() - t0)
            # TP/CP/PP ranks of one data-parallel group share its tokens: count a device's share.
            self.metrics.add_tokens(labels.numel() // self.parallel_dims.non_data_parallel_size)
            inputs = inputs.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            loss_sum += self.forward_backward(inputs, labels)
        pp_mesh, params = self.pp_mesh, self.params
        if pp_mesh is not None:
            loss_sum = share_last_stage_loss(loss_sum, pp_mesh)

        if self.fault_injector:  # test-only faults (TORCHTITAN_FAULT_INJECT)
            loss_sum = self.fault_injector.before_optimizer(self.step, loss_sum, params)
        max_norm = self.job_config.training.max_norm
        grad_norm = dist_utils.clip_grad_norm_(
            params, max_norm if max_norm > 0 else float("inf"), foreach=True, pp_mesh=pp_mesh
        )
        lr = self.lr_schedulers.get_last_lr()
        # Every rank learns, in one all-reduce, whether any rank saw a non-finite value or
        # was signalled: all skip the same steps and stop after the same step.
        flags = self.step_guard.flags(loss_sum, grad_norm, self.preemption.requested)
        if self.lagged_guard:
            self.settle_verdict()  # the previous step's, long finished: no pipeline bubble
            self.optimizers.step(found_inf=flags[0])  # a no-op on device if non-finite
            self.pending_flags = (self.step, flags)
        else:
            if self._act_on(self.step, self.step_guard.verdict(flags)):
                return loss_sum, grad_norm, lr  # skipped: weights, optimizer and lr schedule unchanged
            self.optimizers.step()
        self.model_converters.post_optimizer_hook(self.model_parts)
        for hook in self.step_hooks:
            hook()
        self.lr_schedulers.step()
        return loss_sum, grad_norm, lr

    def _act_on(self, step: int, verdict) -> bool:
        """Apply the agreed verdict of ``step``; True if it was skipped. Raises NonFiniteError
        when the policy says stop (the weights are then those after ``step - 1``)."""
        self.preempt_after_step |= verdict.preempt
        if verdict.non_finite:
            self.last_good_step = step - 1
            self.step_guard.on_non_finite(step)
            return True
        self.step_guard.on_finite()
        return False

    def settle_verdict(self) -> None:
        """Read and apply the pending verdict of the last step (lagged mode; a host sync)."""
        if self.pending_flags is not None:
            step, flags = self.pending_flags
            self.pending_flags = None
            self._act_on(step, self.step_guard.verdict(flags))

    # ---- the loop -------------------------------------------------------------------
    def train(self) -> list[float]:
        cfg = self.job_config
        t = cfg.training
        losses: list[float] = []
        if cfg.checkpoint.create_seed_checkpoint:
            self.checkpointer.save_seed()
            return losses
        self.checkpointer.load()
        gc.disable()  # collect on our schedule, identically on every rank
        gc.collect(1)
        data_iterator = iter(self.dataloader)
        prof_cfg = cfg.profiling
        snapshotter = MemorySnapshotter(
            enable=prof_cfg.enable_memory_snapshot,
            folder=os.path.join(cfg.job.dump_folder, prof_cfg.save_memory_snapshot_folder),
            rank=self.rank,
            at_step=prof_cfg.memory_snapshot_step,
        )
        logger.info(f"training {t.steps} steps")
        self.preemption.install()
        with maybe_enable_profiling(
            enable=prof_cfg.enable_profiling,
            trace_dir=os.path.join(cfg.job.dump_folder, prof_cfg.save_traces_folder),
            profile_freq=prof_cfg.profile_freq,
            warmup=prof_cfg.profiler_warmup,
            active=prof_cfg.profiler_active,
            rank=self.rank,
            start_step=self.step,
        ) as profiler:
            train_timeout_set = False
            while self.step < t.steps:
                self.step += 1
                if t.gc_freq > 0 and self.step % t.gc_freq == 0:
                    gc.collect(1)
                try:
                    loss, grad_norm, lr = self.train_step(data_iterator)
                except torch.OutOfMemoryError:
                    snapshotter.dump(f"oom_step_{self.step}")
                    raise
                except NonFiniteError:
                    self._save_last_good_state()
                    raise
                except RuntimeError:
                    self._dump_comm_trace()  # a collective failed or timed out (gloo/CPU path)
                    raise
                except StopIteration:
                    logger.warning(f"data exhausted at step {self.step} (training.dataset_infinite is off)")
                    try:
                        self.settle_verdict()
                    except NonFiniteError:
                        self._save_last_good_state()
                        raise
                    break
                last_step = self.step == t.steps
                ckpt = cfg.checkpoint
                if last_step or self.metrics.should_log(self.step) or (
                    ckpt.enable and self.step % ckpt.interval == 0
                ):
                    # Logging syncs anyway; a checkpoint must know whether this step counted.
                    try:
                        self.settle_verdict()
                    except NonFiniteError:
                        self._save_last_good_state()
                        raise
                if self.metrics.should_log(self.step):
                    global_loss = dist_utils.dist_mean(loss, self._loss_mesh())
                    gn = grad_norm.item() if isinstance(grad_norm, torch.Tensor) else float(grad_norm)
                    losses.append(global_loss)
                    # A family's own scalars (may be collectives: every rank computes them).
                    extra = self.model_spec.metrics_fn(self.model_parts) if self.model_spec.metrics_fn else None
                    if self.rank == 0 or not cfg.metrics.rank_0_only:
                        self.metrics.log(self.step, loss=global_loss, grad_norm=gn, lr=lr, extra=extra)
                self.ntokens_seen += self.global_batch_size * t.seq_len
                self.checkpointer.save(self.step, last_step=last_step)
                if self.preempt_after_step and self.step < t.steps:
                    self.checkpointer.save(self.step, force=True)  # no-op if just saved
                    self.checkpointer.wait()  # synchronous: the process is about to exit
                    raise Preempted(self.step, cfg.fault_tolerance.preemption_exit_code)
                if profiler is not None:
                    profiler.step()
                snapshotter.step(self.step)
                if not train_timeout_set:
                    # The first step may be slow (compile, NCCL communicator setup); later
                    # ones get comm.train_timeout_seconds so a hang is reported sooner.
                    dist_utils.set_pg_timeout(cfg.comm.train_timeout_seconds, self.world_mesh)
                    train_timeout_set = True
        gc.enable()
        if self.rank == 0 or not cfg.metrics.rank_0_only:
            logger.info(f"training done: {self.metrics.summary()}")
        return losses

    def _dump_comm_trace(self) -> None:
        """Write this rank's Flight Recorder buffer to <dump_folder>/comm_traces (NCCL dumps
        by itself on a timeout; other backends only through this). Never masks the error."""
        if self.job_config.comm.trace_buf_size <= 0 or not torch.distributed.is_initialized():
            return
        if torch.distributed.get_world_size() == 1:
            return
        try:
            path = dump_trace(trace_dir(self.job_config.job.dump_folder), self.rank)
            if path:
                logger.error(f"flight recorder trace written to {path}; see docs/debugging.md")
        except Exception as e:  # noqa: BLE001 - the original error matters more
            logger.warning(f"could not dump the flight recorder trace: {e}")

    def _save_last_good_state(self) -> None:
        """After a non-finite stop the weights are still those of the previous step (the
        optimizer did not run): checkpoint them as that step unless that is already saved.
        The data loader has moved past the bad batch, so a resume does not replay it."""
        self.step = self.last_good_step
        if self.step > 0:  # step-0 is reserved for seed checkpoints
            self.checkpointer.save(self.step, force=True)
            self.checkpointer.wait()

    def _loss_mesh(self):
        """The mesh the loss is averaged over (dp × cp), or None when there is one replica."""
        return self.parallel_dims.get_mesh("dp_cp") if self.parallel_dims.dp_cp_enabled else None

    def close(self, clean: bool = True) -> None:
        """Finish background saves and leave the process group. After a failure no barrier:
        the other ranks may never reach it, and torchrun is already tearing the job down."""
        self.preemption.close()
        if clean:
            self.checkpointer.close()
        self.metrics.close()
        if torch.distributed.is_initialized():
            if clean:
                torch.distributed.barrier()
                torch.distributed.destroy_process_group()
            else:
                dist_utils.abandon_process_groups()
