"""Checkpoint hardening (issue #27), one test per class of defect:

1. retention deletes only checkpoints this project marked complete; an unmarked DCP
   checkpoint (TorchTitan's format) loads, explicitly; damaged or unknown step folders are
   reported once and kept;
2. a same-size overwrite inside a ``.distcp`` is caught by the CRC-32 in the marker: the
   load names the file and falls back to the newest intact checkpoint (a pinned
   ``load_step`` stops with one line);
3. an inf in Adam's second moment is refused at save and, in a checkpoint, at load;
4. ``.metadata`` naming a file outside its folder (another run's weights) is refused, and
   folder options must stay inside ``job.dump_folder``;
5. a full disk during a save: one line with the size needed, the partial folder removed,
   older checkpoints kept; the real trainer exits non-zero when its last save failed
   (on a real, small tmpfs when this process may mount one), and then resumes past a
   corrupt newest checkpoint to an unmarked one (1 and 2 as a user meets them).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import uuid
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem

from small_trainer import small_trainer_args, small_trainer_config
from test_checkpoint import Run, _equal
from torchtitan.components.checkpoint import MARKER, CheckpointError, list_checkpoints
from torchtitan.components.checkpoint import folder as ckpt_folder
from torchtitan.components.checkpoint import manager as ckpt_manager
from torchtitan.components.checkpoint.folder import check_dump_subfolders, crc32_file
from torchtitan.components.checkpoint.storage import read_metadata
from torchtitan.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _save_steps(run: Run, steps: int) -> dict[int, dict[str, torch.Tensor]]:
    snapshots = {}
    for _ in range(steps):
        run.step()
        run.manager.save(run.counter.value)
        snapshots[run.counter.value] = run.params()
    return snapshots


def _messages(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


# ---------------------------------------------------------------- 1. retention, unmarked


def test_retention_keeps_what_it_did_not_mark_and_unmarked_dcp_loads(tmp_path, pg, caplog):
    folder = tmp_path / "checkpoint"
    a = Run(tmp_path)
    _save_steps(a, 2)
    # TorchTitan's layout: model parameters at the top level, no completion marker
    upstream = Run(tmp_path / "elsewhere", seed=7)
    for _ in range(5):
        upstream.step()
    state = {**upstream.model.state_dict(), "optimizer": upstream.optimizers.state_dict(),
             "train_state": upstream.counter.state_dict()}
    dcp.save(state, checkpoint_id=str(folder / "step-5"), no_dist=True)
    shutil.copytree(folder / "step-2", folder / "step-4")
    (folder / "step-4" / MARKER).write_text('{"step": 4, "files": ')  # garbled marker, intact files
    (folder / "step-9").mkdir()  # neither marker nor .metadata
    (folder / "step-9" / "notes.txt").write_text("mine")

    b = Run(tmp_path, seed=1, keep_latest_k=1)
    with caplog.at_level(logging.WARNING):
        assert b.manager.load()
    assert _equal(b.params(), upstream.params()) and b.counter.value == 5
    assert _equal(b.optimizer_state(), upstream.optimizer_state())
    logged = _messages(caplog)
    assert any("step-5 has no COMPLETE marker: loaded as a TorchTitan-format" in m for m in logged)
    assert any("step-4 is skipped and kept: its COMPLETE marker is unreadable" in m for m in logged)
    assert any("step-9 is skipped and kept: it has neither" in m for m in logged)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _save_steps(b, 3)  # steps 6, 7, 8 with keep_latest_k = 1
    assert not any("skipped" in m for m in _messages(caplog))  # reported once, not per save
    assert sorted(os.listdir(folder)) == ["step-4", "step-5", "step-8", "step-9"]
    assert (folder / "step-9" / "notes.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match=r"load_step = 4: no complete checkpoint step-4 .*marker is unreadable"):
        Run(tmp_path, load_step=4).manager.load()


# ---------------------------------------------------------------- 2. checksums


@pytest.mark.parametrize("mode", ["disabled", "async"])
def test_checksums_are_those_of_the_written_files(tmp_path, pg, mode):
    """The CRC-32s are computed while DCP writes (synchronous and background writer)."""
    run = Run(tmp_path, async_mode=mode)
    _save_steps(run, 1)
    run.manager.close()
    path = tmp_path / "checkpoint" / "step-1"
    marker = json.loads((path / MARKER).read_text())
    assert marker["format"] == 2 and sorted(marker["crc32"]) == sorted(marker["files"])
    assert any(name.endswith(".distcp") for name in marker["crc32"])
    assert marker["crc32"] == {name: crc32_file(str(path / name)) for name in marker["files"]}


def test_parallel_file_checksum_equals_zlib(tmp_path, monkeypatch):
    """Verification checksums pieces of a large file in parallel and combines them."""
    monkeypatch.setattr(ckpt_folder, "_CHUNK", 1 << 16)
    data = os.urandom((5 << 16) + 777)
    (tmp_path / "f").write_bytes(data)
    assert crc32_file(str(tmp_path / "f"), threads=3) == zlib.crc32(data) == crc32_file(str(tmp_path / "f"))


def test_same_size_corruption_is_caught_and_an_older_checkpoint_loads(tmp_path, pg, caplog):
    a = Run(tmp_path)
    snapshots = _save_steps(a, 2)
    data = tmp_path / "checkpoint" / "step-2" / "__0_0.distcp"
    size = data.stat().st_size
    with open(data, "r+b") as f:  # 4 KB overwrite in the middle: same size, parses?
        f.seek(size // 2 - 2048)
        f.write(os.urandom(4096))
    assert data.stat().st_size == size
    b = Run(tmp_path, seed=1)
    with caplog.at_level(logging.WARNING):
        assert b.manager.load()
    assert _equal(b.params(), snapshots[1]) and b.counter.value == 1
    fallback = [m for m in _messages(caplog) if "trying the next older" in m]
    assert len(fallback) == 1 and "step-2 is corrupt: __0_0.distcp does not match the checksum" in fallback[0]
    with pytest.raises(CheckpointError) as info:
        Run(tmp_path, load_step=2).manager.load()
    assert "\n" not in str(info.value) and "__0_0.distcp does not match the checksum" in str(info.value)
    assert sorted(list_checkpoints(str(tmp_path / "checkpoint"))) == [1, 2]  # nothing deleted


def test_retention_after_a_fallback_does_not_count_the_newer_checkpoint(tmp_path, pg):
    """Resumed from step 1 because step 3 is corrupt, a run saving step 2 with
    keep_latest_k = 1 keeps step 2 (counting step 3 would delete every new save)."""
    a = Run(tmp_path)
    a.step()
    a.manager.save(1)
    a.step(), a.step()
    a.manager.save(3)
    data = tmp_path / "checkpoint" / "step-3" / "__0_0.distcp"
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0xFF  # one flipped byte
    data.write_bytes(bytes(content))
    b = Run(tmp_path, seed=1, keep_latest_k=1)
    assert b.manager.load() and b.counter.value == 1
    b.step()
    b.manager.save(2)
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-2", "step-3"]


# ---------------------------------------------------------------- 3. non-finite optimizer state


def test_non_finite_optimizer_state_is_refused_at_save_and_at_load(tmp_path, pg, monkeypatch, caplog):
    a = Run(tmp_path)
    snapshots = _save_steps(a, 1)
    a.step()
    optimizer = a.optimizers.optimizers[0]
    optimizer.state[a.model.layers["1"].weight]["exp_avg_sq"][0, 0] = float("inf")
    assert all(torch.isfinite(p).all() for p in a.model.parameters())  # the weights look fine
    with pytest.raises(CheckpointError, match=r"not saving checkpoint step 2 .*optimizer\.state\.layers\.1\.weight\.exp_avg_sq is not finite"):
        a.manager.save(2)
    assert sorted(list_checkpoints(str(tmp_path / "checkpoint"))) == [1]
    # a checkpoint that holds it anyway (written without the guard) is refused at load
    monkeypatch.setattr(ckpt_manager.CheckpointManager, "_refuse_non_finite", lambda *args: None)
    a.manager.last_saved_step = None
    a.manager.save(2)
    b = Run(tmp_path, seed=1)
    with caplog.at_level(logging.WARNING):
        assert b.manager.load()
    assert _equal(b.params(), snapshots[1]) and b.counter.value == 1
    assert any("step-2 is corrupt: optimizer.state.layers.1.weight.exp_avg_sq is NaN or inf" in m for m in _messages(caplog))
    with pytest.raises(CheckpointError, match=r"exp_avg_sq is NaN or inf$"):
        Run(tmp_path, load_step=2).manager.load()


# ---------------------------------------------------------------- 4. paths


def test_metadata_naming_a_file_outside_the_checkpoint_is_refused(tmp_path, pg):
    victim = Run(tmp_path / "other_run", seed=3)
    _save_steps(victim, 1)
    attacker = Run(tmp_path / "run", seed=4)
    _save_steps(attacker, 1)
    path = tmp_path / "run" / "checkpoint" / "step-1"
    (path / MARKER).unlink()  # unmarked: loadable, unverified (a marker could be rewritten too)
    with open(path / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own test file
    original = dict(metadata.storage_data)
    escapes = [
        "../../../other_run/checkpoint/step-1/__0_0.distcp",
        str(tmp_path / "other_run" / "checkpoint" / "step-1" / "__0_0.distcp"),
    ]
    (path / "link.distcp").symlink_to(tmp_path / "other_run" / "checkpoint" / "step-1" / "__0_0.distcp")
    for escape in [*escapes, "link.distcp"]:
        metadata.storage_data = {
            k: type(v)(escape, v.offset, v.length, v.transform_descriptors) for k, v in original.items()
        }
        buf = io.BytesIO()
        pickle.dump(metadata, buf)
        (path / ".metadata").write_bytes(buf.getvalue())
        if escape == escapes[0]:  # the threat is real: DCP's own reader loads the other run's weights
            stolen = {"model": {k: torch.zeros_like(v) for k, v in attacker.model.state_dict().items()}}
            dcp.load(stolen, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
            assert _equal(stolen["model"], victim.params())
        with pytest.raises(CheckpointError, match=r"step-1 refused: its \.metadata reads .* not a file of the checkpoint folder"):
            read_metadata(str(path))
        fresh = Run(tmp_path / "run", seed=5)
        before = fresh.params()
        with pytest.raises(CheckpointError, match="refused"):
            fresh.manager.load()
        assert _equal(fresh.params(), before)


def test_folder_options_must_stay_inside_the_dump_folder(tmp_path):
    cfg = small_trainer_config(tmp_path)
    check_dump_subfolders(cfg)  # the defaults
    for option, value in [("checkpoint.folder", "../shared_ckpt"), ("checkpoint.folder", "/abs/ckpt"),
                          ("metrics.save_tb_folder", "tb/../../x"), ("profiling.save_traces_folder", "/tmp/t")]:
        cfg = small_trainer_config(tmp_path, f"--{option}", value)
        with pytest.raises(ConfigError, match=rf"^{option} = '{value}': must be a relative folder inside job.dump_folder"):
            check_dump_subfolders(cfg)


# ---------------------------------------------------------------- 5. disk full


def _fill_disk_after(monkeypatch, limit: int) -> None:
    """Files written from now on fail with ENOSPC once ``limit`` bytes went to disk, as a
    full file system does (DCP's tensor writes then fail with "unexpected pos")."""
    budget = [limit]
    original = FileSystem.create_stream

    class Full(io.RawIOBase):
        def __init__(self, raw):
            self.raw = raw

        def writable(self):
            return True

        def write(self, b):
            n = memoryview(b).nbytes
            if n > budget[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            budget[0] -= n
            return self.raw.write(b)

        def tell(self):
            return self.raw.tell()

        def flush(self):
            self.raw.flush()

        def fileno(self):
            return self.raw.fileno()

    def create_stream(self, path, mode):
        cm = original(self, path, mode)

        class Wrap:
            def __enter__(self_inner):
                raw = cm.__enter__()
                return Full(raw) if "w" in mode else raw

            def __exit__(self_inner, *exc):
                return cm.__exit__(*exc)

        return Wrap()

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)


@pytest.mark.parametrize("fail", [True, False])
def test_disk_full_names_the_space_needed_and_keeps_older_checkpoints(tmp_path, pg, monkeypatch, caplog, fail):
    run = Run(tmp_path, width=64, fail_on_save_error=fail)
    _save_steps(run, 1)
    folder = tmp_path / "checkpoint"
    (folder / "step-0.tmp-0badc0de").mkdir()  # a dead run's partial save: its space is needed
    run.step()
    _fill_disk_after(monkeypatch, 20_000)
    expected = r"no space left on .*checkpoint: checkpoint step 2 needs ~[0-9.e-]+ GiB, [0-9.e-]+ GiB are free"
    if fail:
        with pytest.raises(CheckpointError, match=expected):
            run.manager.save(2)
    else:
        with caplog.at_level(logging.ERROR):
            run.manager.save(2)
        assert any(__import__("re").search(expected, m) for m in _messages(caplog, logging.ERROR))
        with pytest.raises(CheckpointError, match="^the last checkpoint save failed: no space left on"):
            run.manager.finish()
    assert sorted(os.listdir(folder)) == ["step-1"]  # partial folders gone, step-1 kept
    monkeypatch.undo()
    run.step()
    run.manager.save(3)  # space is back: the next save works and clears the failure
    run.manager.finish()
    assert sorted(list_checkpoints(str(folder))) == [1, 3]


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return out.returncode == 0


def _cli(dump: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    args = small_trainer_args(
        dump, "--job.no-print_config", "--training.seq_len", "16", "--training.local_batch_size", "1",
        "--activation_checkpoint.mode", "none", "--lr_scheduler.warmup_steps", "1", "--comm.trace_buf_size", "0",
        "--checkpoint.enable", "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "1", *overrides,
    )
    out = subprocess.run([sys.executable, "-m", "torchtitan.train", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    return out, [line for line in out.stderr.splitlines() if line.startswith("torchtitan: error")]


def test_trainer_cli_disk_full_then_resume_past_a_corrupt_checkpoint(tmp_path):
    """The real trainer as a user runs it. (a) Its dump folder on a 110 MiB file system that
    holds one checkpoint of the debug model (5.9M parameters + AdamW state: ~71 MB) but not
    two: the save at step 1 fits, the one at step 2 does not. (b) Resuming in a folder whose
    newest checkpoint (step-2) had 4 KB overwritten and whose step-1 has no marker (as
    TorchTitan writes them): it falls back to step-1, trains on, and retention keeps step-1."""
    dump = tmp_path / f"small_disk_{uuid.uuid4().hex[:6]}"
    if not _mount_tmpfs(dump, "110m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the in-process tests above simulate ENOSPC")
    try:
        out, errors = _cli(dump, "--training.steps", "2", "--checkpoint.no-fail_on_save_error")
        assert out.returncode == 2, out.stderr[-3000:]
        assert len(errors) == 1 and "the last checkpoint save failed: no space left on" in errors[0], errors
        assert "GiB" in errors[0] and "Traceback" not in out.stderr
        folder = dump / "checkpoint"
        assert sorted(os.listdir(folder)) == ["step-1"]  # no step-2.tmp-* left behind
        marker = json.loads((folder / "step-1" / MARKER).read_text())
        assert all(zlib.crc32((folder / "step-1" / n).read_bytes()) == c for n, c in marker["crc32"].items())
        resume = tmp_path / "resume" / "checkpoint"
        shutil.copytree(folder / "step-1", resume / "step-2")
        shutil.copytree(folder / "step-1", resume / "step-1")
    finally:
        subprocess.run(["umount", str(dump)], capture_output=True)
    (resume / "step-1" / MARKER).unlink()
    with open(resume / "step-2" / "__0_0.distcp", "r+b") as f:
        f.seek(f.seek(0, 2) // 2)
        f.write(os.urandom(4096))
    out, errors = _cli(resume.parent, "--training.steps", "3")
    assert out.returncode == 0 and not errors, out.stderr[-3000:]
    assert "step-2 is corrupt: __0_0.distcp does not match the checksum" in out.stderr
    assert "step-1 has no COMPLETE marker: loaded as a TorchTitan-format DCP checkpoint" in out.stderr
    assert sorted(os.listdir(resume)) == ["step-1", "step-3"]  # step-2 re-saved, then pruned (keep 1)


def test_preemption_whose_save_failed_is_not_reported_as_checkpointed(tmp_path, monkeypatch):
    """SIGTERM at step 2 with a full disk and ``fail_on_save_error = false``: the preemption
    save fails, so the run raises CheckpointError (exit 2 at the CLI), not ``Preempted``
    ("checkpoint written", exit 3), and no step folder is left half-written."""
    from torchtitan.components.checkpoint import CheckpointError
    from torchtitan.trainer import Trainer

    monkeypatch.setenv("TORCHTITAN_FAULT_INJECT", "sigterm:0:2")
    cfg = small_trainer_config(
        tmp_path, "--training.seq_len", "16", "--training.local_batch_size", "1", "--training.steps", "4",
        "--activation_checkpoint.mode", "none", "--checkpoint.enable", "--checkpoint.interval", "100",
        "--checkpoint.no-fail_on_save_error",
    )
    trainer = Trainer(cfg)
    _fill_disk_after(monkeypatch, 20_000)
    try:
        with pytest.raises(CheckpointError, match="^the last checkpoint save failed: no space left on"):
            trainer.train()
    finally:
        trainer.close(clean=False)
    assert not list_checkpoints(str(tmp_path / "checkpoint"))
