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
    print(f"torchtitan: error: {_one_line(message)}", file=sys.stderr)
    sys.exit(2)


def _one_line(message: str) -> str:
    """``message`` on one line: a newline or other control character inside a value the
    user gave (a quoted TOML key, a command-line argument) is shown escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)


def main(argv: list[str] | None = None) -> int:
    """Train (or plan); the exit code once training has ended. Bad input exits 2 from here."""
    init_logger()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = ConfigManager().parse_args(argv)
    except ConfigError as e:
        _fail(str(e))
    if cfg.comm.mode == "fake_backend":
        _plan(argv)
        return 0
    from torch.distributed.elastic.multiprocessing.errors import record

    # a rank's uncaught exception goes to torchrun's failure summary, with the rank
    return record(_train)(cfg)


def _train(cfg: JobConfig) -> int:
    from torchtitan.components.checkpoint import CheckpointError
    from torchtitan.components.fault_tolerance import EXIT_NON_FINITE, NonFiniteError, Preempted
    from torchtitan.components.data import DataConfigError, EmptyShardError
    from torchtitan.trainer import Trainer

    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", 0))
    try:
        check_start(cfg, world_size)
        cfg, auto_choice = _resolve_memory_policy(cfg, world_size, rank)
    except (ConfigError, ValueError) as e:
        _fail(str(e).splitlines()[0])
    if rank == 0:
        try:
            os.makedirs(cfg.job.dump_folder, exist_ok=True)
            dump_toml(cfg, os.path.join(cfg.job.dump_folder, "config.toml"))
            if cfg.job.save_config_file is not None:
                _save_config(cfg, os.path.join(cfg.job.dump_folder, cfg.job.save_config_file))
        except OSError as e:
            _fail(f"job.dump_folder = {cfg.job.dump_folder!r}: cannot write there ({e})")
        if cfg.job.print_config:
            logger.info("job config:\n" + format_config(cfg))
        if cfg.memory_estimation.enable:
            _log_memory_estimate(cfg, world_size)
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
        if auto_choice is not None and rank == 0:
            from torchtitan.planner.memory_policy import log_prediction_gap

            log_prediction_gap(auto_choice, trainer.metrics)
    except Preempted as e:  # every rank stopped at the same step, after its checkpoint
        clean = True
        exit_code = e.exit_code
        logger.warning(str(e))
    except NonFiniteError as e:  # agreed by every rank; the last good state is saved
        clean = True
        error, exit_code = str(e), EXIT_NON_FINITE
    except (CheckpointError, FileNotFoundError, DataConfigError, EmptyShardError) as e:
        # A bad checkpoint, a failed save, a data file gone mid-run, or data that yields no
        # usable sample (found only when the first batch is read): one line, exit 2.
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
    return exit_code


def _exit_now(code: int) -> None:
    """End the process once training has ended and the process groups are gone, without
    the interpreter's finalization. That takes ~1 s with torch loaded, and the ranks of a
    job finish at different moments inside it: torchrun tears down the slower ones with
    SIGTERM (-15) as soon as the first exits, and a gloo worker thread freed during
    finalization can abort its rank (-6, seen once in 4-rank CI runs) before the expected
    code (0, or the preemption code) is seen. Everything the run writes is closed by then;
    only the output streams need flushing."""
    import logging

    for handler in logging.getLogger().handlers + logger.handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _resolve_memory_policy(cfg: JobConfig, world_size: int, rank: int):
    """``activation_checkpoint.mode = auto``: the planner's policy for this card, written into
    the config before it is dumped (docs/planning.md); other modes pass through."""
    if cfg.activation_checkpoint.mode != "auto":
        return cfg, None
    from torchtitan.planner.memory_policy import resolve_for_launch

    return resolve_for_launch(cfg, world_size, rank)


def check_start(cfg: JobConfig, world_size: int) -> None:
    """Everything about ``cfg`` that can be checked before building, in the order a launch
    meets it: output folders, ``experimental.custom_import``, ``compile.backend``, the layout
    for ``world_size`` ranks and the model family's own rules. Raises ConfigError (one line)
    before any file is written or any process group waits; the fuzz tests call it as the
    "would start" verdict."""
    from torchtitan.components.checkpoint.folder import check_dump_subfolders
    from torchtitan.distributed.layout import validate_layout
    from torchtitan.models import check_model_config

    check_dump_subfolders(cfg)  # no absolute or '..' folder options: before config.toml is written
    _check_output_folders(cfg)
    if cfg.experimental.custom_import:
        _import_custom(cfg.experimental.custom_import)
    if cfg.compile.enable:
        _check_compile_backend(cfg.compile.backend)
    validate_layout(cfg, world_size)
    try:
        check_model_config(cfg)
    except ConfigError:
        raise
    except ValueError as e:  # the registry's "unknown model.name / model.flavor"
        raise ConfigError(str(e)) from None


def _output_folders(cfg: JobConfig) -> list[tuple[str, str]]:
    """(option, folder) of every folder this run may write, all inside job.dump_folder."""
    dump = cfg.job.dump_folder
    wanted = [
        ("job.dump_folder", dump, True),
        ("metrics.save_tb_folder", cfg.metrics.save_tb_folder, cfg.metrics.enable_tensorboard),
        ("metrics.save_jsonl_folder", cfg.metrics.save_jsonl_folder, cfg.metrics.enable_jsonl),
        ("checkpoint.folder", cfg.checkpoint.folder, cfg.checkpoint.enable),
        ("profiling.save_traces_folder", cfg.profiling.save_traces_folder, cfg.profiling.enable_profiling),
        ("profiling.save_memory_snapshot_folder", cfg.profiling.save_memory_snapshot_folder,
         cfg.profiling.enable_memory_snapshot),
        ("comm.save_traces_folder", cfg.comm.save_traces_folder, cfg.comm.trace_buf_size > 0),
        ("job.save_config_file", os.path.dirname(cfg.job.save_config_file or ""), cfg.job.save_config_file is not None),
    ]
    return [(option, os.path.join(dump, folder)) for option, folder, on in wanted if on]


def _check_output_folders(cfg: JobConfig) -> None:
    """Each output folder is a folder or can be made one: no file sits at it or above it,
    and the nearest existing folder is writable."""
    for option, folder in _output_folders(cfg):
        path = os.path.abspath(folder)
        while not os.path.exists(path):
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            raise ConfigError(f"{option}: {folder} cannot be a folder: {path} is a file; choose another path")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{option}: cannot write under {path} (permission denied); choose another path")


def _import_custom(name: str) -> None:
    """``experimental.custom_import``: import it now, so a missing module is one line."""
    import importlib

    try:
        importlib.import_module(name)
    except ImportError as e:
        raise ConfigError(
            f"experimental.custom_import = {name!r}: cannot import it ({e}); is it on PYTHONPATH?"
        ) from None
    except SyntaxError as e:
        raise ConfigError(f"experimental.custom_import = {name!r}: {e.filename}:{e.lineno}: {e.msg}") from None


def _check_compile_backend(backend: str) -> None:
    """``compile.backend`` must name a torch.compile backend (looked up, not compiled)."""
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    try:
        lookup_backend(backend)
    except Exception:  # InvalidBackend, or a registered entry point that fails to load
        known = ", ".join(list_backends())
        raise ConfigError(f"compile.backend = {backend!r}: not a torch.compile backend; known: {known}") from None


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
    _exit_now(main())
