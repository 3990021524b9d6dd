"""Warmup, then a stable phase, then decay to a floor (warmup-stable-decay).

The factor for the k-th optimizer step (k = 1 .. steps) is:
- warmup (k <= W):            k / W
- stable (W < k <= W + S):    1
- decay  (k > W + S):         floor + (1 - floor) * shape(p),  p = (k - W - S) / D in (0, 1]
where D = round((steps - W) * decay_ratio) (all remaining steps when decay_ratio is None),
S = steps - W - D, and shape is linear (1 - p), sqrt (1 - sqrt p) or cosine (½(1 + cos πp)).
The last step therefore runs exactly at lr * min_lr_factor.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from torch.optim.lr_scheduler import LambdaLR

from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config import LRScheduler as LRSchedulerConfig
from torchtitan.tools.logging import logger


def lr_factor(step: int, *, total_steps: int, s: LRSchedulerConfig) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (1-based)."""
    warmup = min(s.warmup_steps, total_steps)
    remaining = total_steps - warmup
    decay = remaining if s.decay_ratio is None else round(remaining * s.decay_ratio)
    stable = remaining - decay
    if step <= warmup:
        return step / warmup
    if step <= warmup + stable or decay == 0:
        return 1.0
    progress = min((step - warmup - stable) / decay, 1.0)
    if s.decay_type == "linear":
        shape = 1.0 - progress
    elif s.decay_type == "sqrt":
        shape = 1.0 - math.sqrt(progress)
    elif s.decay_type == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # the config's choices admit only these three
        raise AssertionError(s.decay_type)
    return s.min_lr_factor + (1.0 - s.min_lr_factor) * shape


def _lambda(last_epoch: int, total_steps: int, settings: LRSchedulerConfig) -> float:
    # LambdaLR evaluates at last_epoch = 0 for the first step.
    return lr_factor(last_epoch + 1, total_steps=total_steps, s=settings)


class LRSchedulersContainer:
    """One LambdaLR per optimizer; they always move in lockstep."""

    def __init__(self, optimizers: OptimizersContainer, total_steps: int, settings: LRSchedulerConfig):
        settings.validate()  # the config section is the one home of the allowed values
        fn = functools.partial(_lambda, total_steps=total_steps, settings=settings)
        self.schedulers = [LambdaLR(opt, fn) for opt in optimizers]

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def get_last_lr(self) -> float:
        return self.schedulers[0].get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        # All schedulers share one position; saving it once keeps the checkpoint layout-independent.
        return {"last_epoch": self.schedulers[0].last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for s in self.schedulers:
            s.last_epoch = state_dict["last_epoch"]
            s._last_lr = [g["lr"] for g in s.optimizer.param_groups]
            for group, base in zip(s.optimizer.param_groups, s.base_lrs):
                group["lr"] = base * s.lr_lambdas[0](s.last_epoch)
            s._last_lr = [g["lr"] for g in s.optimizer.param_groups]


def build_lr_schedulers(
    optimizers: OptimizersContainer, total_steps: int, settings: LRSchedulerConfig
) -> LRSchedulersContainer:
    """The ``[lr_scheduler]`` schedule over ``total_steps`` optimizer steps."""
    if settings.warmup_steps >= total_steps > 1:
        # Legal (warmup is cut to the run), but the lr then peaks on the last step and never
        # decays: almost always a warmup sized for a longer run; say so instead of silence.
        logger.warning(
            f"lr_scheduler.warmup_steps = {settings.warmup_steps} >= training.steps = {total_steps}: the "
            "learning rate only warms up (it reaches optimizer.lr on the last step and never decays); "
            "lower warmup_steps for this run"
        )
    return LRSchedulersContainer(optimizers, total_steps, settings)
