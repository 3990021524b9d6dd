"""The trainer: build everything from a JobConfig, then run the loop.

Launched by torchtitan/train.py (``python -m torchtitan.train``). It reads like the paper's
flow: build (layout check -> process group and mesh -> tokenizer and data -> model on meta)
-> parallelize (the model family's function: TP, EP, AC, compile, FSDP; or pipeline stages)
-> materialise -> optimizer, lr schedule, metrics, checkpoints -> loop. It knows no model
family: everything family-specific comes through the ``ModelSpec`` (docs/models.md).
"""

from __future__ import annotations

import gc
import importlib
import os
import time
from typing import Any, Iterator

import torch
from torch.distributed.tensor import DTensor

from torchtitan.components.checkpoint.folder import check_dump_subfolders
from torchtitan.components.checkpoint_policy import PolicyCheckpointManager as CheckpointManager
from torchtitan.components.chunked_loss import labels_for_loss
from torchtitan.components.data import build_dataloader
from torchtitan.components.fault_tolerance import FaultInjector, NonFiniteError, Preempted, PreemptionHandler, StepGuard
from torchtitan.components.float8 import build_model_converters
from torchtitan.components.loss import build_loss_fn
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.metrics import build_metrics_processor
from torchtitan.components.optimizer import build_optimizers
from torchtitan.components.tokenizer import build_tokenizer, check_tokenizer_fits
from torchtitan.components.validate import build_validator
from torchtitan.config import JobConfig
from torchtitan.distributed import utils as dist_utils
from torchtitan.distributed.context_parallel import cp_context
from torchtitan.distributed.fsdp import uses_fsdp
from torchtitan.distributed.layout import validate_layout
from torchtitan.distributed.materialize import materialize
from torchtitan.distributed.pipeline import pipeline_step, share_last_stage_loss
from torchtitan.models import check_model_config, get_model_args, get_model_spec
from torchtitan.tools.device_info import limit_device_memory, resolve_cpu_precision
from torchtitan.tools.flight_recorder import dump_on_failure
from torchtitan.tools.logging import logger
from torchtitan.tools.profiling import MemorySnapshotter, maybe_enable_profiling


