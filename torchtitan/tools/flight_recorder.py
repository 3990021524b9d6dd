"""Flight Recorder dumps: write one per rank, read a folder of them, say who is missing.

With ``comm.trace_buf_size > 0`` every rank records its last N collectives (name, process
group, sequence number, sizes). NCCL writes them to ``<dump_folder>/comm_traces/rank_<r>``
by itself when a collective times out; :func:`dump_trace` writes the same pickle on demand
(any backend, gloo included), e.g. when the trainer catches a communication error.

A hang is nearly always one rank that skipped (or added) a collective: every other rank
waits in it forever. :func:`find_desyncs` lines the dumps up by (process group, sequence
number) and reports the first collective that some members of its group never issued.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import logging
import os
import pickle
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Desync",
    "FlightRecorderError",
    "dump_on_failure",
    "dump_trace",
    "find_desyncs",
    "group_members",
    "load_dumps",
    "main",
    "run_torch_analyzer",
    "summarize",
    "trace_dir",
]

_RANK_FILE = re.compile(r"^(.*?)(\d+)$")


class FlightRecorderError(ValueError):
    """A dump folder or file that cannot be read as Flight Recorder traces."""


class _DataUnpickler(pickle.Unpickler):
    """A dump is plain data (dicts, lists, strings, numbers): a file naming any callable
    is refused instead of run. torch's C++ pickler may wrap lists and typed containers in
    these helpers, each of which returns its argument."""

    _ALLOWED = {
        ("torch.jit._pickle", name)
        for name in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag")
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}; a Flight Recorder dump holds plain data only")


def _unpickle(raw: bytes) -> Any:
    return _DataUnpickler(io.BytesIO(raw)).load()


def trace_dir(dump_folder: str, traces_folder: str = "comm_traces") -> str:
    """Where a run's per-rank traces go: ``<dump_folder>/comm_traces`` (comm.save_traces_folder)."""
    return os.path.join(dump_folder, traces_folder)


def _process_group_config() -> dict[str, dict[str, str]]:
    """{pg name: {name, desc, ranks}} for every group this rank belongs to.

    NCCL fills ``pg_config`` itself; gloo leaves it empty, which would leave the analyzers
    no way to know a group's members, so we add it from c10d's own bookkeeping.
    """
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if not dist.is_initialized():
        return {}
    config: dict[str, dict[str, str]] = {}
    for pg, name in c10d._world.pg_names.items():
        ranks = sorted(c10d._world.pg_group_ranks.get(pg, {}).keys())
        desc = getattr(pg, "group_desc", "") or ("default_pg" if pg is c10d._world.default_pg else "undefined")
        config[name] = {"name": name, "desc": desc, "ranks": str(ranks)}
    return config


