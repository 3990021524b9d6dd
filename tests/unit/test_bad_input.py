"""Red-team tests of bad input (issue #27, items 6 and 7): each class of mistake a user can
make ends in one line on stderr and exit code 2, names the culprit, and writes nothing; a
value that is legal but makes no sense for the run is warned about, never silent.

The cases run through ``torchtitan.train.main``, the function ``python -m torchtitan.train``
calls, in this process (a launch costs seconds of torch import); one real launch shows the
same on a non-zero rank of a two-rank job, before any rendezvous.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from small_trainer import REPO, small_trainer_args

import torchtitan.train as entry


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run(argv: list[str], capsys) -> tuple[int | str, list[str], str]:
    """``main(argv)``: (exit code, the 'torchtitan: error:' lines, all of stderr)."""
    from torchtitan.tools.logging import init_logger, logger

    init_logger()
    capsys.readouterr()
    # the log handler was made once, on an earlier test's (now closed) captured stderr
    # (set, not setStream: that flushes the old stream, which may be closed)
    streams = [(h, h.stream) for h in logger.handlers if isinstance(h, logging.StreamHandler)]
    for handler, _ in streams:
        handler.stream = sys.stderr
    code: int | str = 0
    try:
        entry.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else str(e.code)
    finally:
        for handler, stream in streams:
            handler.stream = stream
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("torchtitan: error:")], err


def _expect_one_line(cases, capsys, root: Path, dump_folder: str | None = None) -> None:
    """Each (name, argv, text the error must contain): exit 2, one error line naming it, no
    traceback, and nothing new under ``root`` (but inside ``dump_folder``, when given: errors
    found while building come after the config is saved there)."""
    before = _tree(root)
    problems = []
    for name, argv, must in cases:
        code, errors, err = _run(argv, capsys)
        if code != 2 or len(errors) != 1 or "Traceback" in err or must not in errors[0]:
            problems.append(f"{name}: exit {code}, {errors or err[-500:]!r} {err[err.find('Traceback') - 200:][:1500]}")
    assert not problems, "\n".join(problems)
    new = _tree(root) - before
    if dump_folder is not None:
        new = {p for p in new if p != dump_folder and not p.startswith(dump_folder + os.sep)}
    assert not new, f"a rejected run wrote {sorted(new)}"


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """A fresh working folder (the default dump folder is relative to it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    return tmp_path


def _small(*overrides: str) -> list[str]:
    return small_trainer_args(
        "out", "--training.steps", "1", "--training.seq_len", "32", "--training.local_batch_size", "2", *overrides
    )


def test_bad_config_files(cwd, capsys):
    """Non-UTF-8, binary, a folder, /dev/null as the config file."""
    (cwd / "latin1.toml").write_bytes('[job]\ndescription = "caf\xe9"\n'.encode("latin-1"))
    (cwd / "binary.toml").write_bytes(bytes(range(256)) * 4)
    (cwd / "utf16.toml").write_bytes("[job]\ndescription = 'x'\n".encode("utf-16"))
    (cwd / "folder.toml").mkdir()
    _expect_one_line([
        ("latin-1", ["--job.config_file", "latin1.toml"], "latin1.toml is not UTF-8"),
        ("binary", ["--job.config_file", "binary.toml"], "binary.toml is not UTF-8"),
        ("utf-16", ["--job.config_file", "utf16.toml"], "utf16.toml is not UTF-8"),
        ("folder", ["--job.config_file", "folder.toml"], "is a directory"),
        ("/dev/null", ["--job.config_file", "/dev/null"], "/dev/null is not a regular file"),
    ], capsys, cwd)


def test_numbers_that_overflow_or_are_not_plain_digits(cwd, capsys):
    (cwd / "huge.toml").write_text("[training]\nseq_len = 99999999999999999999999\n")
    cases = [
        ("seq_len 2**70 on the CLI", _small("--training.seq_len", str(2**70)), "training.seq_len"),
        ("seq_len 2**70 in TOML", ["--job.config_file", "huge.toml"], "training.seq_len"),
        ("seq_len past 2**24", _small("--training.seq_len", str(2**30)), "training.seq_len"),
        ("timeout 2**64", _small("--comm.init_timeout_seconds", str(2**64)), "comm.init_timeout_seconds"),
        ("timeout 10**9 s", _small("--comm.train_timeout_seconds", str(10**9)), "comm.train_timeout_seconds"),
        ("Flight Recorder 2**40 entries", _small("--comm.trace_buf_size", str(2**40)), "comm.trace_buf_size"),
        ("microbatch 2**40 samples", _small("--training.local_batch_size", str(2**40)), "training.local_batch_size"),
    ]
    for text in ("1_024", "+64", " 64", "64 ", "\u0661\u0662", "0x40", "1e3", "6\u20804"):
        cases.append((f"seq_len {text!r}", _small("--training.seq_len", text), "training.seq_len"))
    _expect_one_line(cases, capsys, cwd)


def test_text_that_cannot_be_written(cwd, capsys):
    """A description with undecodable command-line bytes (a lone surrogate) or NUL, and a
    control character in an option name: refused by name, on one line."""
    (cwd / "nul.toml").write_text('[job]\ndescription = "a\\u0000b"\n')
    (cwd / "key.toml").write_text('[training]\n"seq\\nlen" = 5\n')
    _expect_one_line([
        ("surrogate", _small("--job.description", os.fsdecode(b"run \xff")), "job.description"),
        ("NUL", ["--job.config_file", "nul.toml"], "job.description"),
        ("newline in a key", ["--job.config_file", "key.toml"], "seq\\nlen"),
        ("newline in an option", _small("--training.seq\nlen", "5"), "seq\\nlen"),
    ], capsys, cwd)


def test_start_checks_before_anything_is_written(cwd, capsys, monkeypatch):
    """Found before the build: a missing custom_import, an unknown compile backend, output
    folders that are files or under a file, a sequence TP cannot split."""
    (cwd / "afile").write_text("x")
    (cwd / "typo_zq.py").write_text("def broken(:\n")
    monkeypatch.syspath_prepend(str(cwd))
    cases = [
        ("custom_import", _small("--experimental.custom_import", "no_such_module_zq"), "experimental.custom_import"),
        ("custom_import with a syntax error", _small("--experimental.custom_import", "typo_zq"), "typo_zq.py:1"),
        ("custom_config_module with a syntax error", _small("--job.custom_config_module", "typo_zq"), "typo_zq.py:1"),
        ("compile.backend", _small("--compile.enable", "--compile.backend", "no_such_backend"), "compile.backend"),
        ("dump_folder is a file", _small("--job.dump_folder", "afile"), "job.dump_folder"),
        ("dump_folder under a file", _small("--job.dump_folder", "afile/run"), "afile is a file"),
        ("tensorboard folder is a file", _small("--job.dump_folder", ".", "--metrics.enable_tensorboard",
                                                "--metrics.save_tb_folder", "afile"), "metrics.save_tb_folder"),
        ("checkpoint folder under a file", _small("--job.dump_folder", ".", "--checkpoint.enable",
                                                  "--checkpoint.folder", "afile/ck"), "checkpoint.folder"),
        ("unknown model", _small("--model.name", "no_such_family"), "model.name"),
    ]
    _expect_one_line(cases, capsys, cwd)
    monkeypatch.setenv("WORLD_SIZE", "2")
    _expect_one_line([
        ("TP 2, seq_len 33", _small("--parallelism.tensor_parallel_degree", "2", "--training.seq_len", "33"),
         "divisible by parallelism.tensor_parallel_degree (2)"),
    ], capsys, cwd)


@pytest.fixture
def leave_process_group():
    """The cases below fail inside the build, after the 1-rank process group was created."""
    created = not dist.is_initialized()
    yield
    if created and dist.is_initialized():
        dist.destroy_process_group()


def test_bad_data_and_tokenizer_files_name_the_file(cwd, capsys, leave_process_group):
    data = cwd / "data"
    data.mkdir()
    (data / "empty.txt").write_bytes(b"")
    (data / "empty.jsonl").write_bytes(b"")
    (data / "broken.parquet").write_bytes(b"PAR1 not a parquet file")
    (data / "notjson.jsonl").write_bytes(bytes(range(1, 256)) * 8)
    hf = cwd / "tok_bad_config"
    shutil.copytree(REPO / "tests" / "assets" / "tokenizer", hf)
    (hf / "tokenizer_config.json").write_text("{not json")
    empty = cwd / "tok_empty"
    empty.mkdir()
    no_vocab = {"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}
    (empty / "tokenizer.json").write_text(json.dumps(no_vocab))
    _expect_one_line([
        ("empty .txt", _small("--training.dataset", "text", "--training.dataset_path", str(data / "empty.txt")),
         "empty.txt is empty"),
        ("empty .jsonl", _small("--training.dataset", "json", "--training.dataset_path", str(data / "empty.jsonl")),
         "empty.jsonl is empty"),
        ("corrupt parquet", _small("--training.dataset", "parquet", "--training.dataset_path", str(data)),
         "broken.parquet"),
        ("not JSON Lines", _small("--training.dataset", "json", "--training.dataset_path", str(data / "notjson.jsonl")),
         "notjson.jsonl is not JSON Lines"),
        ("bad tokenizer_config.json", _small("--model.tokenizer_path", str(hf)), "tokenizer_config.json"),
        ("empty vocabulary", _small("--model.tokenizer_path", str(empty)), "vocabulary is empty"),
    ], capsys, cwd, dump_folder="out")


def test_meta_conversion_refuses_a_malicious_pth(tmp_path, capsys):
    """A .pth whose pickle would run code: refused by torch.load(weights_only=True), one line,
    exit 2, and the code never ran."""
    import torch

    from torchtitan.convert import meta_to_dcp_main

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 128}))
    torch.save({"tok_embeddings.weight": Payload()}, meta / "consolidated.00.pth")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "params.json").write_text((meta / "params.json").read_text())
    (tmp_path / "garbage" / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "bad_params").mkdir()
    (tmp_path / "bad_params" / "params.json").write_text("{dim: 64")
    (tmp_path / "bad_params" / "consolidated.00.pth").write_bytes(b"")
    cases = ((meta, "refused"), (tmp_path / "garbage", "cannot load"), (tmp_path / "bad_params", "params.json"))
    for folder, must in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            meta_to_dcp_main([str(folder), str(tmp_path / "out")])
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 1 and must in lines[0], lines
    assert not marker.exists() and not (tmp_path / "out").exists()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_values_that_make_no_sense_are_warned_about():
    """Warm-up longer than the run, selective AC every N > layers: a warning, never silence.
    (memory_estimation.enable runs the planner's dry run: test_planner's
    test_memory_estimation_option_logs_the_dry_run_before_the_build.)"""
    from torch import nn

    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.config import JobConfig
    from torchtitan.distributed.activation_checkpoint import apply_ac
    from torchtitan.tools.logging import logger

    records = _Records()
    logger.addHandler(records)
    try:
        cfg = JobConfig()
        model = nn.Module()
        model.layers = nn.ModuleDict({str(i): nn.Linear(4, 4) for i in range(3)})
        optimizers = build_optimizers([model], cfg.optimizer)
        cfg.lr_scheduler.warmup_steps = 10
        build_lr_schedulers(optimizers, 5, cfg.lr_scheduler)
        cfg.lr_scheduler.warmup_steps = 2
        build_lr_schedulers(optimizers, 5, cfg.lr_scheduler)  # sensible: no warning
        apply_ac(model, "selective", "4")
        apply_ac(model, "selective", "2")  # sensible: no warning
    finally:
        logger.removeHandler(records)
    assert len(records.messages) == 2, records.messages
    assert "lr_scheduler.warmup_steps = 10 >= training.steps = 5" in records.messages[0]
    assert "selective_ac_option = '4'" in records.messages[1] and "<= 3" in records.messages[1]


def test_real_launch_second_rank_fails_before_the_rendezvous(tmp_path):
    """``python -m torchtitan.train`` as rank 1 of 2 with a sequence TP cannot split: the same
    one line and exit 2 as rank 0, at once (no MASTER_ADDR: a rendezvous would fail instead)."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    env.pop("MASTER_ADDR", None)
    argv = small_trainer_args(tmp_path / "out", "--parallelism.tensor_parallel_degree", "2",
                              "--training.seq_len", "33")
    out = subprocess.run([sys.executable, "-m", "torchtitan.train", *argv], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    errors = [line for line in out.stderr.splitlines() if line.startswith("torchtitan: error:")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-2000:]
    assert "training.seq_len 33 must be divisible by parallelism.tensor_parallel_degree (2)" in errors[0]
    assert "Traceback" not in out.stderr and _tree(tmp_path) == set()
