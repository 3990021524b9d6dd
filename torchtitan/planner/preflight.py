"""The memory estimate a launch logs before training (``memory_estimation.enable``).

``python -m torchtitan.train`` runs this module on rank 0 before the trainer is built, as a
child process (``python -m torchtitan.planner.preflight --world_size N <trainer options>``):
the planner's dry run of the run's own config for the launch's world size, reported per rank
role as ``scripts/plan.py`` prints it. A child, because the dry run's fake process groups
leave names in torch's process-group registry that a real TP mesh built later in the same
process would collide with.
The GPU is the one this process sees when its name is in the planner's table (with the
memory torch reports for it); otherwise the table's H100 is assumed, and the report says so.
"""

from __future__ import annotations

import os
import sys
import time

from torchtitan.config import JobConfig
from torchtitan.planner.hardware import GIB, GPUS, GpuSpec

__all__ = ["launch_gpu", "preflight_report"]

DEFAULT_GPU = "H100"


def launch_gpu() -> tuple[GpuSpec, str]:
    """The table entry of this process's GPU, and a note when it had to be assumed."""
    import torch

    if not torch.cuda.is_available():
        return GPUS[DEFAULT_GPU], f"no CUDA device here: planned for the table's {DEFAULT_GPU}"
    # this rank's card (the trainer has not picked its device yet: current_device() is 0)
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    name = torch.cuda.get_device_name(index)
    for key, spec in GPUS.items():
        if key in name.upper():
            total = torch.cuda.get_device_properties(index).total_memory
            return spec.with_overrides(memory_gib=total / GIB), ""
    return GPUS[DEFAULT_GPU], f"{name} is not in the planner's table: planned for its {DEFAULT_GPU}"


def preflight_report(cfg: JobConfig, world_size: int, headroom: float | None = None, margin: float = 0.05) -> str:
    """The dry run's per-rank memory (and step time) report of ``cfg`` on ``world_size``
    ranks, on this process's card capped at ``training.device_memory_limit_gib`` as the launch
    caps it; ``headroom`` (GiB) defaults to ``hardware.headroom_gib``. Raises what the dry run
    raises (the error the build itself would raise)."""
    from torchtitan.planner.dry_run import dry_run
    from torchtitan.planner.hardware import headroom_gib
    from torchtitan.planner.report import format_plan

    gpu, note = launch_gpu()
    limit = cfg.training.device_memory_limit_gib
    if limit > 0:
        gpu = gpu.with_overrides(memory_gib=min(limit, gpu.memory_gib))
    room = headroom_gib(world_size, capped=limit > 0) if headroom is None else headroom
    t0 = time.perf_counter()
    plan = dry_run(cfg, world_size, gpu, room, margin)
    text = format_plan(plan, f"{cfg.model.name} {cfg.model.flavor}", time.perf_counter() - t0)
    return text + (f"\nnote: {note}" if note else "")


def main(argv: list[str] | None = None) -> int:
    """``--world_size N`` then the trainer's options; prints the report (exit 2: bad input)."""
    from torchtitan.config import ConfigError, ConfigManager

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        at = args.index("--world_size")
        world_size = int(args[at + 1])
        del args[at : at + 2]
        cfg = ConfigManager().parse_args(args)
        print(preflight_report(cfg, world_size))
    except (ValueError, IndexError, ConfigError, RuntimeError, FileNotFoundError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{type(e).__name__}: {first}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
