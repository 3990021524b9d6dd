"""The checkpoint folder on disk: naming, completion markers, atomic finish, pruning.

A checkpoint folder holds one DCP directory per saved step::

    <job.dump_folder>/<checkpoint.folder>/
        step-10/                 complete: has a COMPLETE marker
            .metadata  __0_0.distcp  __1_0.distcp  ...  COMPLETE
        step-20.tmp-1a2b3c4d/    being written (or left behind by a crash): never loaded

Every rank writes into ``step-N.tmp-<nonce>``. Once DCP's save returned (its last phase
gathers every rank's write results before rank 0 writes ``.metadata``), rank 0 writes the
``COMPLETE`` marker (JSON: step, which states the checkpoint holds, the size and CRC-32 of
every file) and renames the directory to ``step-N``. A rename within one file system is
atomic, so a process killed at any point leaves either a complete ``step-N`` or a ``.tmp``
directory that loading ignores and the next save removes.

Only what this module wrote and marked is ever deleted by retention: a ``step-N`` without a
readable marker (TorchTitan's own checkpoints have none; or a damaged one) is reported and
left alone (``scan``).

Nothing here talks to other ranks: the manager calls these functions on rank 0 (and
``verify_checksums`` on each rank for its share of the files).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MARKER",
    "CheckpointError",
    "CheckpointInfo",
    "Scan",
    "step_dir",
    "tmp_dir",
    "read_marker",
    "scan",
    "list_checkpoints",
    "finalize",
    "crc32_file",
    "verify_files",
    "checksum_share",
    "verify_checksums",
    "prune",
    "remove_leftovers",
    "DUMP_SUBFOLDERS",
    "check_dump_subfolders",
]

MARKER = "COMPLETE"
# 1: sizes only; 2: sizes and a CRC-32 per file ("crc32"). Both load.
_FORMAT_VERSION = 2
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_RE = re.compile(r"^step-\d+\.tmp(-([0-9a-f]+))?$")
_CHUNK = 64 << 20  # bytes checksummed per thread when verifying a large file
_VERIFY_THREADS = min(4, os.cpu_count() or 1)


class CheckpointError(ValueError):
    """A checkpoint cannot be saved or loaded; the message is one line naming the fix."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A loadable checkpoint: its step, directory, the states it holds and its marker
    (None: a DCP checkpoint without one, e.g. written by TorchTitan: loadable, unverified)."""

    step: int
    path: str
    contents: tuple[str, ...]
    marker: dict[str, Any] | None = None


@dataclass
class Scan:
    """A checkpoint folder: ``complete`` (our marker), ``unmarked`` (a ``.metadata`` but no
    marker) and ``skipped`` (path -> why it is neither: never loaded, never deleted)."""

    complete: dict[int, CheckpointInfo] = field(default_factory=dict)
    unmarked: dict[int, CheckpointInfo] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def loadable(self) -> dict[int, CheckpointInfo]:
        """Every loadable step; a step both marked and unmarked cannot happen (one dir)."""
        return {**self.unmarked, **self.complete}


def step_dir(folder: str, step: int) -> str:
    return os.path.join(folder, f"step-{step}")


def tmp_dir(folder: str, step: int, nonce: str) -> str:
    return os.path.join(folder, f"step-{step}.tmp-{nonce}")


def _read_marker(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """(marker, None), (None, None) when there is none, or (None, why it is unreadable)."""
    file = os.path.join(path, MARKER)
    if not os.path.lexists(file):
        return None, None
    try:
        with open(file) as f:
            marker = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"{type(e).__name__}: {str(e)[:100]}"
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), int):
        return None, "not a JSON object with a step"
    if not isinstance(marker.get("files", {}), dict) or not isinstance(marker.get("crc32", {}), dict):
        return None, "its file list is not a JSON object"
    return marker, None


def read_marker(path: str) -> dict[str, Any] | None:
    """The completion marker of checkpoint directory ``path``, or None when it has none
    (or an unreadable one: a marker is written whole and renamed, so that means damage)."""
    return _read_marker(path)[0]


def scan(folder: str) -> Scan:
    """Classify every ``step-N`` directory of ``folder`` (an empty Scan when it is missing)."""
    result = Scan()
    if not os.path.isdir(folder):
        return result
    for name in sorted(os.listdir(folder)):
        match = _STEP_RE.match(name)
        path = os.path.join(folder, name)
        if not match or not os.path.isdir(path):
            continue
        step = int(match.group(1))
        marker, problem = _read_marker(path)
        if marker is not None:
            result.complete[step] = CheckpointInfo(step, path, tuple(marker.get("contents", ())), marker)
        elif problem is not None:
            result.skipped[path] = f"its {MARKER} marker is unreadable ({problem})"
        elif os.path.isfile(os.path.join(path, ".metadata")):
            result.unmarked[step] = CheckpointInfo(step, path, ())
        else:
            result.skipped[path] = f"it has neither a {MARKER} marker nor DCP .metadata"
    return result


def list_checkpoints(folder: str) -> dict[int, CheckpointInfo]:
    """The complete (marked) checkpoints in ``folder`` by step."""
    return scan(folder).complete


# Options documented as "inside job.dump_folder".
DUMP_SUBFOLDERS = (
    "checkpoint.folder",
    "profiling.save_traces_folder",
    "profiling.save_memory_snapshot_folder",
    "metrics.save_tb_folder",
    "metrics.save_jsonl_folder",
    "comm.save_traces_folder",
)


def check_dump_subfolders(job_config: Any) -> None:
    """Refuse a folder option that would leave ``job.dump_folder`` (an absolute path or a
    ``..``): what their help promises, and what keeps two runs' dump folders apart."""
    from torchtitan.config import ConfigError

    for option in DUMP_SUBFOLDERS:
        section, name = option.split(".")
        value = getattr(getattr(job_config, section), name)
        if os.path.isabs(value) or ".." in re.split(r"[\\/]", value):
            raise ConfigError(
                f"{option} = {value!r}: must be a relative folder inside job.dump_folder (no '..'); "
                "to write elsewhere, set job.dump_folder"
            )


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