def dump_trace(folder: str, rank: int, prefix: str = "rank_") -> str | None:
    """Write this rank's Flight Recorder buffer to ``folder/<prefix><rank>``; return the path.

    Returns None when the recorder is off (``TORCH_FR_BUFFER_SIZE`` unset or 0): an empty
    dump would only mislead the analysis.
    """
    import torch

    size = os.environ.get("TORCH_FR_BUFFER_SIZE", os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE", "0"))
    if int(size or 0) <= 0:
        return None
    dump = _unpickle(torch._C._distributed_c10d._dump_fr_trace())
    config = dump.get("pg_config") or {}
    for name, entry in _process_group_config().items():
        if name not in config or not ast.literal_eval(config[name].get("ranks") or "[]"):
            config[name] = entry
    config.pop("", None)  # gloo's placeholder entry
    dump["pg_config"] = config
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{prefix}{rank}")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(dump, f)
    os.replace(tmp, path)  # a reader never sees half a dump
    return path


def dump_on_failure(
    trace_buf_size: int, dump_folder: str, rank: int, traces_folder: str = "comm_traces", prefix: str = "rank_"
) -> None:
    """After a collective failed or timed out: write this rank's buffer to
    ``<dump_folder>/comm_traces`` (NCCL dumps by itself on a timeout; other backends only
    through this). Never masks the original error."""
    import torch.distributed as dist

    from torchtitan.tools.logging import logger

    if trace_buf_size <= 0 or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    try:
        path = dump_trace(trace_dir(dump_folder, traces_folder), rank, prefix)
        if path:
            logger.error(f"flight recorder trace written to {path}; see docs/debugging.md")
    except Exception as e:  # noqa: BLE001 - the original error matters more
        logger.warning(f"could not dump the flight recorder trace: {e}")


def _read_one(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        dump = json.loads(raw) if raw[:1] == b"{" else _unpickle(raw)
    except Exception as e:  # noqa: BLE001 - pickle raises many types on garbage
        raise FlightRecorderError(f"{path} is not a Flight Recorder dump (pickle or JSON): {e}") from None
    if not isinstance(dump, dict) or "entries" not in dump:
        raise FlightRecorderError(f"{path} has no 'entries': not a Flight Recorder dump")
    return dump


def load_dumps(folder: str) -> dict[int, dict[str, Any]]:
    """{global rank: dump} for every ``<prefix><rank>`` file in ``folder``."""
    if not os.path.isdir(folder):
        raise FlightRecorderError(f"trace folder {folder} does not exist; pass <dump_folder>/comm_traces")
    dumps: dict[int, dict[str, Any]] = {}
    for name in sorted(os.listdir(folder)):
        m = _RANK_FILE.match(name)
        if m is None or not os.path.isfile(os.path.join(folder, name)):
            continue
        dumps[int(m.group(2))] = _read_one(os.path.join(folder, name))
    if not dumps:
        raise FlightRecorderError(f"no rank_<N> trace files in {folder}; is comm.trace_buf_size > 0?")
    return dumps


@dataclass(frozen=True)
class Desync:
    """The first collective of a process group that not every member issued."""

    pg_name: str
    pg_desc: str
    seq_id: int
    collective: str  # e.g. "nccl:all_gather" (mixed names are joined with " vs ")
    present_ranks: tuple[int, ...]
    missing_ranks: tuple[int, ...]  # members whose dump ends before this sequence number
    input_sizes: Any = None
    mismatched_names: bool = False  # ranks issued different collectives at this number

    def describe(self) -> str:
        what = f"{self.collective} (seq {self.seq_id}) in process group {self.pg_name} ({self.pg_desc})"
        if self.mismatched_names:
            return f"{what}: ranks issued different collectives at the same sequence number"
        return (
            f"{what}: issued by ranks {list(self.present_ranks)}, never by ranks "
            f"{list(self.missing_ranks)}; input sizes {self.input_sizes}"
        )


def group_members(dumps: dict[int, dict[str, Any]], pg_name: str) -> set[int]:
    """Global ranks of a process group: from any dump's pg_config, else every rank whose
    dump mentions the group (best effort for raw gloo dumps)."""
    for dump in dumps.values():
        entry = (dump.get("pg_config") or {}).get(pg_name)
        if entry:
            ranks = entry.get("ranks")
            ranks = ast.literal_eval(ranks) if isinstance(ranks, str) else ranks
            if ranks:
                return {int(r) for r in ranks}
    return {
        r for r, d in dumps.items() if any(str(e["process_group"][0]) == pg_name for e in d["entries"])
    }


def find_desyncs(dumps: dict[int, dict[str, Any]]) -> list[Desync]:
    """Per process group, the first sequence number where the members disagree.

    Ranks whose dumps are absent are not blamed (the folder may hold a subset); a member
    that dumped but has no entry at that number (and its buffer reaches that far back) is.
    """
    # (pg name) -> rank -> seq id -> entry; collectives only (p2p has its own counter).
    by_pg: dict[str, dict[int, dict[int, dict[str, Any]]]] = {}
    descs: dict[str, str] = {}
    for rank, dump in dumps.items():
        for e in dump["entries"]:
            if e.get("is_p2p"):
                continue
            name, desc = str(e["process_group"][0]), str(e["process_group"][1])
            descs[name] = desc
            by_pg.setdefault(name, {}).setdefault(rank, {})[int(e["collective_seq_id"])] = e
    found: list[Desync] = []
    for pg_name, ranks in sorted(by_pg.items()):
        members = group_members(dumps, pg_name) & set(dumps)
        # The recorder is a ring buffer: only numbers every member could still hold count.
        first = max(min(seqs) for seqs in ranks.values()) if len(ranks) == len(members) else min(
            min(seqs) for seqs in ranks.values()
        )
        last = max(max(seqs) for seqs in ranks.values())
        for seq in range(first, last + 1):
            have = {r: ranks.get(r, {}).get(seq) for r in members}
            present = sorted(r for r, e in have.items() if e is not None)
            missing = sorted(r for r, e in have.items() if e is None)
            names = sorted({have[r]["profiling_name"] for r in present})
            if not missing and len(names) == 1:
                continue
            found.append(
                Desync(
                    pg_name=pg_name,
                    pg_desc=descs.get(pg_name, ""),
                    seq_id=seq,
                    collective=" vs ".join(names),
                    present_ranks=tuple(present),
                    missing_ranks=tuple(missing),
                    input_sizes=have[present[0]].get("input_sizes") if present else None,
                    mismatched_names=len(names) > 1,
                )
            )
            break
    return found


def summarize(dumps: dict[int, dict[str, Any]]) -> str:
    """One screen: ranks seen, last collective per rank, and the first desync per group."""
    lines = [f"Flight Recorder dumps of ranks {sorted(dumps)}"]
    for rank, dump in sorted(dumps.items()):
        entries = [e for e in dump["entries"] if not e.get("is_p2p")]
        if entries:
            e = entries[-1]
            lines.append(
                f"  rank {rank}: {len(entries)} collectives, last {e['profiling_name']} "
                f"seq {e['collective_seq_id']} in pg {e['process_group'][0]} ({e['state']})"
            )
        else:
            lines.append(f"  rank {rank}: no collectives recorded")
    desyncs = find_desyncs(dumps)
    if not desyncs:
        lines.append("no desync: every member of every group issued the same collectives")
        lines.append("(a hang with no desync points at a slow/stuck kernel or network, not a skipped call)")
    for d in desyncs:
        lines.append("DESYNC " + d.describe())
    return "\n".join(lines)


# ---- PyTorch's own analyzer, and the command line (scripts/analyze_flight_recorder.py) ------

def _with_pg_config(dumps: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Copies of the dumps whose pg_config names every group their entries use."""
    names = {str(e["process_group"][0]) for d in dumps.values() for e in d["entries"]}
    descs = {str(e["process_group"][0]): str(e["process_group"][1]) for d in dumps.values() for e in d["entries"]}
    out = {}
    for rank, dump in dumps.items():
        config = {k: v for k, v in (dump.get("pg_config") or {}).items() if k}
        for name in names:
            if name not in config or config[name].get("ranks") in (None, "", "[]"):
                ranks = sorted(group_members(dumps, name))
                config[name] = {"name": name, "desc": descs[name], "ranks": str(ranks)}
        # The analyzer expects a version string and plain tuples for process_group.
        entries = [dict(e, process_group=tuple(e["process_group"])) for e in dump["entries"]]
        out[rank] = dict(dump, pg_config=config, entries=entries, version=str(dump.get("version", "2.10")))
    return out


def run_torch_analyzer(dumps: dict[int, dict[str, Any]]) -> str:
    """PyTorch's fr_trace analysis of the dumps, as text (its errors included, not raised)."""
    try:
        from torch.distributed.flight_recorder import fr_trace
    except ImportError:
        return "(this torch has no torch.distributed.flight_recorder analyzer)"
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    fr_logger = logging.getLogger("Flight Recorder")
    with tempfile.TemporaryDirectory() as tmp:
        for rank, dump in _with_pg_config(dumps).items():
            with open(os.path.join(tmp, f"rank_{rank}"), "wb") as f:
                pickle.dump(dump, f)
        saved = fr_logger.handlers[:]
        fr_logger.handlers = [handler]  # keep its console handler quiet; we print it once
        try:
            with contextlib.redirect_stdout(text):
                fr_trace.main([tmp, "--prefix", "rank_"])
        except Exception as e:  # noqa: BLE001 - it asserts on formats it does not know
            text.write(f"PyTorch's analyzer failed: {type(e).__name__}: {e}\n")
        finally:
            fr_logger.handlers = saved
    return text.getvalue().rstrip() or "(PyTorch's analyzer reported nothing)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Which collective hung, which ranks never joined it, at what sequence number.")
    parser.add_argument("trace_dir", help="folder with one rank_<N> dump per rank (<dump_folder>/comm_traces)")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch's own analyzer")
    args = parser.parse_args(argv)
    try:
        dumps = load_dumps(args.trace_dir)
    except FlightRecorderError as e:
        print(f"analyze_flight_recorder: error: {e}", file=sys.stderr)
        return 2
    print(summarize(dumps))
    if not args.no_torch:
        print("\n--- PyTorch flight recorder analyzer ---")
        print(run_torch_analyzer(dumps))
    return 1 if find_desyncs(dumps) else 0

