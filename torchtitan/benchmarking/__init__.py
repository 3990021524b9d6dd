"""The benchmark harness: run a sweep of named training configurations, one markdown table.

- :mod:`~torchtitan.benchmarking.sweep`: the sweep file, validated with the trainer's parser;
- :mod:`~torchtitan.benchmarking.launch`: one entry's command (torchrun or SLURM) and its run;
- :mod:`~torchtitan.benchmarking.results`: the run's JSONL metrics and log reduced to a row;
- :mod:`~torchtitan.benchmarking.report`: the markdown table;
- :mod:`~torchtitan.benchmarking.cli`: the sweep itself (``scripts/benchmark.py``).

docs/benchmarking.md describes the sweep format and how figures are taken. No torch import.
"""

from torchtitan.benchmarking.cli import main, run_entry
from torchtitan.benchmarking.launch import Launch, build_launch, run_launch, slurm_hosts
from torchtitan.benchmarking.report import format_table, local_card
from torchtitan.benchmarking.results import Figures, Row, is_oom, last_error_line, read_jsonl, summarize
from torchtitan.benchmarking.sweep import (
    REPO,
    Entry,
    SweepError,
    load_sweep,
    logged_steps,
    parallel_layout,
    parse_job,
    repo_relative,
    select,
)

__all__ = [
    "REPO",
    "Entry",
    "Figures",
    "Launch",
    "Row",
    "SweepError",
    "build_launch",
    "format_table",
    "is_oom",
    "last_error_line",
    "load_sweep",
    "local_card",
    "logged_steps",
    "main",
    "parallel_layout",
    "parse_job",
    "read_jsonl",
    "repo_relative",
    "run_entry",
    "run_launch",
    "select",
    "slurm_hosts",
    "summarize",
]
