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

What a load trusts (docs/fault_tolerance.md, "What a checkpoint load checks"): the files
against the sizes and CRC-32s of the marker, ``.metadata``'s file names (inside the
folder), the shapes against the model, and the loaded model and optimizer state for
NaN/inf. A checkpoint that is corrupt is reported in one line and the next older one is
tried; with ``checkpoint.load_step`` pinned to it the load stops instead.
"""

from __future__ import annotations

import errno
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

from torchtitan.components.checkpoint.checksum import ChecksumWriter
from torchtitan.components.checkpoint.folder import (
    MARKER,
    CheckpointError,
    checksum_share,
    finalize,
    prune,
    read_marker,
    remove_leftovers,
    scan,
    step_dir,
    tmp_dir,
    verify_checksums,
    verify_files,
)
from torchtitan.components.checkpoint.hf import load_hf, read_hf_index, save_hf
from torchtitan.components.checkpoint.staging import StagedWriter, StateStager
from torchtitan.components.checkpoint.storage import (
    MODEL,
    UnsafeCheckpoint,
    check_template,
    describe_error,
    flatten,
    load_state,
    read_metadata,
    unexpected_model_keys,
)
from torchtitan.config import Checkpoint as CheckpointConfig
from torchtitan.config import ConfigError
from torchtitan.distributed.utils import TORCH_DTYPE_MAP
from torchtitan.tools.logging import logger

__all__ = ["CheckpointManager", "Stateful", "first_non_finite"]


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
    writer: ChecksumWriter | None = None
    nbytes: int = 0  # the checkpoint's estimated size, for a "no space left" message


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
        self.last_save_error: str | None = None  # set when the newest save failed
        self._reported: set[str] = set()  # step folders already reported as skipped
        self._leftovers_removed = False
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
        self._refuse_non_finite(step, {MODEL: self._model_state()})
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

    def finish(self) -> None:
        """End of training: wait for the last save and raise if it failed, also with
        ``fail_on_save_error`` off (the run must not exit 0 without its final checkpoint).
        Collective: a failure seen by rank 0 alone (its marker) stops every rank."""
        if not self.settings.enable:
            return
        self.wait()
        error = self.last_save_error
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, error)
            error = next((e for e in gathered if e is not None), None)
        if error is not None:
            raise CheckpointError(f"the last checkpoint save failed: {error}")

    def _write(self, step: int, state: dict[str, Any], background: bool) -> None:
        self._refuse_non_finite(step, state)
        save = _Save(
            step=step,
            tmp=tmp_dir(self.folder, step, self._nonce),
            final=step_dir(self.folder, step),
            contents=sorted(state),
            started=time.perf_counter(),
            nbytes=_nbytes(state),
        )
        if self.rank == 0 and not self._leftovers_removed:
            # Partial saves of dead runs hold disk space a retry needs: remove them first.
            self._leftovers_removed = True
            remove_leftovers(self.folder, keep=self._nonce)
        try:
            if background:
                assert self._stager is not None
                staged = self._stager.stage(state)
                save.writer = StagedWriter(save.tmp)
                result = dcp.async_save(
                    staged,
                    checkpoint_id=save.tmp,
                    storage_writer=save.writer,
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
            save.writer = ChecksumWriter(save.tmp)
            dcp.save(state, checkpoint_id=save.tmp, storage_writer=save.writer)
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
        self.last_save_error = None
        if self.rank != 0:
            return
        try:
            checksums = save.writer.checksums if save.writer is not None else None
            finalize(save.tmp, save.final, save.step, save.contents, checksums)
            prune(self.folder, self.settings.keep_latest_k, upto=save.step)
        except Exception as e:
            self._failed(save, e)
            return
        self._report_skipped()
        logger.info(
            f"saved checkpoint {save.final} ({', '.join(save.contents)}) in "
            f"{time.perf_counter() - save.started:.2f}s"
        )

    def _failed(self, save: _Save, e: BaseException) -> None:
        """Report a failed save in one line, remove its partial folder (older checkpoints
        stay), and raise unless ``fail_on_save_error`` is off. Every rank's DCP call has
        returned by now (its last phase gathers every rank's result), so nobody still
        writes into the folder rank 0 removes."""
        free = _free_bytes(self.folder)
        if self.rank == 0:
            shutil.rmtree(save.tmp, ignore_errors=True)
            remove_leftovers(self.folder)
        if _no_space(e, free, save.nbytes):
            message = (
                f"no space left on {self.folder}: checkpoint step {save.step} needs ~"
                f"{save.nbytes / 2**30:.3g} GiB, {_free_bytes(self.folder) / 2**30:.3g} GiB are free "
                f"with its partial folder removed; free space or lower checkpoint.keep_latest_k"
            )
        else:
            message = f"saving checkpoint step {save.step} to {save.tmp} failed: {describe_error(e)}"
        self.last_save_error = message
        if self.settings.fail_on_save_error:
            raise CheckpointError(message + " (checkpoint.fail_on_save_error is on)") from e
        logger.error(message + "; training goes on (checkpoint.fail_on_save_error is off)")

    def _refuse_non_finite(self, step: int, state: dict[str, Any]) -> None:
        """Never write NaN/inf model or optimizer state (an inf in Adam's second moment
        leaves the weights finite but poisons every resume). Agreed across ranks, since each
        holds only its shards."""
        bad = self._first(first_non_finite({k: state[k] for k in (MODEL, "optimizer") if k in state}))
        if bad is not None:
            raise CheckpointError(
                f"not saving checkpoint step {step} to {self.folder}: {bad} is not finite; "
                "resume from the last complete checkpoint (see fault_tolerance.non_finite_policy)"
            )

    # ---- loading ------------------------------------------------------------------------
    def load(self, step: int | None = None) -> bool:
        """Resume from the checkpoint folder, else start from ``initial_load_path``; return
        whether anything was loaded. ``step`` (default ``checkpoint.load_step``): -1 = the
        newest checkpoint that loads intact (a corrupt one is reported and the next older
        one tried); a pinned step loads that one or stops. ``step-0`` (a seed checkpoint)
        and, by default, ``initial_load_path`` give model weights only."""
        s = self.settings
        if not s.enable and s.initial_load_path and self.rank == 0:
            logger.warning("checkpoint.initial_load_path is ignored: checkpoint.enable is off")
        if not s.enable or s.create_seed_checkpoint:
            return False
        wanted = s.load_step if step is None else step
        candidates = self._from_rank0(lambda: self._candidates(wanted))
        if not candidates:
            logger.info(f"no checkpoint in {self.folder}: starting from scratch")
            return False
        path, groups, in_hf, _ = candidates[0]
        if in_hf and groups:
            started = time.perf_counter()
            load_hf(path, self.model_parts, self.sd_adapter)
            self._hf_file_index = read_hf_index(path)
            if self.rank == 0:
                logger.info(f"loaded the model from Hugging Face folder {path} in {time.perf_counter() - started:.2f}s")
            return True
        first = None
        for i, (path, groups, _, marker) in enumerate(candidates):
            if not groups:
                logger.info(f"checkpoint {path}: every state is in checkpoint.exclude_from_loading")
                return False
            problem = self._try_load(path, groups, marker)
            if problem is None:
                return True
            if len(candidates) == 1:
                raise CheckpointError(problem)
            first = first or problem
            if i + 1 < len(candidates) and self.rank == 0:
                logger.warning(f"{problem}; trying the next older checkpoint")
        raise CheckpointError(f"{first}; and no older checkpoint of {self.folder} loads either")

    def _try_load(self, path: str, groups: tuple[str, ...], marker: dict[str, Any] | None) -> str | None:
        """Load ``groups`` from ``path``: None when done, else why the checkpoint is corrupt
        (the caller may try an older one). Raises for what no older checkpoint would fix:
        another model shape, a crafted ``.metadata``."""
        started = time.perf_counter()
        problem = self._first(self._verify_share(path, marker))
        if problem is not None:
            return problem
        template = self._template(groups)
        stored = template  # the same tensors, keyed as the checkpoint keys them
        fatal, extra = None, set()
        try:
            metadata = read_metadata(path)
        except UnsafeCheckpoint as e:
            fatal = str(e)
        except CheckpointError as e:
            problem = str(e)
        else:
            stored = _upstream_layout(template, metadata)
            fatal = check_template(stored, metadata, path)
            if fatal is None and MODEL in stored:
                extra = unexpected_model_keys(stored, metadata)
        fatal, extra = self._agree(fatal, extra)
        if fatal is not None:
            raise CheckpointError(fatal)
        problem = self._first(problem)
        if problem is not None:
            return problem
        if extra:
            raise CheckpointError(
                f"checkpoint {path} has {min(extra)}, which this model lacks: was it saved from "
                "another model.flavor?"
            )
        try:
            load_state(stored, path)
        except CheckpointError as e:
            problem = str(e)
        problem = self._first(problem)
        if problem is not None:
            return problem
        bad = self._first(first_non_finite({k: v for k, v in template.items() if k in (MODEL, "optimizer")}))
        if bad is not None:
            return f"checkpoint {path} is corrupt: {bad} is NaN or inf"
        if MODEL in template:
            options = StateDictOptions(strict=False)  # each pipeline stage takes its own keys
            for part in self.model_parts:
                set_model_state_dict(part, template[MODEL], options=options)
        for name in groups:
            if name != MODEL:
                self.states[name].load_state_dict(template[name])
        if self.rank == 0:
            if marker is None and os.path.dirname(path) == self.folder:
                logger.warning(
                    f"checkpoint {path} has no {MARKER} marker: loaded as a TorchTitan-format DCP "
                    "checkpoint, unverified (no sizes or checksums to check it against)"
                )
            logger.info(f"loaded {', '.join(groups)} from {path} in {time.perf_counter() - started:.2f}s")
        return None

    def _verify_share(self, path: str, marker: dict[str, Any] | None) -> str | None:
        """This rank's part of checking ``path`` against its marker: rank 0 the sizes of
        every file, each rank the checksums of its share (folder.checksum_share)."""
        if marker is None:
            return None
        try:
            if self.rank == 0:
                verify_files(path, marker)
            verify_checksums(path, marker, checksum_share(marker, self.rank, self.world_size))
        except CheckpointError as e:
            return str(e)
        except OSError as e:  # e.g. permissions: this rank must still reach the agreement
            return f"checkpoint {path} cannot be checked: {describe_error(e)}"
        return None

    def _candidates(self, step: int) -> list[tuple[str, tuple[str, ...], bool, dict[str, Any] | None]]:
        """On rank 0: (path, states to load, whether it is a Hugging Face folder, marker) of
        each checkpoint to try, newest first; empty when there is nothing to load."""
        s = self.settings
        found = scan(self.folder)
        self._report_skipped(found)
        loadable = found.loadable()
        if step >= 0:
            if step not in loadable:
                why = found.skipped.get(step_dir(self.folder, step))
                raise CheckpointError(
                    f"checkpoint.load_step = {step}: no complete checkpoint step-{step} in "
                    f"{self.folder} " + (f"({why})" if why else f"(complete steps: {sorted(loadable) or 'none'})")
                )
            infos = [loadable[step]]
        else:
            infos = [loadable[k] for k in sorted(loadable, reverse=True)]
        if infos:
            return [(i.path, self._groups(i.step > 0), False, i.marker) for i in infos]
        if s.initial_load_path or (s.initial_load_in_hf and self.hf_assets_path):
            path = s.initial_load_path or self.hf_assets_path
            if not os.path.exists(path):
                what = "checkpoint.initial_load_path" if s.initial_load_path else "model.hf_assets_path"
                raise CheckpointError(f"{what} {path} does not exist")
            if s.initial_load_in_hf:  # model weights only: nothing else is in such a folder
                return [(path, tuple(g for g in (MODEL,) if g not in s.exclude_from_loading), True, None)]
            full = not s.initial_load_model_weights_only
            return [(path, self._groups(full), False, read_marker(path))]
        return []

    def _groups(self, full: bool) -> tuple[str, ...]:
        wanted = (MODEL, *self.states) if full else (MODEL,)
        return tuple(g for g in wanted if g not in self.settings.exclude_from_loading)

    def _report_skipped(self, found: Any = None) -> None:
        """One line per step folder that is neither loaded nor ever deleted (rank 0, once)."""
        found = scan(self.folder) if found is None else found
        for path, why in sorted(found.skipped.items()):
            if path not in self._reported:
                self._reported.add(path)
                logger.warning(f"checkpoint folder {path} is skipped and kept: {why}")

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

    def _first(self, value: Any) -> Any:
        """The first rank's non-None ``value`` (None when every rank has None)."""
        if self.world_size == 1:
            return value
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return next((v for v in gathered if v is not None), None)

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


# ---- helpers ----------------------------------------------------------------------------
def first_non_finite(state: dict[str, Any]) -> str | None:
    """The first key (DCP's dotted name) of ``state`` holding a NaN or inf on this rank
    (local shards of DTensors), or None. One small kernel per tensor and one device-to-host
    copy for all of them."""
    names, checks = [], []
    for name, value in flatten(state):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            local = value.to_local() if hasattr(value, "to_local") else value
            try:
                checks.append(torch.isfinite(local).all())
            except (RuntimeError, NotImplementedError):  # a tensor subclass without isfinite
                continue
            names.append(name)
    if not checks:
        return None
    finite = torch.stack([c.to(checks[0].device) for c in checks]).tolist()
    return next((n for n, ok in zip(names, finite) if not ok), None)


def _upstream_layout(template: dict[str, Any], metadata: Any) -> dict[str, Any]:
    """``template`` keyed like ``metadata``: TorchTitan (upstream) stores the model's
    parameters at the top level (``tok_embeddings.weight``), this project under ``model.``.
    The values are the same tensors, so loading into either fills ``template``."""
    stored = metadata.state_dict_metadata
    model = template.get(MODEL)
    if not model or any(key.startswith(MODEL + ".") for key in stored):
        return template
    if not any(key in stored for key in model):
        return template
    return {**model, **{k: v for k, v in template.items() if k != MODEL}}


def _nbytes(state: dict[str, Any]) -> int:
    """The bytes a checkpoint of ``state`` takes on disk, all ranks together (DTensors by
    their global shape), as an estimate for the "no space left" message."""
    total = 0
    for _, value in flatten(state):
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def _free_bytes(folder: str) -> int:
    path = folder
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return 0


def _no_space(e: BaseException, free: int, needed: int) -> bool:
    """Whether a failed save ran out of disk space. DCP writes tensors through torch.save,
    whose zip writer turns the OSError(ENOSPC) of a full disk into "unexpected pos" (the
    OSError only survives as ``__context__`` on the rank that hit it)."""
    seen: list[BaseException] = []
    todo = [e]
    while todo:
        cur = todo.pop()
        if cur is None or any(cur is x for x in seen):
            continue
        seen.append(cur)
        if isinstance(cur, OSError) and cur.errno == errno.ENOSPC:
            return True
        text = str(cur)
        if "No space left on device" in text or ("unexpected pos" in text and free < needed):
            return True
        if isinstance(cur, CheckpointException):
            todo.extend(inner for inner, _ in cur.failures.values())
        todo.extend([cur.__cause__, cur.__context__])
    return False
