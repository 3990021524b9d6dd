"""CheckpointManager on one process: folder layout, atomicity, load errors, async staging,
seed checkpoints, export, and bit-exact resume of the real Trainer in every async mode."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from small_trainer import small_trainer_config
from torchtitan.components.checkpoint import (
    MARKER,
    CheckpointError,
    CheckpointManager,
    list_checkpoints,
    read_model_state,
    write_model_state,
)
from torchtitan.components.checkpoint import folder as ckpt_folder
from torchtitan.components.checkpoint import manager as ckpt_manager
from torchtitan.components.checkpoint.staging import StagedWriter, StateStager
from torchtitan.components.optimizer import build_optimizers
from torchtitan.config import Checkpoint as CheckpointConfig
from torchtitan.config import ConfigError
from torchtitan.config import Optimizer as OptimizerConfig

REPO = Path(__file__).resolve().parents[2]
MODES = ("disabled", "async", "async_with_pinned_mem")


# ---------------------------------------------------------------- a tiny model + states


class Tiny(nn.Module):
    def __init__(self, width: int = 8, layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): nn.Linear(width, width) for i in range(layers)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = torch.tanh(layer(x))
        return x


class Counter:
    """A Stateful holding plain Python values, like the data loader and train state."""

    def __init__(self) -> None:
        self.value = 0
        self.history: list[int] = []

    def state_dict(self) -> dict:
        return {"value": self.value, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.history = state["value"], list(state["history"])


class Run:
    """Model, optimizer and counter that train a step at a time, with a manager."""

    def __init__(self, dump: Path, seed: int = 0, width: int = 8, layers: int = 2, **settings):
        torch.manual_seed(seed)
        self.model = Tiny(width, layers)
        self.optimizers = build_optimizers(
            [self.model], OptimizerConfig(lr=0.05, implementation="for-loop")
        )
        self.counter = Counter()
        self.width = width
        options = dict(enable=True, interval=1, keep_latest_k=0)
        options.update(settings)
        self.manager = CheckpointManager(
            CheckpointConfig(**options),
            dump_folder=str(dump),
            model_parts=[self.model],
            states={"optimizer": self.optimizers, "train_state": self.counter},
        )

    def step(self) -> None:
        self.optimizers.zero_grad()
        x = torch.randn(4, self.width, generator=torch.Generator().manual_seed(self.counter.value))
        self.model(x).square().mean().backward()
        self.optimizers.step()
        self.counter.value += 1
        self.counter.history.append(self.counter.value)

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def optimizer_state(self) -> dict:
        return {
            k: v.clone() if isinstance(v, torch.Tensor) else v
            for k, v in self.optimizers.state_dict().items()
        }


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


# ---------------------------------------------------------------- folder layout


def test_only_marked_directories_count_and_prune_keeps_newest(tmp_path):
    for step in (1, 2, 3):
        tmp = tmp_path / f"step-{step}.tmp-00"
        tmp.mkdir()
        (tmp / ".metadata").write_bytes(b"m" * step)
        ckpt_folder.finalize(str(tmp), str(tmp_path / f"step-{step}"), step, ["model"])
    (tmp_path / "step-9.tmp-ab").mkdir()  # an interrupted save
    (tmp_path / "step-8").mkdir()  # a directory nobody marked complete: not ours, kept
    (tmp_path / "notes").mkdir()  # not ours: left alone
    found = list_checkpoints(str(tmp_path))
    assert sorted(found) == [1, 2, 3] and found[2].contents == ("model",)
    marker = json.loads((tmp_path / "step-3" / MARKER).read_text())
    assert marker["step"] == 3 and marker["files"] == {".metadata": 3}
    assert marker["format"] == 2 and marker["crc32"] == {".metadata": zlib.crc32(b"mmm")}
    removed = ckpt_folder.prune(str(tmp_path), keep_latest_k=2)
    assert sorted(os.listdir(tmp_path)) == ["notes", "step-2", "step-3", "step-8"]
    assert len(removed) == 2


def test_verify_files_reports_truncation_and_missing_files(tmp_path):
    tmp = tmp_path / "x.tmp"
    tmp.mkdir()
    (tmp / ".metadata").write_bytes(b"12345")
    (tmp / "__0_0.distcp").write_bytes(b"abcdef")
    ckpt_folder.finalize(str(tmp), str(tmp_path / "x"), 0, ["model"])
    marker = ckpt_folder.read_marker(str(tmp_path / "x"))
    ckpt_folder.verify_files(str(tmp_path / "x"), marker)  # intact
    (tmp_path / "x" / "__0_0.distcp").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=r"__0_0.distcp has 3 bytes, 6 were written"):
        ckpt_folder.verify_files(str(tmp_path / "x"), marker)
    (tmp_path / "x" / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="__0_0.distcp is missing"):
        ckpt_folder.verify_files(str(tmp_path / "x"), marker)


# ---------------------------------------------------------------- save / load round trips


def test_round_trip_restores_model_optimizer_and_state(tmp_path, pg):
    a = Run(tmp_path, interval=2)
    for _ in range(4):
        a.step()
        a.manager.save(a.counter.value)
    assert sorted(list_checkpoints(str(tmp_path / "checkpoint"))) == [2, 4]
    b = Run(tmp_path, seed=1, interval=2)  # different initial weights
    assert not _equal(b.params(), a.params())
    assert b.manager.load()
    assert _equal(b.params(), a.params())
    assert _equal(b.optimizer_state(), a.optimizer_state())
    assert b.counter.state_dict() == {"value": 4, "history": [1, 2, 3, 4]}
    # both continue identically
    a.step(), b.step()
    assert _equal(b.params(), a.params())


def test_load_step_keep_latest_k_and_exclude(tmp_path, pg):
    a = Run(tmp_path, keep_latest_k=2)
    snapshots = {}
    for _ in range(4):
        a.step()
        a.manager.save(a.counter.value)
        snapshots[a.counter.value] = a.params()
    assert sorted(list_checkpoints(str(tmp_path / "checkpoint"))) == [3, 4]
    b = Run(tmp_path, seed=1, load_step=3)
    assert b.manager.load()
    assert _equal(b.params(), snapshots[3]) and b.counter.value == 3
    with pytest.raises(CheckpointError, match=r"load_step = 1: no complete checkpoint step-1 .*\[3, 4\]"):
        Run(tmp_path, load_step=1).manager.load()
    c = Run(tmp_path, seed=1, exclude_from_loading=["optimizer", "train_state"])
    assert c.manager.load()
    assert _equal(c.params(), snapshots[4])
    assert c.counter.value == 0 and c.optimizers.optimizers[0].state == {}  # fresh: untouched
    with pytest.raises(ConfigError, match="exclude_from_loading.*'dataloader' is no checkpoint state"):
        Run(tmp_path, exclude_from_loading=["dataloader"])


def test_interval_and_last_step(tmp_path, pg):
    a = Run(tmp_path, interval=3)
    saved = [step for step in range(1, 8) if a.manager.save(step, last_step=step == 7)]
    assert saved == [3, 6, 7]
    assert not Run(tmp_path, enable=False).manager.save(3)


def test_saving_a_step_again_replaces_it(tmp_path, pg):
    first = Run(tmp_path, seed=1)
    first.step()
    first.manager.save(1)
    second = Run(tmp_path, seed=2)  # e.g. a restart from an earlier step reaching step 1 again
    second.step()
    second.manager.save(1)
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-1"]
    loaded = Run(tmp_path, seed=3)
    assert loaded.manager.load() and _equal(loaded.params(), second.params())
    assert not _equal(loaded.params(), first.params())


def test_nothing_to_load_starts_fresh(tmp_path, pg):
    run = Run(tmp_path)
    before = run.params()
    assert not run.manager.load()
    assert _equal(run.params(), before)


# ---------------------------------------------------------------- atomicity and errors


def test_incomplete_directories_are_ignored_then_cleaned(tmp_path, pg):
    a = Run(tmp_path)
    a.step()
    a.manager.save(1)
    folder = tmp_path / "checkpoint"
    # what a crash leaves behind: data without marker, under both naming schemes
    shutil.copytree(folder / "step-1", folder / "step-5.tmp-0badc0de")
    shutil.copytree(folder / "step-1", folder / "step-6")
    (folder / "step-6" / MARKER).unlink()
    (folder / "step-6" / ".metadata").unlink()  # no marker, no .metadata: not a checkpoint
    b = Run(tmp_path, seed=1)
    assert b.manager.load() and b.counter.value == 1  # latest complete = step 1
    b.step()
    b.manager.save(2)
    assert sorted(os.listdir(folder)) == ["step-1", "step-2", "step-6"]  # step-6 is not ours: kept


@pytest.mark.parametrize("fail", [True, False])
def test_save_errors_name_the_path(tmp_path, pg, monkeypatch, caplog, fail):
    run = Run(tmp_path, fail_on_save_error=fail)
    run.step()

    def broken_save(*args, **kwargs):
        raise PermissionError("Permission denied")

    monkeypatch.setattr(ckpt_manager.dcp, "save", broken_save)
    if fail:
        with pytest.raises(
            CheckpointError, match=r"saving checkpoint step 1 to .*step-1\.tmp-\w+ failed: PermissionError: Permission denied"
        ):
            run.manager.save(1)
    else:
        with caplog.at_level(logging.ERROR):
            run.manager.save(1)  # logged, training goes on
        assert any("step-1.tmp" in r.getMessage() and "Permission denied" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert list_checkpoints(str(tmp_path / "checkpoint")) == {}
    run.step()
    run.manager.save(2)
    assert sorted(list_checkpoints(str(tmp_path / "checkpoint"))) == [2]


def test_load_errors_are_one_line(tmp_path, pg):
    a = Run(tmp_path, width=8, layers=2)
    a.step()
    a.manager.save(1)
    path = tmp_path / "checkpoint" / "step-1"

    def error(run: Run) -> str:
        with pytest.raises(CheckpointError) as info:
            run.manager.load()
        message = str(info.value)
        assert "\n" not in message
        return message

    other = tmp_path / "other"
    wider = error(Run(tmp_path, width=16))
    assert "model.layers.0.weight is (8, 8) there but (16, 16) here" in wider
    deeper = error(Run(tmp_path, layers=3))
    assert "lacks model.layers.2.weight" in deeper
    shallower = error(Run(tmp_path, layers=1))
    assert "has model.layers.1.bias, which this model lacks" in shallower
    missing = error(Run(other, initial_load_path=str(tmp_path / "nowhere")))
    assert "initial_load_path" in missing and "does not exist" in missing
    (tmp_path / "not_dcp").mkdir()
    not_dcp = error(Run(other, initial_load_path=str(tmp_path / "not_dcp")))
    assert "no .metadata" in not_dcp and "convert_hf_to_dcp" in not_dcp
    # truncated data file: caught by the sizes the marker recorded
    data = next(path.glob("*.distcp"))
    content = data.read_bytes()
    data.write_bytes(content[: len(content) // 2])
    truncated = error(Run(tmp_path))
    assert "is corrupt" in truncated and data.name in truncated
    # same size, garbage bytes: the CRC-32 in the marker catches it
    data.write_bytes(b"\0" * len(content))
    garbage = error(Run(tmp_path))
    assert garbage.startswith(f"checkpoint {path} is corrupt: {data.name} does not match the checksum")
    # a format-1 marker (sizes only) has no checksums: DCP's reader fails, in one line
    marker = json.loads((path / MARKER).read_text())
    del marker["crc32"]
    (path / MARKER).write_text(json.dumps({**marker, "format": 1}))
    garbage = error(Run(tmp_path))
    assert garbage.startswith(f"cannot load checkpoint {path}") and "corrupt" in garbage
    meta = path / ".metadata"
    meta.write_bytes(b"\0" * meta.stat().st_size)
    assert "cannot read .metadata" in error(Run(tmp_path))


# ---------------------------------------------------------------- async saves


@pytest.mark.parametrize("mode", ["async", "async_with_pinned_mem"])
def test_async_save_is_a_snapshot_marked_only_when_written(tmp_path, pg, monkeypatch, mode):
    release = threading.Event()
    original = StagedWriter.write_data

    def gated_write(self, plan, planner):
        assert release.wait(timeout=60)
        return original(self, plan, planner)

    monkeypatch.setattr(StagedWriter, "write_data", gated_write)
    run = Run(tmp_path, async_mode=mode)
    run.step()
    run.manager.save(1)
    snapshot = run.params()
    folder = tmp_path / "checkpoint"
    assert list_checkpoints(str(folder)) == {}  # the background write is held back
    assert run.manager.last_blocked_seconds < 30  # save() returned while the write waits 60 s
    with torch.no_grad():  # training goes on and changes the weights in place
        for p in run.model.parameters():
            p.add_(1.0)
    release.set()
    run.manager.close()  # waits for the write, then marks it complete
    assert sorted(list_checkpoints(str(folder))) == [1]
    loaded = Run(tmp_path, seed=3, load_step=1)
    assert loaded.manager.load()
    assert _equal(loaded.params(), snapshot)  # the staged copy, not the later weights


def test_stager_copies_each_tensor_once_and_reuses_its_buffers(pg):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    weight = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
    state = {
        "model": {"w": weight, "b": torch.randn(4)},
        "optimizer": {"state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(8, 4)}}, "param_groups": [{"lr": 0.1}]},
        "train_state": {"tokens": [1, 2]},
    }
    stager = StateStager(("model", "optimizer"), pin_memory=False)
    first = stager.stage(state)
    staged_w = first["model"]["w"]
    assert isinstance(staged_w, DTensor) and staged_w.placements == weight.placements
    assert staged_w.shape == weight.shape and torch.equal(staged_w.to_local(), weight.to_local())
    assert first["optimizer"]["param_groups"] == [{"lr": 0.1}] and first["train_state"] == {"tokens": [1, 2]}
    # real copies: training changes the live tensors in place, the staged ones stay
    with torch.no_grad():
        weight.to_local().add_(1.0)
        state["model"]["b"].add_(1.0)
    state["train_state"]["tokens"].append(3)
    assert not torch.equal(staged_w.to_local(), weight.to_local())
    assert first["train_state"] == {"tokens": [1, 2]}
    first_b = first["model"]["b"].clone()
    second = stager.stage(state)  # the next save, once the first one is written
    assert torch.equal(second["model"]["w"].to_local(), weight.to_local())
    assert torch.equal(second["model"]["b"], state["model"]["b"]) and not torch.equal(second["model"]["b"], first_b)
    # one allocation for the run: the second save copies into the first one's buffers
    assert second["model"]["b"].data_ptr() == first["model"]["b"].data_ptr()
    assert second["model"]["w"].to_local().data_ptr() == staged_w.to_local().data_ptr()
    state["model"]["b"] = torch.randn(5)  # a changed shape gets a new buffer
    assert stager.stage(state)["model"]["b"].shape == (5,)


def test_stager_reserves_its_buffers_ahead_of_the_first_save(pg):
    """``reserve`` allocates on a thread from the shapes alone; the first ``stage`` copies
    into exactly those buffers (pinning them is what made the 8B flavor's first save slow)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor, Shard

    weight = distribute_tensor(torch.randn(8, 4), init_device_mesh("cpu", (1,)), [Shard(0)])
    state = {"model": {"w": weight}, "optimizer": {"state": {"w": {"exp_avg": torch.randn(8, 4)}}, "groups": [(0.1, torch.ones(2))]}}
    stager = StateStager(("model", "optimizer"), pin_memory=False)
    stager.reserve(state)
    stager.wait_reserved()
    reserved = stager._buffers
    assert stager.reserve_seconds is not None and reserved["model"]["w"].placements == weight.placements
    staged = stager.stage(state)
    assert staged["model"]["w"].to_local().data_ptr() == reserved["model"]["w"].to_local().data_ptr()
    assert staged["optimizer"]["state"]["w"]["exp_avg"].data_ptr() == reserved["optimizer"]["state"]["w"]["exp_avg"].data_ptr()
    assert torch.equal(staged["model"]["w"].to_local(), weight.to_local())
    assert torch.equal(staged["optimizer"]["groups"][0][1], torch.ones(2)) and staged["optimizer"]["groups"][0][0] == 0.1
    # one host arena (page-locked as a whole where CUDA is), yet every buffer has a storage of
    # its own size: DCP's writer would copy a tensor that views a larger storage once more
    arena = stager._arena.data
    for t in (staged["model"]["w"].to_local(), staged["optimizer"]["state"]["w"]["exp_avg"]):
        assert arena.data_ptr() <= t.data_ptr() < arena.data_ptr() + arena.numel()
        assert t.untyped_storage().size() == t.nbytes


@pytest.mark.parametrize("mode", ["async", "async_with_pinned_mem"])
def test_manager_reserves_staging_after_the_first_step(tmp_path, pg, mode):
    run = Run(tmp_path, async_mode=mode, interval=3)
    run.step()
    assert not run.manager.save(1)  # not a checkpoint step, but the buffers get reserved
    stager = run.manager._stager
    stager.wait_reserved()
    reserved = stager._buffers
    assert set(reserved) == {"model", "optimizer"}
    ptrs = {t.data_ptr() for t in _tensors(reserved)}
    for step in (2, 3):
        run.step()
        run.manager.save(step)
    assert {t.data_ptr() for t in _tensors(stager._buffers)} == ptrs  # the save used them
    snapshot = run.params()
    run.manager.close()
    loaded = Run(tmp_path, seed=3, load_step=3)
    assert loaded.manager.load() and _equal(loaded.params(), snapshot)


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return [tree] if isinstance(tree, torch.Tensor) else []


# ---------------------------------------------------------------- seed, export, initial load


def test_model_weights_only_export_in_export_dtype(tmp_path, pg):
    run = Run(tmp_path, model_weights_only=True, export_dtype="bfloat16", interval=2)
    for step in (1, 2, 3):
        run.step()
        run.manager.save(step, last_step=step == 3)
    found = list_checkpoints(str(tmp_path / "checkpoint"))
    assert found[2].contents == ("model", "optimizer", "train_state")
    assert found[3].contents == ("model",)
    exported = read_model_state(found[3].path)
    params = run.params()
    assert exported.keys() == params.keys()
    for k in params:
        assert exported[k].dtype == torch.bfloat16
        assert torch.equal(exported[k], params[k].to(torch.bfloat16))
    message = str(pytest.raises(CheckpointError, Run(tmp_path).manager.load).value)
    assert "holds no optimizer state" in message and "exclude_from_loading" in message


def test_seed_checkpoint_and_initial_load_give_weights_only(tmp_path, pg):
    seed = Run(tmp_path / "a", seed=7)
    seed.manager.save_seed()
    folder = tmp_path / "a" / "checkpoint"
    assert list_checkpoints(str(folder))[0].contents == ("model",)
    b = Run(tmp_path / "a", seed=8)
    assert b.manager.load()
    assert _equal(b.params(), seed.params())
    assert b.counter.value == 0 and b.optimizers.optimizers[0].state == {}
    # a full checkpoint as initial_load_path: weights only by default, everything on request
    seed.step()
    seed.manager.save(1)
    full = str(folder / "step-1")
    c = Run(tmp_path / "c", seed=9, initial_load_path=full)
    assert c.manager.load() and _equal(c.params(), seed.params()) and c.counter.value == 0
    d = Run(tmp_path / "d", seed=9, initial_load_path=full, initial_load_model_weights_only=False)
    assert d.manager.load() and d.counter.value == 1
    assert _equal(d.optimizer_state(), seed.optimizer_state())


def test_write_and_read_model_state_without_process_group(tmp_path):
    state = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    write_model_state(state, str(tmp_path / "w"))
    back = read_model_state(str(tmp_path / "w"))
    assert _equal(back, state)
    with pytest.raises(CheckpointError, match="already exists"):
        write_model_state(state, str(tmp_path / "w"))


# ---------------------------------------------------------------- the trainer


def _trainer_config(dump: Path, *overrides: str):
    return small_trainer_config(
        dump,
        "--job.no-print_config",
        "--training.seq_len", "64",
        "--training.local_batch_size", "2",
        "--training.deterministic",
        "--activation_checkpoint.mode", "none",
        "--metrics.log_freq", "1",
        "--comm.trace_buf_size", "0",
        *overrides,
    )


def _train(cfg) -> tuple[list[float], dict[str, torch.Tensor], object]:
    from torchtitan.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        losses = trainer.train()
        params = {k: v.detach().clone() for k, v in trainer.model_parts[0].state_dict().items()}
        state = trainer.state_dict()
    finally:
        trainer.close()
    return losses, params, state


def test_trainer_resume_is_bit_exact_in_every_async_mode(tmp_path):
    """6 steps (lr warmup 2, then decay) saving every 3; the step-6 checkpoint is deleted
    (the run stopped after step 3) and a new Trainer resumes: steps 4-6 repeat exactly.
    (It was 20 steps resumed at 10; what must carry over, optimizer state, data position, lr
    schedule past its warmup, step count, is all there after 3.)"""
    steps = ["--training.steps", "6", "--lr_scheduler.warmup_steps", "2"]
    reference, final, _ = _train(_trainer_config(tmp_path / "reference", *steps))
    assert len(reference) == 6
    for mode in MODES:
        dump = tmp_path / mode
        cfg = ["--checkpoint.enable", "--checkpoint.interval", "3", "--checkpoint.async_mode", mode]
        saving, saving_final, _ = _train(_trainer_config(dump, *steps, *cfg))
        assert saving == reference, mode  # saving does not disturb training
        assert _equal(saving_final, final), mode
        shutil.rmtree(dump / "checkpoint" / "step-6")
        resumed, resumed_final, state = _train(_trainer_config(dump, *steps, *cfg))
        assert resumed == reference[3:], mode
        assert _equal(resumed_final, final), mode
        assert state == {"step": 6, "ntokens_seen": 6 * 2 * 64}


def test_trainer_seed_checkpoint(tmp_path):
    """One process writes step-0; a run with another seed starts from those weights."""
    from torchtitan.trainer import Trainer

    seed_cfg = _trainer_config(tmp_path, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint")
    losses, seed_params, _ = _train(seed_cfg)
    assert losses == []
    found = list_checkpoints(str(tmp_path / "checkpoint"))
    assert list(found) == [0] and found[0].contents == ("model",)
    trainer = Trainer(_trainer_config(tmp_path, "--checkpoint.enable", "--training.seed", "1234"))
    try:
        fresh = {k: v.detach().clone() for k, v in trainer.model_parts[0].state_dict().items()}
        assert not _equal(fresh, seed_params)
        assert trainer.checkpointer.load() and trainer.step == 0
        loaded = {k: v.detach().clone() for k, v in trainer.model_parts[0].state_dict().items()}
        assert _equal(loaded, seed_params)
    finally:
        trainer.close()


def test_cli_load_error_exits_2_with_one_line(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torchtitan.train",
        "--job.config_file",
        str(REPO / "train_configs" / "debug_model.toml"),
        "--job.dump_folder",
        str(tmp_path),
        "--training.steps",
        "1",
        "--training.seq_len",
        "32",
        "--checkpoint.enable",
        "--checkpoint.initial_load_path",
        str(tmp_path / "missing"),
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    err = [line for line in out.stderr.splitlines() if line.startswith("torchtitan: error")]
    assert len(err) == 1 and "initial_load_path" in err[0] and "does not exist" in err[0]
    assert "Traceback" not in out.stderr


def test_staging_layout_keeps_each_tensor_inside_one_registered_region(monkeypatch):
    """CUDA rejects a copy whose host range spans two cudaHostRegister calls (seen on the GPU
    as 'invalid argument' for the 3B embedding's 1.5 GiB), so regions never split a tensor."""
    from torchtitan.components.checkpoint import staging

    monkeypatch.setattr(staging, "_REGION", 64 << 10)  # 64 KiB regions at test scale
    sizes = [10_000, 30_000, 200_000, 5, 40_000, 40_000, 0, 70_000]  # float32 elements
    layout = staging._Layout()
    slots = layout.add([torch.empty(n) for n in sizes])
    regions = layout.regions()
    assert regions[0][0] == 0 and all(a % staging._PAGE == 0 for a, _ in regions)
    assert all(b <= c for (_, b), (c, _) in zip(regions, regions[1:]))  # ordered, disjoint
    for slot in (s for s in slots if s.nbytes):  # (an empty tensor is never copied)
        inside = [r for r in regions if r[0] <= slot.offset and slot.offset + slot.nbytes <= r[1]]
        assert len(inside) == 1, (slot.offset, slot.nbytes, regions)
    for a, b in regions:  # a region over the size holds a single tensor that needs it all
        held = [s for s in slots if s.nbytes and a <= s.offset < b]
        assert held and (b - a <= 64 << 10 or len(held) == 1), (a, b, [s.nbytes for s in held])
    assert len(regions) > 3  # the sizes above do not fit one region
    arena = staging.HostArena(layout.nbytes, regions, pin=False)
    views = [arena.view(s.offset, s.shape, s.dtype) for s in slots]
    for v, n in zip(views, sizes):
        v.fill_(float(n))
    # every element of every view holds its own value: no two slots overlap
    assert all(torch.all(v == float(n)) for v, n in zip(views, sizes)), [v.numel() for v in views]
    spans = sorted((s.offset, s.offset + s.nbytes) for s in slots if s.nbytes)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
