"""Dry-run planner: validate and size a layout for any world size without GPUs.

``dry_run`` builds a config's real layout on a fake process group (one rank per role) and
predicts each rank's memory and the step time; ``search`` enumerates legal layouts for a
model, world size, GPU and sequence length and ranks those that fit by a cost model.
``scripts/plan.py`` is the command line; docs/planning.md explains the models.
"""

from torchtitan.planner.dry_run import Plan, RankPlan, dry_run
from torchtitan.planner.hardware import GPUS, GpuSpec, get_gpu
from torchtitan.planner.layout import Layout

__all__ = ["GPUS", "GpuSpec", "Layout", "Plan", "RankPlan", "dry_run", "get_gpu"]
