"""torchtitan.benchmarking.loss_compare (scripts/loss_compare.py): parse trainer logs, compare step by step, write a PNG."""

from __future__ import annotations

import math
import shlex
import struct
import sys
from pathlib import Path

import pytest

from torchtitan.benchmarking import loss_compare as lc

# Lines as the trainer prints them (with colour codes), plus noise.
LOG_A = """\
[rank0]: INFO building llama3 debugmodel
\x1b[31mstep:  1  \x1b[32mloss: 8.1234567  \x1b[33mgrad_norm: 1.2000  \x1b[36mlr: 8.0000e-05  tps: 1,000
\x1b[31mstep:  2  \x1b[32mloss: 7.5  \x1b[33mgrad_norm: 1.1000
step:  3  loss: 7.25  grad_norm: 1.0  lr: 1e-4
step: 10  loss: 6.5e+00  grad_norm: 1.0
"""
LOG_B = LOG_A.replace("loss: 7.25", "loss: 7.2500001").replace("step: 10", "step: 11")


def test_parse_strips_colours_and_reads_scientific():
    assert lc.parse_losses(LOG_A) == {1: 8.1234567, 2: 7.5, 3: 7.25, 10: 6.5}
    assert math.isnan(lc.parse_losses("step: 4  loss: nan  grad_norm: nan")[4])
    # A resumed run repeats steps: the later line wins.
    assert lc.parse_losses("step: 5  loss: 2.0\nstep: 5  loss: 1.5\n") == {5: 1.5}


def test_compare_common_steps_and_tolerances():
    cmp = lc.compare(lc.parse_losses(LOG_A), lc.parse_losses(LOG_B))
    assert cmp.steps == [1, 2, 3]
    assert cmp.abs_diff == pytest.approx([0.0, 0.0, 1e-7], abs=1e-12)
    assert not cmp.bitwise_equal()
    assert cmp.failures(rtol=1e-9, atol=0.0) == [3]
    assert cmp.failures(rtol=1e-6, atol=0.0) == []  # 1e-7 / 7.25 ≈ 1.4e-8 relative
    same = lc.compare(lc.parse_losses(LOG_A), lc.parse_losses(LOG_A))
    assert same.bitwise_equal() and same.failures(0.0, 0.0) == []
    with pytest.raises(lc.LossCompareError, match="no 'step: N  loss: X' lines"):
        lc.compare({}, {1: 1.0})
    with pytest.raises(lc.LossCompareError, match="share no step"):
        lc.compare({1: 1.0}, {2: 1.0})


def _read_png(path: Path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height, data


def test_cli_logs_assert_equal_and_png(tmp_path, capsys):
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text(LOG_A)
    b.write_text(LOG_B)
    png = tmp_path / "curves.png"
    assert lc.main(["--logs", str(a), str(a), "--assert-equal", "--png", str(png)]) == 0
    assert "PASS" in capsys.readouterr().out
    w, h, _ = _read_png(png)
    assert w > 100 and h > 100
    assert lc.main(["--logs", str(a), str(b), "--assert-equal", "--png", ""]) == 1
    assert "losses differ at steps [3]" in capsys.readouterr().out
    assert lc.main(["--logs", str(a), str(b), "--rtol", "1e-6", "--png", ""]) == 0
    assert lc.main(["--logs", str(a), str(tmp_path / "missing.log")]) == 2


def test_png_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    cmp = lc.compare({1: 3.0, 2: 2.0}, {1: 3.0, 2: 2.5})
    with pytest.raises(lc.LossCompareError, match="pip install matplotlib"):
        lc.write_png(str(tmp_path / "p.png"), cmp)


def test_cli_runs_two_commands(tmp_path, capsys):
    def echo(text: str) -> str:
        return f"{shlex.quote(sys.executable)} -c " + shlex.quote(f"print({text!r})")

    cmds = [echo("step: 1  loss: 2.0\nstep: 2  loss: 1.0"), echo("step: 1  loss: 2.0\nstep: 2  loss: 1.0")]
    saved = [str(tmp_path / "x.log"), str(tmp_path / "y.log")]
    assert lc.main(["--commands", *cmds, "--assert-equal", "--png", "", "--save-logs", *saved]) == 0
    assert "2 common steps" in capsys.readouterr().out
    assert lc.parse_losses(Path(saved[1]).read_text()) == {1: 2.0, 2: 1.0}
    assert lc.main(["--commands", f"{shlex.quote(sys.executable)} -c 'raise SystemExit(3)'", cmds[0]]) == 2


def test_text_and_assert_modes_without_matplotlib(tmp_path):
    """scripts/loss_compare.py when matplotlib cannot be imported: the table and the verdict,
    no plot, exit 0 (the new step-line suffix [step/total, eta] does not disturb parsing)."""
    import os
    import subprocess

    blocker = tmp_path / "block"
    (blocker / "matplotlib").mkdir(parents=True)
    (blocker / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    text = LOG_A.replace("step:  3  loss: 7.25  grad_norm: 1.0  lr: 1e-4", "step:  3  loss: 7.25  data: 0.1%  [3/10 30%, eta 0:00:07]")
    a.write_text(text)
    b.write_text(text)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    out = subprocess.run([sys.executable, str(repo / "scripts" / "loss_compare.py"), "--logs", str(a), str(b), "--assert-equal"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "PASS" in out.stdout and "4 common steps" in out.stdout and "matplotlib is not installed" in out.stderr
    assert not (tmp_path / "loss_compare.png").exists()
