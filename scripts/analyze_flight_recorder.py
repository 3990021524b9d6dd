"""Which collective hung, which ranks never joined it, at what sequence number.

    python scripts/analyze_flight_recorder.py <dump_folder>/comm_traces

Prints our one-screen summary (torchtitan.tools.flight_recorder), then the verdict of
PyTorch's own analyzer (torch.distributed.flight_recorder.fr_trace) run on the same dumps.
Gloo dumps carry no process-group membership; the files are completed with what the dumps
themselves imply before PyTorch's analyzer sees them. Exit code 1 when a desync is found.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import pickle
import sys
import tempfile
from typing import Any

from torchtitan.tools.flight_recorder import (
    FlightRecorderError,
    find_desyncs,
    group_members,
    load_dumps,
    summarize,
)


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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


if __name__ == "__main__":
    sys.exit(main())
