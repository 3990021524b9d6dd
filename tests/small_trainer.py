"""The small trainer the tests build: the debug model's TOML, in fp32, on the test tokenizer.

    from small_trainer import small_trainer_args, small_trainer_config
    cfg = small_trainer_config(tmp_path, "--training.seq_len", "64", "--training.steps", "2")

``tests/`` is on ``sys.path`` (its conftest.py puts it there), so every test folder imports
this module by name; launched ranks inherit the path. Overrides come last: an option given
again replaces the base value.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEBUG_TOML = str(REPO / "train_configs" / "debug_model.toml")
TOKENIZER = str(REPO / "tests" / "assets" / "test_tiktoken.model")


def small_trainer_args(dump_folder: str | Path, *overrides: str) -> list[str]:
    """Trainer options: the debug TOML, ``dump_folder``, the test tokenizer, fp32; then ``overrides``."""
    return [
        "--job.config_file", DEBUG_TOML,
        "--job.dump_folder", str(dump_folder),
        "--model.tokenizer_path", TOKENIZER,
        "--training.mixed_precision_param", "float32",
        *overrides,
    ]


def small_trainer_config(dump_folder: str | Path, *overrides: str):
    """The parsed ``JobConfig`` of :func:`small_trainer_args`."""
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args(small_trainer_args(dump_folder, *overrides))


def train_debug_toml(tmp_path: str | Path, toml: str, steps: int = 6):
    """``train_configs/<toml>`` through the real Trainer on one CPU process, fp32, seq 64,
    local batch 2, ``steps`` steps: (the closed trainer, its losses)."""
    from torchtitan.config import ConfigManager
    from torchtitan.trainer import Trainer

    repo = Path(__file__).resolve().parents[1]
    cfg = ConfigManager().parse_args(
        ["--job.config_file", str(repo / "train_configs" / toml),
         "--job.dump_folder", str(tmp_path), "--job.no-print_config",
         "--model.tokenizer_path", str(repo / "tests/assets/test_tiktoken.model"),
         "--training.mixed_precision_param", "float32", "--training.seq_len", "64",
         "--training.local_batch_size", "2", "--training.steps", str(steps), "--lr_scheduler.warmup_steps", "2",
         "--optimizer.lr", "3e-3", "--activation_checkpoint.mode", "none", "--comm.trace_buf_size", "0"]
    )
    trainer = Trainer(cfg)
    try:
        losses = trainer.train()
    finally:
        trainer.close()
    return trainer, losses