def _gf2_times(matrix: list[int], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


@functools.lru_cache(maxsize=8)
def _zeros_operator(nbytes: int) -> tuple[int, ...]:
    """The GF(2) matrix that advances a CRC-32 over ``nbytes`` zero bytes (zlib's
    crc32_combine, which Python's zlib does not expose), by repeated squaring."""
    op = [0xEDB88320] + [1 << n for n in range(31)]  # one zero bit
    for _ in range(3):  # one zero byte
        op = [_gf2_times(op, op[n]) for n in range(32)]
    result = [1 << n for n in range(32)]  # identity
    while nbytes:
        if nbytes & 1:
            result = [_gf2_times(op, result[n]) for n in range(32)]
        nbytes >>= 1
        if nbytes:
            op = [_gf2_times(op, op[n]) for n in range(32)]
    return tuple(result)


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B from crc32(A), crc32(B) and len(B)."""
    return _gf2_times(list(_zeros_operator(len2)), crc1) ^ crc2 if len2 else crc1


def _crc32_range(path: str, start: int, length: int) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        buf = bytearray(min(length, 16 << 20))
        view = memoryview(buf)
        while length > 0:
            n = f.readinto(view[: min(length, len(buf))])
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
            length -= n
    return crc


def crc32_file(path: str, threads: int = 1) -> int:
    """CRC-32 (zlib) of a file. With ``threads`` > 1 and a large file, pieces of
    ``_CHUNK`` bytes are read and checksummed in parallel (zlib and reads release the GIL),
    then combined."""
    size = os.path.getsize(path)
    if threads <= 1 or size <= _CHUNK:
        return _crc32_range(path, 0, size)
    starts = range(0, size, _CHUNK)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        crcs = list(pool.map(lambda start: _crc32_range(path, start, min(_CHUNK, size - start)), starts))
    crc = crcs[0]
    for start, piece in zip(starts[1:], crcs[1:]):
        crc = crc32_combine(crc, piece, min(_CHUNK, size - start))
    return crc


def finalize(
    tmp: str, final: str, step: int, contents: list[str], checksums: dict[str, int] | None = None
) -> None:
    """Mark the fully written ``tmp`` complete, then rename it to ``final`` atomically.
    ``checksums``: CRC-32s computed while the files were written; any file missing from
    it (``.metadata``, or every file of a writer that did not compute them) is read here."""
    files = {
        name: os.path.getsize(os.path.join(tmp, name))
        for name in sorted(os.listdir(tmp))
        if os.path.isfile(os.path.join(tmp, name))
    }
    if ".metadata" not in files:
        raise CheckpointError(f"{tmp} has no .metadata: DCP did not finish writing it")
    checksums = checksums or {}
    crcs = {name: checksums[name] if name in checksums else crc32_file(os.path.join(tmp, name)) for name in files}
    marker = {
        "format": _FORMAT_VERSION,
        "step": step,
        "contents": sorted(contents),
        "files": files,
        "crc32": crcs,
    }
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


def checksum_share(marker: dict[str, Any], rank: int, world_size: int) -> list[str]:
    """The files whose checksums ``rank`` verifies: those written by saving rank ``k``
    (``__k_*.distcp``) go to rank ``k % world_size``, so on a resume in the same layout each
    rank reads the files it is about to load (the page cache then serves DCP's read)."""
    share = []
    for name in sorted(marker.get("crc32", {})):
        match = re.match(r"^__(\d+)_", name)
        owner = int(match.group(1)) if match else 0
        if owner % world_size == rank:
            share.append(name)
    return share


def verify_checksums(path: str, marker: dict[str, Any], names: list[str]) -> None:
    """Check the CRC-32 the marker recorded for each of ``names`` (a format-1 marker has
    none: nothing to check)."""
    crcs = marker.get("crc32", {})
    for name in names:
        if name not in crcs:
            continue
        try:
            actual = crc32_file(os.path.join(path, name), threads=_VERIFY_THREADS)
        except OSError as e:
            raise CheckpointError(f"checkpoint {path} is incomplete: cannot read {name} ({e.strerror})") from e
        if actual != crcs[name]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} does not match the checksum recorded when "
                "it was saved (changed on disk since)"
            )


