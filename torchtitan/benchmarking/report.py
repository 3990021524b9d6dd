"""The markdown table of a sweep: one row per entry, with the card, torch version and the
rules the figures follow in its header."""

from __future__ import annotations

import datetime
import importlib.metadata

from torchtitan.benchmarking.results import Row

__all__ = ["COLUMNS", "format_table", "local_card"]

def local_card() -> str:
    """This machine's accelerator, for rows whose run wrote no metrics."""
    try:
        import torch
    except ImportError:
        return "?"
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


COLUMNS = ["config", "GPUs and card", "layout", "tokens/s/GPU (median)", "TFLOP/s", "MFU",
           "peak mem (GiB, max over ranks)", "status"]


def format_table(rows: list[Row], sweep: str, launcher: str) -> str:
    cards = [r.figures.card for r in rows if r.figures]
    card = cards[0] if cards else local_card()
    peaks = sorted({f"{r.figures.peak_tflops:.1f}" for r in rows if r.figures and r.figures.peak_tflops})
    peak = f"{' / '.join(peaks)} TFLOP/s" if peaks else "the card's dense bf16 peak"
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "?"
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    out = [
        f"Benchmark `{sweep}`: {now}, torch {torch_version}, {card}, launcher {launcher}.",
        "tokens/s/GPU, TFLOP/s, MFU: median of rank 0's logged windows after each entry's "
        f"warm-up steps (MFU vs {peak}); peak mem: reserved, max over windows and ranks.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        e, f = row.entry, row.figures
        config = f"{e.name}: {e.description}" if e.description else e.name
        cells = [config, f"{e.world} × {f.card if f else card}", row.layout]
        if f:
            cells += [
                f"{f.tps:,.0f}",
                f"{f.tflops:.1f}" if f.tflops >= 1 else f"{f.tflops:.3f}",
                "n/a" if f.mfu is None else f"{f.mfu:.1f}%",
                f"{f.mem_gib:.1f} ({f.mem_pct:.0f}%)",
            ]
        else:
            cells += ["", "", "", ""]
        out.append("| " + " | ".join(_cell(c) for c in [*cells, row.status]) + " |")
    return "\n".join(out)
