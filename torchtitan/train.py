"""The training entry point.

    python -m torchtitan.train --job.config_file train_configs/debug_model.toml
    torchrun --nproc_per_node 8 -m torchtitan.train --job.config_file ...

The config is parsed and validated before torch is imported, so a mistyped option or a
bad value is answered in a fraction of a second (and on every rank of a large job before
any of them spends time starting up). Exit codes: 0 done, 2 bad input (one line on
stderr, ``torchtitan: error: ...``), the preemption code after a SIGTERM/SIGUSR1
checkpoint, 4 a non-finite loss under the stop policy; an uncaught exception goes to
torchrun's failure summary through ``@record``. ``--comm.mode fake_backend`` plans instead of
training: the dry run of ``scripts/plan.py`` for $WORLD_SIZE ranks (rank 0 only), as
``DRY_RUN=1 ./run_train.sh`` does, with the planner's exit codes (0 fits, 1 does not, 2 bad input).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from torchtitan.config import ConfigError, ConfigManager, JobConfig
from torchtitan.config.values import dump_toml, format_config
from torchtitan.tools.logging import init_logger, logger


def _fail(message: str) -> None:
    print(f"torchtitan: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    init_logger()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = ConfigManager().parse_args(argv)
    except ConfigError as e:
        _fail(str(e))
    if cfg.comm.mode == "fake_backend":
        _plan(argv)
        return
    from torch.distributed.elastic.multiprocessing.errors import record

    # a rank's uncaught exception goes to torchrun's failure summary, with the rank
    record(_train)(cfg)


def _train(cfg: JobConfig) -> None:
    from torchtitan.components.checkpoint import CheckpointError
    from torchtitan.components.fault_tolerance import EXIT_NON_FINITE, NonFiniteError, Preempted
    from torchtitan.trainer import Trainer

    if int(os.environ.get("RANK", 0)) == 0:
        os.makedirs(cfg.job.dump_folder, exist_ok=True)
        dump_toml(cfg, os.path.join(cfg.job.dump_folder, "config.toml"))
        if cfg.job.save_config_file is not None:
            _save_config(cfg, os.path.join(cfg.job.dump_folder, cfg.job.save_config_file))
        if cfg.job.print_config:
            logger.info("job config:\n" + format_config(cfg))
        if cfg.memory_estimation.enable:
            _log_memory_estimate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    try:
        trainer = Trainer(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        # Bad input discovered while building (layout, tokenizer, dataset): one line, exit 2.
        if os.environ.get("TORCHTITAN_TRACEBACK"):
            raise
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    error = None
    clean = False
    exit_code = 0
    try:
        trainer.train()
        clean = True
    except Preempted as e:  # every rank stopped at the same step, after its checkpoint
        clean = True
        exit_code = e.exit_code
        logger.warning(str(e))
    except NonFiniteError as e:  # agreed by every rank; the last good state is saved
        clean = True
        error, exit_code = str(e), EXIT_NON_FINITE
    except (CheckpointError, FileNotFoundError) as e:
        # A bad checkpoint, a failed save, or a data file gone mid-run: one line, exit 2.
        if os.environ.get("TORCHTITAN_TRACEBACK"):
            raise
        error = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, FileNotFoundError):
            error += " (gone during training: restore it, then rerun to resume from the latest checkpoint)"
        exit_code = 2
    finally:
        trainer.close(clean=clean)
    if error is not None:
        print(f"torchtitan: error: {error}", file=sys.stderr)
    if exit_code:
        sys.exit(exit_code)


def _plan(argv: list[str]) -> None:
    """``comm.mode = fake_backend``: TorchTitan's dry run, here the planner's (docs/planning.md)."""
    if int(os.environ.get("RANK", 0)) != 0:
        return  # under torchrun every rank got the same command; one plan is enough
    from torchtitan.planner.cli import main as plan_main

    world_size = os.environ.get("WORLD_SIZE") or os.environ.get("NGPU") or "1"
    plan_main(["--world_size", world_size, *argv])


def _save_config(cfg: JobConfig, path: str) -> None:
    """``job.save_config_file``: the final config as JSON (a .json name) or TOML."""
    import json

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if path.endswith(".json"):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f, indent=2)
    else:
        dump_toml(cfg, path)
    logger.info(f"config saved to {path}")


def _log_memory_estimate(cfg: JobConfig, world_size: int) -> None:
    """``memory_estimation.enable``: the planner's dry run of this config for this world size
    (meta model, fake process group: no device memory), logged before the real build. It runs
    in a child process: its fake process groups must not share this process's registry."""
    import subprocess

    config = os.path.join(cfg.job.dump_folder, "config.toml")  # written just before
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("TORCHELASTIC_")}
    cmd = [sys.executable, "-m", "torchtitan.planner.preflight", "--world_size", str(world_size),
           "--job.config_file", config]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        logger.warning("memory estimation: the dry run took over 15 minutes; skipped")
        return
    if out.returncode != 0:
        # the build below raises the same error, with the usual one-line exit
        lines = (out.stderr or out.stdout).strip().splitlines()
        logger.warning(f"memory estimation: the dry run stopped: {lines[-1] if lines else out.returncode}")
        return
    logger.info(f"memory estimation for {world_size} rank(s), before training:\n{out.stdout.rstrip()}")


# torchrun's variables: the dry run plans its own world and must not join the launch's.
_LAUNCH_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_WORLD_SIZE", "ROLE_NAME"}


def __getattr__(name: str) -> Any:
    """``from torchtitan.trainer import Trainer`` still works; torch loads only then."""
    if name == "Trainer":
        from torchtitan import trainer

        return trainer.Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
