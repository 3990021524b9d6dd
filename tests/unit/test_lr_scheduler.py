import math

import pytest
import torch

from torchtitan.components.lr_scheduler import build_lr_schedulers, lr_factor
from torchtitan.components.optimizer import build_optimizers
from torchtitan.config import LRScheduler as LRSchedulerConfig
from torchtitan.config import Optimizer as OptimizerConfig


def _lrs_seen_by_optimizer(total_steps, settings, peak=1.0):
    model = torch.nn.Linear(2, 2)
    opts = build_optimizers([model], OptimizerConfig(lr=peak, implementation="for-loop"))
    scheds = build_lr_schedulers(opts, total_steps, settings)
    seen = []
    for _ in range(total_steps):
        seen.append(opts.param_groups[0]["lr"])  # the lr this step uses
        opts.step()
        scheds.step()
    return seen


def test_linear_warmup_then_linear_decay_to_floor():
    s = LRSchedulerConfig(warmup_steps=2, decay_type="linear", min_lr_factor=0.1)
    seen = _lrs_seen_by_optimizer(10, s)
    # warmup: 1/2, 2/2; decay over the 8 remaining steps: p = k/8
    expected = [0.5, 1.0] + [0.1 + 0.9 * (1 - k / 8) for k in range(1, 9)]
    assert seen == pytest.approx(expected, abs=1e-12)
    assert seen[-1] == pytest.approx(0.1)


def test_cosine_and_sqrt_shapes_at_chosen_steps():
    cos = LRSchedulerConfig(warmup_steps=0, decay_type="cosine", min_lr_factor=0.0)
    assert lr_factor(50, total_steps=100, s=cos) == pytest.approx(0.5)
    assert lr_factor(25, total_steps=100, s=cos) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(100, total_steps=100, s=cos) == pytest.approx(0.0, abs=1e-12)
    sq = LRSchedulerConfig(warmup_steps=0, decay_type="sqrt", min_lr_factor=0.2)
    assert lr_factor(25, total_steps=100, s=sq) == pytest.approx(0.2 + 0.8 * (1 - 0.5))


def test_decay_ratio_keeps_a_stable_phase():
    s = LRSchedulerConfig(warmup_steps=10, decay_ratio=0.2, decay_type="linear", min_lr_factor=0.0)
    # 90 steps after warmup, 18 of them decaying: stable through step 82.
    assert lr_factor(10, total_steps=100, s=s) == 1.0
    assert lr_factor(82, total_steps=100, s=s) == 1.0
    assert lr_factor(83, total_steps=100, s=s) == pytest.approx(1 - 1 / 18)
    assert lr_factor(100, total_steps=100, s=s) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_state_round_trip_resumes_the_schedule():
    s = LRSchedulerConfig(warmup_steps=3, decay_type="cosine", min_lr_factor=0.05)
    full = _lrs_seen_by_optimizer(12, s, peak=3e-4)

    model = torch.nn.Linear(2, 2)
    opts = build_optimizers([model], OptimizerConfig(lr=3e-4, implementation="for-loop"))
    scheds = build_lr_schedulers(opts, 12, s)
    for _ in range(5):
        opts.step()
        scheds.step()
    state = scheds.state_dict()

    model2 = torch.nn.Linear(2, 2)
    opts2 = build_optimizers([model2], OptimizerConfig(lr=3e-4, implementation="for-loop"))
    scheds2 = build_lr_schedulers(opts2, 12, s)
    scheds2.load_state_dict(state)
    resumed = []
    for _ in range(7):
        resumed.append(opts2.param_groups[0]["lr"])
        opts2.step()
        scheds2.step()
    assert resumed == pytest.approx(full[5:], rel=1e-12)
