"""The learning-rate schedule: warmup never starts at 0, the peak comes once, the floor at the last step."""

import math

import pytest

from dpo_dist.config import DPOConfig, OptimConfig, TrainConfig
from dpo_dist.engine import lr_lambda


def factors(schedule: str, warmup: int, steps: int, floor: float = 0.1) -> list[float]:
    cfg = DPOConfig(
        optim=OptimConfig(schedule=schedule, warmup_steps=warmup, min_lr_ratio=floor),
        train=TrainConfig(max_steps=steps),
    )
    factor = lr_lambda(cfg)
    return [factor(step) for step in range(steps)]


def test_warmup_then_cosine_reaches_the_floor_at_the_last_step():
    got = factors("cosine", warmup=2, steps=6)
    # decay steps 2..5: progress 0, 1/3, 2/3, 1
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(4)]
    assert got == pytest.approx([1 / 3, 2 / 3, *cosine])
    assert got[2] == 1.0 and got[-1] == pytest.approx(0.1)


def test_linear_without_warmup_starts_at_lr():
    assert factors("linear", warmup=0, steps=5, floor=0.0) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_constant_after_warmup_and_single_step_runs():
    assert factors("constant", warmup=3, steps=5) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert factors("cosine", warmup=0, steps=1) == [1.0]
