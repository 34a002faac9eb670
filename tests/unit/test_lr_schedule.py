"""The learning-rate schedule: warmup never starts at 0, the peak comes once, the floor at the last step."""

import math

import pytest

from dpo_dist.config import DPOConfig, OptimConfig, TrainConfig
from dpo_dist.model import lr_lambda


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


def test_weight_decay_applies_to_matrices_not_to_biases_and_norms():
    """As HF's Trainer (bias and LayerNorm excluded), nanoGPT and torchtitan: one AdamW step with
    a zero gradient moves only the decayed parameters."""
    import torch

    from dpo_dist.model import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    params = list(model.parameters())
    cfg = DPOConfig(optim=OptimConfig(lr=0.1, weight_decay=0.5))
    optimizer = build_optimizer(cfg, params, torch.device("cpu"))
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 3]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    moved = [not torch.equal(a, p) for a, p in zip(before, params)]
    assert moved == [True, False, False, False]  # weight decayed; bias, norm weight and norm bias kept
    assert len(build_optimizer(DPOConfig(), params, torch.device("cpu")).param_groups) == 1  # no decay: one group


def test_warmup_ratio_is_a_share_of_the_steps_and_replaces_warmup_steps():
    cfg = DPOConfig(optim=OptimConfig(warmup_steps=50, warmup_ratio=0.1), train=TrainConfig(max_steps=25))
    assert cfg.optim.warmup_for(25) == 3  # ceil(2.5)
    assert cfg.optim.warmup_for(30) == 3 and OptimConfig(warmup_steps=7).warmup_for(30) == 7
    factor = lr_lambda(cfg)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    with pytest.raises(Exception, match=r"optim.warmup_ratio: must be in \[0, 1\)"):
        OptimConfig(warmup_ratio=1.0)
