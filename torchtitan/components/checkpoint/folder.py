"""The checkpoint folder on disk: naming, completion markers, atomic finish, pruning.

A checkpoint folder holds one DCP directory per saved step::

    <job.dump_folder>/<checkpoint.folder>/
        step-10/                 complete: has a COMPLETE marker
            .metadata  __0_0.distcp  __1_0.distcp  ...  COMPLETE
        step-20.tmp-1a2b3c4d/    being written (or left behind by a crash): never loaded

Every rank writes into ``step-N.tmp-<nonce>``. Once DCP's save returned (its last phase
gathers every rank's write results before rank 0 writes ``.metadata``), rank 0 writes the
``COMPLETE`` marker (JSON: step, which states the checkpoint holds, the size of every file)
and renames the directory to ``step-N``. A rename within one file system is atomic, so a
process killed at any point leaves either a complete ``step-N`` or a ``.tmp`` directory that
loading ignores and the next successful save removes.

Nothing here talks to other ranks: the manager calls these functions on rank 0 only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MARKER",
    "CheckpointError",
    "CheckpointInfo",
    "step_dir",
    "tmp_dir",
    "read_marker",
    "list_checkpoints",
    "finalize",
    "verify_files",
    "prune",
]

MARKER = "COMPLETE"
_FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_RE = re.compile(r"^step-\d+\.tmp(-[0-9a-f]+)?$")


class CheckpointError(ValueError):
    """A checkpoint cannot be saved or loaded; the message is one line naming the fix."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint: its step, directory and the states it holds."""

    step: int
    path: str
    contents: tuple[str, ...]


def step_dir(folder: str, step: int) -> str:
    return os.path.join(folder, f"step-{step}")


def tmp_dir(folder: str, step: int, nonce: str) -> str:
    return os.path.join(folder, f"step-{step}.tmp-{nonce}")


def read_marker(path: str) -> dict[str, Any] | None:
    """The completion marker of checkpoint directory ``path``, or None when it has none
    (or an unreadable one: a marker is written whole and renamed, so that means damage)."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "step" in marker else None


def list_checkpoints(folder: str) -> dict[int, CheckpointInfo]:
    """The complete checkpoints in ``folder`` by step (empty when the folder is missing)."""
    found: dict[int, CheckpointInfo] = {}
    if not os.path.isdir(folder):
        return found
    for name in os.listdir(folder):
        match = _STEP_RE.match(name)
        if not match:
            continue
        path = os.path.join(folder, name)
        marker = read_marker(path)
        if marker is None:
            continue
        step = int(match.group(1))
        found[step] = CheckpointInfo(step, path, tuple(marker.get("contents", ())))
    return found


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not let a directory be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def finalize(tmp: str, final: str, step: int, contents: list[str]) -> None:
    """Mark the fully written ``tmp`` complete, then rename it to ``final`` atomically."""
    files = {
        name: os.path.getsize(os.path.join(tmp, name))
        for name in sorted(os.listdir(tmp))
        if os.path.isfile(os.path.join(tmp, name))
    }
    if ".metadata" not in files:
        raise CheckpointError(f"{tmp} has no .metadata: DCP did not finish writing it")
    marker = {"format": _FORMAT_VERSION, "step": step, "contents": sorted(contents), "files": files}
    part = os.path.join(tmp, MARKER + ".part")
    with open(part, "w") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, os.path.join(tmp, MARKER))
    _fsync_dir(tmp)
    if os.path.lexists(final):  # the same step saved again (e.g. after a restart): replace it
        _remove(final)
    os.rename(tmp, final)
    _fsync_dir(os.path.dirname(os.path.abspath(final)))


def verify_files(path: str, marker: dict[str, Any]) -> None:
    """Check that every file the marker lists is there with its recorded size."""
    for name, size in marker.get("files", {}).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        actual = os.path.getsize(file)
        if actual != size:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} has {actual} bytes, {size} were written; "
                "load another step (checkpoint.load_step) or restore the file"
            )


def prune(folder: str, keep_latest_k: int) -> list[str]:
    """Remove leftovers of interrupted saves and, when ``keep_latest_k > 0``, all but the
    ``keep_latest_k`` newest complete checkpoints; return the removed paths."""
    if not os.path.isdir(folder):
        return []
    removed = []
    complete = list_checkpoints(folder)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        match = _STEP_RE.match(name)
        leftover = _TMP_RE.match(name) or (match and int(match.group(1)) not in complete)
        if leftover and os.path.isdir(path):
            _remove(path)
            removed.append(path)
    if keep_latest_k > 0:
        for step in sorted(complete)[:-keep_latest_k]:
            _remove(complete[step].path)
            removed.append(complete[step].path)
    return removed


def _remove(path: str) -> None:
    """Delete a checkpoint directory, its marker first: a deletion cut short leaves an
    incomplete directory, never a 'complete' one with files missing."""
    try:
        os.remove(os.path.join(path, MARKER))
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)
