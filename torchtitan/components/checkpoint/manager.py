"""CheckpointManager: save and resume a run with DCP, whatever its parallel layout.

What a checkpoint holds, each under its own top-level key:

- ``model``: ``get_model_state_dict`` of every model part. Keys are parameter FQNs and
  values are DTensors under FSDP/TP, so any other layout (or one process) loads them: DCP
  reshards by reading the slices each rank needs.
- ``optimizer``, ``lr_scheduler``, ``dataloader``, ``train_state``: the ``states`` handed
  in, through their ``state_dict()``. The optimizer's is flattened and FQN-keyed too; the
  data loader's keys are its shards, so each data-parallel rank saves and loads its own.

Saves are atomic (see ``folder.py``). With ``async_mode`` the state is copied to CPU memory
and a background thread writes it while training goes on; the next save, or ``close()``,
waits for it, and only then is the checkpoint marked complete.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from torchtitan.components.checkpoint.folder import (
    CheckpointError,
    finalize,
    list_checkpoints,
    prune,
    read_marker,
    step_dir,
    tmp_dir,
    verify_files,
)
from torchtitan.components.checkpoint.hf import load_hf, read_hf_index, save_hf
from torchtitan.components.checkpoint.staging import StagedWriter, StateStager
from torchtitan.components.checkpoint.storage import (
    MODEL,
    check_template,
    describe_error,
    load_state,
    read_metadata,
    unexpected_model_keys,
)
from torchtitan.config import Checkpoint as CheckpointConfig
from torchtitan.config import ConfigError
from torchtitan.distributed.utils import TORCH_DTYPE_MAP
from torchtitan.tools.logging import logger

__all__ = ["CheckpointManager", "Stateful"]



class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@dataclass
class _Save:
    """A save whose files are (being) written and that is not yet marked complete."""

    step: int
    tmp: str
    final: str
    contents: list[str]
    started: float
    future: Future | None = None


class CheckpointManager:
    """Saves every ``interval`` steps and at the last step, resumes from the newest
    complete checkpoint (or ``load_step``, or ``initial_load_path``).

    Collective: every rank builds the manager and calls ``load``/``save``/``close`` at the
    same steps. File-system bookkeeping (markers, renames, pruning) happens on rank 0.
    """

    def __init__(
        self,
        settings: CheckpointConfig,
        *,
        dump_folder: str,
        model_parts: list[nn.Module],
        states: dict[str, Stateful],
        sd_adapter: Any | None = None,
        hf_assets_path: str | None = None,
    ):
        if MODEL in states:
            raise ValueError(f"states must not use the name {MODEL!r}: the model is passed as model_parts")
        settings.validate()  # the config section is the one home of the allowed values
        self.settings = s = settings
        self.folder = os.path.join(dump_folder, s.folder)
        self.model_parts = model_parts
        self.states = dict(states)
        # The family's Hugging Face mapping (ModelSpec.state_dict_adapter, built from the
        # args): needed by initial_load_in_hf and last_save_in_hf only.
        self.sd_adapter = sd_adapter
        # TorchTitan's fallback: initial_load_in_hf without initial_load_path reads this folder.
        self.hf_assets_path = hf_assets_path
        self._hf_file_index: dict[str, int] | None = None  # the loaded folder's file split
        if s.enable and (s.initial_load_in_hf or s.last_save_in_hf) and sd_adapter is None:
            raise ConfigError(
                "checkpoint.initial_load_in_hf / last_save_in_hf: this model family has no "
                "state_dict_adapter (ModelSpec) to map its weights to Hugging Face's"
            )
        known = (MODEL, *self.states)
        unknown = [name for name in s.exclude_from_loading if name not in known]
        if unknown:
            raise ConfigError(
                f"checkpoint.exclude_from_loading = {s.exclude_from_loading}: {unknown[0]!r} is no "
                f"checkpoint state; use some of {', '.join(known)}"
            )
        self._distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self._distributed else 0
        self.world_size = dist.get_world_size() if self._distributed else 1
        self._pending: _Save | None = None
        self.last_saved_step: int | None = None  # newest step this run wrote (or is writing)
        self.last_blocked_seconds: float | None = None  # how long the last save() held training
        self._stager: StateStager | None = None
        self._reserved = False  # whether the stager was asked to allocate its buffers
        self._async_pg: dist.ProcessGroup | None = None
        if not s.enable:
            return
        if s.async_mode != "disabled":
            # The writer thread runs DCP's collectives; its own gloo group keeps them from
            # interleaving with training's collectives on the default group.
            if self._distributed:
                self._async_pg = dist.new_group(backend="gloo")
            self._stager = StateStager(
                (MODEL, "optimizer"), pin_memory=s.async_mode == "async_with_pinned_mem"
            )
            if s.async_mode == "async_with_pinned_mem" and not self._stager.pin_memory and self.rank == 0:
                logger.info("checkpoint: no CUDA, so the staging buffers are not pinned")
        # Names this run's in-progress directories, so leftovers of a killed run are never
        # written into (they are removed after the next successful save).
        self._nonce = self._from_rank0(lambda: secrets.token_hex(4))

    # ---- saving -------------------------------------------------------------------------
    def save(self, step: int, last_step: bool = False, force: bool = False) -> bool:
        """Save if ``step`` is a multiple of ``interval``, ``last_step`` or ``force`` (a
        preemption or a stop); return whether a save started. Also completes a finished
        background save. A step this run already saved is not saved again."""
        if not self.settings.enable:
            return False
        self._reap(block=False)
        if self._stager is not None and not self._reserved:
            # After the first optimizer step every state tensor exists: allocate (and pin)
            # the staging buffers now, in the background, instead of inside the first save.
            self._reserved = True
            self._stager.reserve(self._state(self._stager.tensor_groups))
        if not (last_step or force or step % self.settings.interval == 0):
            return False
        if step == self.last_saved_step:
            return False
        started = time.perf_counter()
        self._reap(block=True)  # one save in flight at most; its buffers get reused
        self.last_saved_step = step
        weights_only = last_step and self.settings.model_weights_only
        if weights_only and self.settings.last_save_in_hf:
            self._write_hf(step)
        elif weights_only:
            dtype = TORCH_DTYPE_MAP[self.settings.export_dtype]
            model = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self._model_state().items()}
            self._write(step, {MODEL: model}, background=False)
        else:
            state = self._state()
            self._write(step, state, background=self._stager is not None)
        # What async checkpointing is for: the time the training loop stood still.
        self.last_blocked_seconds = time.perf_counter() - started
        if self.rank == 0:
            logger.info(
                f"checkpoint step {step}: training blocked {self.last_blocked_seconds:.2f}s "
                f"(async_mode {self.settings.async_mode})"
            )
        return True

    def _write_hf(self, step: int) -> None:
        """The model as a Hugging Face folder ``step-N-hf`` (written under a ``.tmp`` name,
        renamed when complete): safetensors split like the folder it was loaded from, if
        any, with the index and config.json."""
        final = step_dir(self.folder, step) + "-hf"
        tmp = tmp_dir(self.folder, step, self._nonce)
        started = time.perf_counter()
        self._refuse_non_finite(step, self._model_state())
        try:
            files = save_hf(
                tmp,
                self.model_parts,
                self.sd_adapter,
                dtype=TORCH_DTYPE_MAP[self.settings.export_dtype],
                file_index=self._hf_file_index,
            )
            if self.rank == 0:
                if os.path.lexists(final):
                    shutil.rmtree(final)
                os.rename(tmp, final)
        except (Exception, CheckpointException) as e:
            self._failed(_Save(step, tmp, final, [MODEL], started), e)
            return
        if self.rank == 0:
            logger.info(
                f"saved the model in Hugging Face format to {final} ({len(files)} files) in "
                f"{time.perf_counter() - started:.2f}s"
            )

    def save_seed(self) -> None:
        """Write the freshly initialised model as ``step-0`` (weights only): every layout
        that later starts from this folder loads identical weights."""
        self._write(0, {MODEL: self._model_state()}, background=False)

    def wait(self) -> None:
        """Block until a background save is written and marked complete."""
        self._reap(block=True)

    def close(self) -> None:
        self.wait()
        if self._stager is not None:
            self._stager.close()

    def _write(self, step: int, state: dict[str, Any], background: bool) -> None:
        self._refuse_non_finite(step, state[MODEL])
        save = _Save(
            step=step,
            tmp=tmp_dir(self.folder, step, self._nonce),
            final=step_dir(self.folder, step),
            contents=sorted(state),
            started=time.perf_counter(),
        )
        try:
            if background:
                assert self._stager is not None
                staged = self._stager.stage(state)
                result = dcp.async_save(
                    staged,
                    checkpoint_id=save.tmp,
                    storage_writer=StagedWriter(save.tmp),
                    process_group=self._async_pg,
                )
                save.future = getattr(result, "upload_completion", result)
                self._pending = save
                if self.rank == 0:
                    logger.info(
                        f"checkpoint step {step}: staged in {time.perf_counter() - save.started:.2f}s, "
                        "writing in the background"
                    )
                return
            dcp.save(state, checkpoint_id=save.tmp)
        except (Exception, CheckpointException) as e:
            self._failed(save, e)
            return
        self._complete(save)

    def _reap(self, block: bool) -> None:
        save = self._pending
        if save is None or save.future is None or (not block and not save.future.done()):
            return
        self._pending = None
        try:
            save.future.result()
        except (Exception, CheckpointException) as e:
            self._failed(save, e)
            return
        self._complete(save)

    def _complete(self, save: _Save) -> None:
        if self.rank != 0:
            return
        try:
            finalize(save.tmp, save.final, save.step, save.contents)
            prune(self.folder, self.settings.keep_latest_k)
        except Exception as e:
            self._failed(save, e)
            return
        logger.info(
            f"saved checkpoint {save.final} ({', '.join(save.contents)}) in "
            f"{time.perf_counter() - save.started:.2f}s"
        )

    def _failed(self, save: _Save, e: BaseException) -> None:
        message = f"saving checkpoint step {save.step} to {save.tmp} failed: {describe_error(e)}"
        if self.settings.fail_on_save_error:
            raise CheckpointError(message + " (checkpoint.fail_on_save_error is on)") from e
        logger.error(message + "; training goes on (checkpoint.fail_on_save_error is off)")

    def _refuse_non_finite(self, step: int, model_state: dict[str, Any]) -> None:
        """Never write NaN/inf weights: they would poison every resume. Agreed across ranks,
        since each holds only its shards."""
        names, checks = [], []
        for name, value in model_state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                local = value.to_local() if hasattr(value, "to_local") else value
                try:
                    checks.append(torch.isfinite(local).all())
                except (RuntimeError, NotImplementedError):  # a tensor subclass without isfinite
                    continue
                names.append(name)
        # One device-to-host copy for all tensors, not one per tensor.
        finite = torch.stack([c.to(checks[0].device) for c in checks]).tolist() if checks else []
        bad = next((n for n, ok in zip(names, finite) if not ok), None)
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, bad)
            bad = next((n for n in gathered if n is not None), None)
        if bad is not None:
            raise CheckpointError(
                f"not saving checkpoint step {step} to {self.folder}: parameter {bad} is not finite; "
                "resume from the last complete checkpoint (see fault_tolerance.non_finite_policy)"
            )

    # ---- loading ------------------------------------------------------------------------
    def load(self, step: int | None = None) -> bool:
        """Resume from the checkpoint folder, else start from ``initial_load_path``; return
        whether anything was loaded. ``step`` (default ``checkpoint.load_step``): -1 = the
        newest complete checkpoint. ``step-0`` (a seed checkpoint) and, by default,
        ``initial_load_path`` give model weights only."""
        s = self.settings
        if not s.enable and s.initial_load_path and self.rank == 0:
            logger.warning("checkpoint.initial_load_path is ignored: checkpoint.enable is off")
        if not s.enable or s.create_seed_checkpoint:
            return False
        choice = self._from_rank0(lambda: self._choose(s.load_step if step is None else step))
        if choice is None:
            logger.info(f"no checkpoint in {self.folder}: starting from scratch")
            return False
        path, groups, in_hf = choice
        if in_hf and groups:
            started = time.perf_counter()
            load_hf(path, self.model_parts, self.sd_adapter)
            self._hf_file_index = read_hf_index(path)
            if self.rank == 0:
                logger.info(f"loaded the model from Hugging Face folder {path} in {time.perf_counter() - started:.2f}s")
            return True
        if not groups:
            logger.info(f"checkpoint {path}: every state is in checkpoint.exclude_from_loading")
            return False
        started = time.perf_counter()
        template = self._template(groups)
        metadata = read_metadata(path)
        problem = check_template(template, metadata, path)
        extra = unexpected_model_keys(template, metadata) if MODEL in template else set()
        problem, extra = self._agree(problem, extra)
        if problem is not None:
            raise CheckpointError(problem)
        if extra:
            raise CheckpointError(
                f"checkpoint {path} has {min(extra)}, which this model lacks: was it saved from "
                "another model.flavor?"
            )
        load_state(template, path)
        if MODEL in template:
            options = StateDictOptions(strict=False)  # each pipeline stage takes its own keys
            for part in self.model_parts:
                set_model_state_dict(part, template[MODEL], options=options)
        for name in groups:
            if name != MODEL:
                self.states[name].load_state_dict(template[name])
        if self.rank == 0:
            logger.info(f"loaded {', '.join(groups)} from {path} in {time.perf_counter() - started:.2f}s")
        return True

    def _choose(self, step: int) -> tuple[str, tuple[str, ...], bool] | None:
        """(path, states to load, whether it is a Hugging Face folder) on rank 0, or None when
        there is nothing to load."""
        s = self.settings
        found = list_checkpoints(self.folder)
        info = None
        if step >= 0:
            if step not in found:
                raise CheckpointError(
                    f"checkpoint.load_step = {step}: no complete checkpoint step-{step} in "
                    f"{self.folder} (complete steps: {sorted(found) or 'none'})"
                )
            info = found[step]
        elif found:
            info = found[max(found)]
        if info is not None:
            path = info.path
            full = info.step > 0
        elif s.initial_load_path or (s.initial_load_in_hf and self.hf_assets_path):
            path = s.initial_load_path or self.hf_assets_path
            if not os.path.exists(path):
                what = "checkpoint.initial_load_path" if s.initial_load_path else "model.hf_assets_path"
                raise CheckpointError(f"{what} {path} does not exist")
            if s.initial_load_in_hf:  # model weights only: nothing else is in such a folder
                return path, tuple(g for g in (MODEL,) if g not in s.exclude_from_loading), True
            full = not s.initial_load_model_weights_only
        else:
            return None
        marker = read_marker(path)
        if marker is not None:
            verify_files(path, marker)
        wanted = (MODEL, *self.states) if full else (MODEL,)
        return path, tuple(g for g in wanted if g not in s.exclude_from_loading), False

    def _template(self, groups: tuple[str, ...]) -> dict[str, Any]:
        """Current state of each group: DCP loads into it in place (its keys, shapes and
        shardings say what each rank reads)."""
        template: dict[str, Any] = {}
        for name in groups:
            template[name] = self._model_state() if name == MODEL else self.states[name].state_dict()
        return template

    def _state(self, only: tuple[str, ...] | None = None) -> dict[str, Any]:
        """What a save writes: the model's and each registered state's state dict."""
        rest = {k: v.state_dict() for k, v in self.states.items() if only is None or k in only}
        return {MODEL: self._model_state(), **rest}

    def _model_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for part in self.model_parts:
            state.update(get_model_state_dict(part))
        return state

    # ---- agreement between ranks --------------------------------------------------------
    def _from_rank0(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and give every rank its result (or its CheckpointError)."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except CheckpointError as e:
                error = str(e)
        if self.world_size > 1:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0)
            result, error = box[0]
        if error is not None:
            raise CheckpointError(error)
        return result

    def _agree(self, problem: str | None, extra: set[str]) -> tuple[str | None, set[str]]:
        """Every rank's load check, combined: the first rank's problem, and the checkpoint
        model keys that no rank has."""
        if self.world_size == 1:
            return problem, extra
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (problem, extra))
        problems = [p for p, _ in gathered if p is not None]
        common = set.intersection(*(e for _, e in gathered))
        return (problems[0] if problems else None), common