def remove_leftovers(folder: str, keep: str | None = None) -> list[str]:
    """Remove ``step-N.tmp-<nonce>`` directories (interrupted or failed saves), except
    this run's ``keep`` nonce while its save is in flight; return the removed paths."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        match = _TMP_RE.match(name)
        path = os.path.join(folder, name)
        if match and (keep is None or match.group(2) != keep) and os.path.isdir(path):
            _remove(path)
            removed.append(path)
    return removed


def prune(folder: str, keep_latest_k: int, upto: int | None = None) -> list[str]:
    """Remove leftovers of interrupted saves and, when ``keep_latest_k > 0``, all but the
    ``keep_latest_k`` newest complete checkpoints; return the removed paths. Only
    directories with our marker count and are deleted: unmarked or damaged ``step-N``
    directories are left alone (``scan`` reports them). With ``upto`` (the step just
    saved) checkpoints of later steps neither count nor go: they belong to an earlier
    timeline (the run fell back from a corrupt one, or ``load_step`` was pinned), and
    counting them would delete every new save while keeping them."""
    removed = remove_leftovers(folder)
    if keep_latest_k > 0:
        complete = {k: v for k, v in scan(folder).complete.items() if upto is None or k <= upto}
        for step in sorted(complete)[:-keep_latest_k]:
            _remove(complete[step].path)
            removed.append(complete[step].path)
    return removed


def _remove(path: str) -> None:
    """Delete a checkpoint directory. A marked ``step-N`` is first renamed (atomically) to
    ``step-N.tmp-dead``: a deletion cut short then leaves a leftover that is never loaded
    and is removed later, never a ``step-N`` with files missing."""
    doomed = path
    if _STEP_RE.match(os.path.basename(path)):
        doomed = path + ".tmp-dead"
        try:
            if os.path.lexists(doomed):
                shutil.rmtree(doomed, ignore_errors=True)
            os.rename(path, doomed)
        except OSError:
            doomed = path
            try:
                os.remove(os.path.join(path, MARKER))
            except OSError:
                pass
    shutil.rmtree(doomed, ignore_errors=True)