class Trainer:
    def __init__(self, job_config: JobConfig):
        self.job_config = cfg = job_config
        t, p = cfg.training, cfg.parallelism
        if cfg.experimental.custom_import:
            importlib.import_module(cfg.experimental.custom_import)

        # The layout first, for torchrun's WORLD_SIZE (or the caller's process group): a bad
        # one is refused before any rendezvous (which on a multi-node job waits for every
        # node) or device is touched.
        if torch.distributed.is_initialized():
            expected_world = torch.distributed.get_world_size()
        else:
            expected_world = int(os.environ.get("WORLD_SIZE", "1"))
        layout = validate_layout(cfg, expected_world)
        check_model_config(cfg)
        check_dump_subfolders(cfg)

        # Process group, device, mesh.
        world_size = dist_utils.init_distributed(
            init_timeout_seconds=cfg.comm.init_timeout_seconds,
            trace_buf_size=cfg.comm.trace_buf_size,
            dump_folder=cfg.job.dump_folder,
            traces_folder=cfg.comm.save_traces_folder,
            traces_prefix=cfg.comm.save_traces_file_prefix,
        )
        if world_size != expected_world:
            raise RuntimeError(f"the process group has {world_size} ranks, WORLD_SIZE said {expected_world}")
        self.rank = int(os.environ.get("RANK", 0))
        dev = dist_utils.device_type
        self.device = torch.device(f"{dev}:{int(os.environ.get('LOCAL_RANK', 0))}" if dev == "cuda" else dev)
        limit_device_memory(self.device, t.device_memory_limit_gib)
        self.parallel_dims = pd = layout.parallel_dims
        self.world_mesh = pd.build_mesh(dev)
        dp_rank, dp_degree = pd.dp_rank_and_size(self.world_mesh)
        self.seed = dist_utils.set_determinism(
            self.world_mesh, self.device, t.seed, t.deterministic, warn_only=t.deterministic_warn_only
        )
        resolve_cpu_precision(self.device, t)
        self.global_batch_size = layout.global_batch
        self.grad_accumulation_steps = layout.grad_accumulation_steps

        # Tokenizer, data.
        self.tokenizer = build_tokenizer(cfg.model.tokenizer_path)
        self.dataloader = build_dataloader(
            dataset=t.dataset,
            dataset_path=t.dataset_path,
            tokenizer=self.tokenizer,
            seq_len=t.seq_len,
            local_batch_size=t.local_batch_size,
            global_batch_size=self.global_batch_size,
            dp_rank=dp_rank,
            dp_world_size=dp_degree,
            text_field=t.dataset_text_field,
            num_shards=t.dataset_shards,
            infinite=t.dataset_infinite,
            seed=t.seed or 0,
            num_workers=t.dataloader_num_workers,
            persistent_workers=t.dataloader_persistent_workers,
            pin_memory=t.dataloader_pin_memory,
            prefetch_factor=t.dataloader_prefetch_factor,
        )

        # Model on meta -> converters -> parallelize (or pipeline stages) -> materialise.
        self.model_spec = spec = get_model_spec(cfg.model.name)
        self.model_args = get_model_args(cfg.model.name, cfg.model.flavor)
        self.model_args.update_from_config(cfg, self.tokenizer)
        check_tokenizer_fits(
            self.tokenizer, getattr(self.model_args, "vocab_size", 0), family=cfg.model.name,
            flavor=cfg.model.flavor, path=cfg.model.tokenizer_path, allow_small=cfg.model.allow_small_tokenizer,
        )
        logger.info(f"building {cfg.model.name} {cfg.model.flavor}: {self.model_args}")
        self.model_parts = self._build_model_parts()
        # Fixed from here on (the optimizer holds the same objects): computed once, not per step.
        self.params = [p for m in self.model_parts for p in m.parameters()]
        self.pp_mesh = pd.get_mesh("pp") if pd.pp_enabled else None
        self.step_hooks = spec.build_step_hooks_fn(self.model_parts, pd) if spec.build_step_hooks_fn else []

        self.optimizers = build_optimizers(self.model_parts, cfg.optimizer)
        self.lr_schedulers = build_lr_schedulers(self.optimizers, t.steps, cfg.lr_scheduler)
        self.loss_fn = build_loss_fn(
            compile_loss=cfg.compile.enable and "loss" in cfg.compile.components, backend=cfg.compile.backend
        )
        self.train_context = dist_utils.get_train_context(pd.loss_parallel_enabled, p.enable_compiled_autograd)
        self.amp_context = dist_utils.maybe_enable_amp(uses_fsdp(pd, t), t.mixed_precision_param, dev)
        self.metrics = build_metrics_processor(
            cfg, rank=self.rank, device=self.device, flops_per_token=self.flops_per_token
        )
        # Held-out loss every validation.freq steps (None when validation.enable is off).
        self.validator = build_validator(
            cfg, tokenizer=self.tokenizer, dp_rank=dp_rank, dp_degree=dp_degree, model_parts=self.model_parts,
            parallel_dims=pd, device=self.device, loss_fn=self.loss_fn, train_context=self.train_context,
            amp_context=self.amp_context, metrics=self.metrics, rank=self.rank,
            log_here=self.rank == 0 or not cfg.metrics.rank_0_only, chunked_loss=t.chunked_loss,
            cp_rotate_method=p.context_parallel_rotate_method, cp_load_balance=p.context_parallel_load_balance,
            pp_schedule=self.pp_schedule, pp_has_first_stage=getattr(self, "pp_has_first_stage", False),
            pp_has_last_stage=getattr(self, "pp_has_last_stage", False),
            pp_loss_scale=self.grad_accumulation_steps, seed=t.seed or 0,
        )
        self.step = 0
        self.ntokens_seen = 0
        # Model, optimizer, lr schedule, data position and step: everything a resume needs.
        self.checkpointer = CheckpointManager(
            cfg.checkpoint,
            dump_folder=cfg.job.dump_folder,
            model_parts=self.model_parts,
            states={
                "optimizer": self.optimizers,
                "lr_scheduler": self.lr_schedulers,
                "dataloader": self.dataloader,
                "train_state": self,
            },
            sd_adapter=spec.state_dict_adapter(self.model_args) if spec.state_dict_adapter else None,
            hf_assets_path=cfg.model.hf_assets_path,
        )
        # Preemption signals, non-finite steps, test-only faults (docs/fault_tolerance.md).
        # With fused optimizers a non-finite step is skipped on device and the host reads the
        # agreed verdict one step later, so the check costs no host sync.
        ft = cfg.fault_tolerance
        self.preemption = PreemptionHandler(ft.preemption_signals, ft.preemption_grace_seconds, ft.preemption_exit_code)
        self.step_guard = StepGuard(
            ft.non_finite_policy, ft.max_consecutive_skips, self.device, lagged=self.optimizers.supports_found_inf
        )
        self.fault_injector = FaultInjector.from_env(self.rank, once_dir=cfg.job.dump_folder)
        logger.info(
            f"device {self.device}, world {world_size}, mesh {self.world_mesh}, global batch "
            f"{self.global_batch_size} = local {t.local_batch_size} × dp {dp_degree} × accumulation "
            f"{self.grad_accumulation_steps}, seq_len {t.seq_len}"
        )

    def _build_model_parts(self) -> list[torch.nn.Module]:
        """The model on meta, converted (float8) and parallelized by its family's functions,
        then materialised: one part, or this rank's pipeline stages."""
        cfg, spec, pd, t = self.job_config, self.model_spec, self.parallel_dims, self.job_config.training
        with torch.device("meta"):
            model = spec.model_cls(self.model_args)
        nparams, self.flops_per_token = self.model_args.get_nparams_and_flops(model, t.seq_len)
        logger.info(f"model has {nparams:,} parameters, {self.flops_per_token:,} FLOPs per token")
        # Converters (float8) swap modules on the meta model, before any parallelism.
        self.model_converters = build_model_converters(cfg, pd)
        self.model_converters.convert(model)
        if cfg.model.print_after_conversion:
            logger.info(f"model after conversion:\n{model}")
        # Under PP the model is cut into stages first; each stage is then parallelized like a
        # whole model.
        self.pp_schedule = None
        if pd.pp_enabled:
            self.pp_schedule, parts, self.pp_has_first_stage, self.pp_has_last_stage = spec.pipelining_fn(
                model, pd, cfg, self.device, self.model_args, spec.parallelize_fn, self._pipeline_loss_fn
            )
            del model
        else:
            parts = [spec.parallelize_fn(model, pd, cfg)]

        def build_full_model() -> torch.nn.Module:
            with torch.device("meta"):
                return spec.model_cls(self.model_args)

        on_cpu = t.enable_cpu_offload or cfg.checkpoint.create_seed_checkpoint
        for part in parts:
            materialize(
                part,
                device=self.device,
                init_device="cpu" if on_cpu else self.device,
                buffer_device=self.device if t.enable_cpu_offload else None,
                seed=self.seed,
                build_full_model=build_full_model,
                is_pipeline_stage=pd.pp_enabled,
            )
            part.train()
        return parts

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
        if self.job_config.training.chunked_loss:
            return pred / self.grad_accumulation_steps
        return self.loss_fn(pred, labels) / self.grad_accumulation_steps

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p = self.job_config.parallelism
        chunked_loss = self.job_config.training.chunked_loss
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
                    labels_to_stages=chunked_loss,
                )
        model = self.model_parts[0]
        with self.train_context(cp):
            with self.amp_context:
                if chunked_loss:
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
        if self.pp_mesh is not None:
            loss_sum = share_last_stage_loss(loss_sum, self.pp_mesh)

        if self.fault_injector:  # test-only faults (TORCHTITAN_FAULT_INJECT)
            loss_sum = self.fault_injector.before_optimizer(self.step, loss_sum, self.params)
        max_norm = self.job_config.training.max_norm
        grad_norm, clip_coef = dist_utils.grad_norm_and_clip_coef(
            self.params, max_norm if max_norm > 0 else float("inf"), foreach=True, pp_mesh=self.pp_mesh
        )
        # A fused optimizer divides the gradients by ``grad_scale`` as it reads them: the
        # clipping costs no pass of its own over the fp32 gradients (~0.5% of a 3B step).
        grad_scale = None
        if self.optimizers.supports_found_inf:
            grad_scale = clip_coef.reciprocal() if max_norm > 0 else None
        elif max_norm > 0:
            dist_utils.scale_grads_(self.params, clip_coef, foreach=True)
        lr = self.lr_schedulers.get_last_lr()
        # Every rank learns, in one all-reduce, whether any rank saw a non-finite value or
        # was signalled: all skip the same steps and stop after the same step.
        skip, found_inf = self.step_guard.decide(self.step, loss_sum, grad_norm, self.preemption.requested)
        if skip:
            return loss_sum, grad_norm, lr  # weights, optimizer and lr schedule unchanged
        # with found_inf: a no-op on device if non-finite
        self.optimizers.step(found_inf=found_inf, grad_scale=grad_scale)
        self.model_converters.post_optimizer_hook(self.model_parts)
        for hook in self.step_hooks:
            hook()
        self.lr_schedulers.step()
        return loss_sum, grad_norm, lr

    # ---- the loop -------------------------------------------------------------------
    def train(self) -> list[float]:
        if self.job_config.checkpoint.create_seed_checkpoint:
            self.checkpointer.save_seed()
            return []
        self.checkpointer.load()
        self.optimizers.init_state()  # where a resume's load puts them: before any activation
        gc.disable()  # collect on our schedule, identically on every rank
        gc.collect(1)
        self.preemption.install()
        try:
            losses = self._loop()
        except NonFiniteError:
            self._save_last_good_state()
            raise
        self.checkpointer.finish()  # raises if the last save failed, even with fail_on_save_error off
        gc.enable()
        if self.rank == 0 or not self.job_config.metrics.rank_0_only:
            logger.info(f"training done: {self.metrics.summary()}")
        return losses

    def _loop(self) -> list[float]:
        cfg = self.job_config
        t, ckpt, prof = cfg.training, cfg.checkpoint, cfg.profiling
        losses: list[float] = []
        data_iterator = iter(self.dataloader)
        snapshotter = MemorySnapshotter(
            enable=prof.enable_memory_snapshot,
            folder=os.path.join(cfg.job.dump_folder, prof.save_memory_snapshot_folder),
            rank=self.rank,
            at_step=prof.memory_snapshot_step,
        )
        logger.info(f"training {t.steps} steps")
        with maybe_enable_profiling(
            enable=prof.enable_profiling,
            trace_dir=os.path.join(cfg.job.dump_folder, prof.save_traces_folder),
            profile_freq=prof.profile_freq,
            warmup=prof.profiler_warmup,
            active=prof.profiler_active,
            rank=self.rank,
            start_step=self.step,
        ) as profiler:
            first_step = self.step + 1
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
                    raise
                except RuntimeError:
                    dump_on_failure(  # a collective failed (gloo/CPU path)
                        cfg.comm.trace_buf_size, cfg.job.dump_folder, self.rank,
                        cfg.comm.save_traces_folder, cfg.comm.save_traces_file_prefix,
                    )
                    raise
                except StopIteration:
                    logger.warning(f"data exhausted at step {self.step} (training.dataset_infinite is off)")
                    self.step_guard.settle()
                    break
                last_step = self.step == t.steps
                should_log = self.metrics.should_log(self.step)
                if last_step or should_log or (ckpt.enable and self.step % ckpt.interval == 0):
                    self.step_guard.settle()  # logging syncs anyway; a checkpoint must know whether this step counted
                if should_log:
                    losses.append(self._log(loss, grad_norm, lr))
                if self.validator is not None and self.validator.should_validate(self.step):
                    self.validator.validate(self.step)
                self.ntokens_seen += self.global_batch_size * t.seq_len
                self.checkpointer.save(self.step, last_step=last_step)
                if self.step_guard.preempt_after_step and self.step < t.steps:
                    self.checkpointer.save(self.step, force=True)  # no-op if just saved
                    # synchronous: the process is about to exit; a failed save is not "checkpointed"
                    self.checkpointer.finish()
                    raise Preempted(self.step, cfg.fault_tolerance.preemption_exit_code)
                if profiler is not None:
                    profiler.step()
                snapshotter.step(self.step)
                if self.step == first_step:
                    # The first step may be slow (compile, NCCL communicator setup); later
                    # ones get comm.train_timeout_seconds so a hang is reported sooner.
                    dist_utils.set_pg_timeout(cfg.comm.train_timeout_seconds, self.world_mesh)
        return losses

    def _log(self, loss: torch.Tensor, grad_norm: torch.Tensor | float, lr: float) -> float:
        """The step line: loss averaged over dp × cp, plus the family's own scalars."""
        pd = self.parallel_dims
        global_loss = dist_utils.dist_mean(loss, pd.get_mesh("dp_cp") if pd.dp_cp_enabled else None)
        gn = grad_norm.item() if isinstance(grad_norm, torch.Tensor) else float(grad_norm)
        # A family's own scalars (may be collectives: every rank computes them).
        extra = self.model_spec.metrics_fn(self.model_parts) if self.model_spec.metrics_fn else None
        if self.rank == 0 or not self.job_config.metrics.rank_0_only:
            self.metrics.log(self.step, loss=global_loss, grad_norm=gn, lr=lr, extra=extra)
        return global_loss

    def _save_last_good_state(self) -> None:
        """After a non-finite stop the weights are still those of the previous step (the
        optimizer did not run): checkpoint them as that step unless that is already saved.
        The data loader has moved past the bad batch, so a resume does not replay it."""
        self.step = self.step_guard.last_good_step
        if self.step > 0:  # step-0 is reserved for seed checkpoints
            self.checkpointer.save(self.step, force=True)
            self.checkpointer.wait()

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
                dist_utils.destroy_process_group()
            else:
                dist_utils.abandon_process_groups()
