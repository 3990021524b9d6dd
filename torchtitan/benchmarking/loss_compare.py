"""Compare the loss curves of two training runs, step by step.

    # two existing logs
    python scripts/loss_compare.py --logs a.log b.log --assert-equal
    # or run two commands (their stdout+stderr is the log)
    python scripts/loss_compare.py --commands "./run_train.sh ..." "NGPU=2 ./run_train.sh ..." --rtol 1e-4

Reads the trainer's metrics line ``step: N  loss: X`` (colour codes are ignored), prints a
table of both losses and their difference on the common steps, writes a PNG of both
curves (``--png``), and exits 1 when ``--assert-equal`` (bitwise, for deterministic runs)
or ``--rtol``/``--atol`` is violated. The PNG needs matplotlib (the optional plotting
dependency); ``--png ''`` skips it. ``scripts/loss_compare.py`` is the command line.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
from dataclasses import dataclass

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEP_LOSS = re.compile(r"step:\s*(\d+)\s+loss:\s*([-+0-9.eE]+|nan|inf|-inf)", re.IGNORECASE)


class LossCompareError(ValueError):
    """Logs that cannot be compared (no loss lines, no common step)."""


def parse_losses(text: str) -> dict[int, float]:
    """{step: loss} from a trainer log; a repeated step (a resumed run) keeps the last value."""
    losses: dict[int, float] = {}
    for line in _ANSI.sub("", text).splitlines():
        m = _STEP_LOSS.search(line)
        if m:
            losses[int(m.group(1))] = float(m.group(2))
    return losses


@dataclass
class Comparison:
    steps: list[int]
    a: list[float]
    b: list[float]

    @property
    def abs_diff(self) -> list[float]:
        return [abs(x - y) for x, y in zip(self.a, self.b)]

    def bitwise_equal(self) -> bool:
        return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(self.a, self.b))

    def failures(self, rtol: float, atol: float) -> list[int]:
        """Steps where |a - b| > atol + rtol * |b| (numpy.isclose's rule)."""
        return [
            s for s, x, y in zip(self.steps, self.a, self.b)
            if not (abs(x - y) <= atol + rtol * abs(y))
        ]

    def table(self) -> str:
        rows = [f"{'step':>6}  {'loss A':>14}  {'loss B':>14}  {'|A-B|':>10}  {'rel':>10}"]
        for s, x, y, d in zip(self.steps, self.a, self.b, self.abs_diff):
            rel = d / abs(y) if y else float("inf") if d else 0.0
            rows.append(f"{s:>6}  {x:>14.8g}  {y:>14.8g}  {d:>10.3e}  {rel:>10.3e}")
        return "\n".join(rows)


def compare(a: dict[int, float], b: dict[int, float]) -> Comparison:
    if not a or not b:
        raise LossCompareError("no 'step: N  loss: X' lines in one of the logs; is metrics.log_freq set?")
    steps = sorted(set(a) & set(b))
    if not steps:
        raise LossCompareError(f"the logs share no step (A: {min(a)}..{max(a)}, B: {min(b)}..{max(b)})")
    return Comparison(steps, [a[s] for s in steps], [b[s] for s in steps])


# ---- PNG ----------------------------------------------------------------------------
def write_png(path: str, cmp: Comparison, labels: tuple[str, str] = ("A", "B")) -> None:
    """Both loss curves in one PNG (matplotlib, the optional plotting dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise LossCompareError("--png needs matplotlib: pip install matplotlib (or pass --png '')") from e
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(cmp.steps, cmp.a, label=labels[0])
    ax.plot(cmp.steps, cmp.b, label=labels[1], linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- command line -------------------------------------------------------------------
def _run(command: str) -> str:
    print(f"running: {command}", file=sys.stderr)
    proc = subprocess.run(command, shell=True, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise LossCompareError(f"command failed with exit code {proc.returncode}: {command}\n{tail}")
    return proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--logs", nargs=2, metavar=("A", "B"), help="two trainer log files")
    src.add_argument("--commands", nargs=2, metavar=("A", "B"), help="two shell commands to run")
    parser.add_argument("--assert-equal", action="store_true", help="fail unless losses are bitwise equal")
    parser.add_argument("--rtol", type=float, default=None, help="fail if |A-B| > atol + rtol*|B| at a step")
    parser.add_argument("--atol", type=float, default=0.0)
    parser.add_argument("--png", default="loss_compare.png", help="where to write the plot ('' = none)")
    parser.add_argument("--save-logs", nargs=2, metavar=("A", "B"), help="with --commands: keep both logs")
    args = parser.parse_args(argv)
    try:
        if args.logs:
            texts = []
            for path in args.logs:
                try:
                    with open(path) as f:
                        texts.append(f.read())
                except OSError as e:
                    raise LossCompareError(f"cannot read log {path}: {e.strerror}") from None
        else:
            texts = [_run(c) for c in args.commands]
            if args.save_logs:
                for path, text in zip(args.save_logs, texts):
                    with open(path, "w") as f:
                        f.write(text)
        cmp = compare(parse_losses(texts[0]), parse_losses(texts[1]))
    except LossCompareError as e:
        print(f"loss_compare: error: {e}", file=sys.stderr)
        return 2
    print(cmp.table())
    print(f"{len(cmp.steps)} common steps, max |A-B| = {max(cmp.abs_diff):.3e}")
    if args.png:
        try:
            write_png(args.png, cmp)
        except LossCompareError as e:
            print(f"loss_compare: error: {e}", file=sys.stderr)
            return 2
        print(f"plot written to {args.png}")
    ok = True
    if args.assert_equal and not cmp.bitwise_equal():
        bad = [s for s, x, y in zip(cmp.steps, cmp.a, cmp.b) if x != y]
        print(f"FAIL: losses differ at steps {bad[:10]} (--assert-equal)")
        ok = False
    if args.rtol is not None or args.atol > 0:
        bad = cmp.failures(args.rtol or 0.0, args.atol)
        if bad:
            print(f"FAIL: beyond rtol={args.rtol} atol={args.atol} at steps {bad[:10]}")
            ok = False
    if ok and (args.assert_equal or args.rtol is not None or args.atol > 0):
        print("PASS")
    return 0 if ok else 1

