"""The engine's batching without a model: the global pair order (PairSampler) and each rank's
micro-batches of a step (plan_micro_batches), fillers included."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dpo_dist.engine import PairSampler, plan_micro_batches


def all_plans(positions, lengths, world, budget):
    return [plan_micro_batches(np.asarray(positions), np.asarray(lengths), rank, world, budget) for rank in range(world)]


def weight_per_position(plans_per_rank) -> dict[int, float]:
    """Total weight each position gets over all micro-batches of all ranks."""
    totals: dict[int, float] = {}
    for plans in plans_per_rank:
        for plan in plans:
            for p in plan.positions:
                totals[p] = totals.get(p, 0.0) + plan.weight
    return totals


# ---- plan_micro_batches --------------------------------------------------------------------------


def test_a_rank_with_a_single_pair_runs_a_zero_weight_filler():
    """3 pairs of 100 tokens on 2 ranks, 128 a micro-batch: rank 0 packs pairs 0 and 2 apart (2
    micro-batches), rank 1 has pair 1 alone and cannot split it, so it repeats it with weight 0:
    both ranks run 2 micro-batches (ZeRO-3's collectives need that) and pair 1 counts once."""
    positions, lengths = np.arange(3), np.array([100] * 3)
    rank0 = plan_micro_batches(positions, lengths, rank=0, world=2, budget=128)
    rank1 = plan_micro_batches(positions, lengths, rank=1, world=2, budget=128)
    assert [(p.positions, p.weight) for p in rank0] == [([0], 1.0), ([2], 1.0)]
    assert [(p.positions, p.weight) for p in rank1] == [([1], 1.0), ([1], 0.0)]
    assert weight_per_position([rank0, rank1]) == {0: 1.0, 1: 1.0, 2: 1.0}


def test_a_rank_with_fewer_micro_batches_splits_its_fullest_instead_of_filling():
    """Rank 0's three short pairs fit one micro-batch, rank 1's long ones need three: rank 0 splits
    its micro-batch into three real ones (no zero-weight forward when there is work to share)."""
    positions = np.arange(6)
    lengths = np.array([10, 100, 10, 100, 10, 100])
    rank0, rank1 = all_plans(positions, lengths, world=2, budget=128)
    assert len(rank0) == len(rank1) == 3
    assert all(p.weight == 1.0 for p in rank0 + rank1)
    assert sorted(p for plan in rank0 for p in plan.positions) == [0, 2, 4]
    assert sorted(p for plan in rank1 for p in plan.positions) == [1, 3, 5]


@pytest.mark.parametrize("seed", range(20))
def test_every_position_weighs_exactly_once_on_any_split(seed):
    """Random steps: every rank runs the same number of micro-batches, each within the token
    budget, every position of the step has total weight 1 (rank r takes positions r, r + world,
    ...), and a zero-weight micro-batch is a filler of one pair."""
    rng = random.Random(seed)
    world, budget = rng.randint(1, 4), 128
    count = rng.randint(1, 12)
    lengths = np.array([rng.randint(4, budget) for _ in range(40)])
    positions = np.array(rng.sample(range(40), count))
    plans = all_plans(positions, lengths, world, budget)
    assert len({len(p) for p in plans}) == 1, [len(p) for p in plans]
    assert weight_per_position(plans) == {int(p): 1.0 for p in positions}
    for rank, rank_plans in enumerate(plans):
        mine = {int(p) for p in positions[rank::world]}
        for plan in rank_plans:
            assert plan.positions and sum(lengths[plan.positions]) <= budget
            assert plan.weight in (0.0, 1.0)
            if plan.weight == 0.0:
                assert len(plan.positions) == 1
            if mine:
                assert set(plan.positions) <= mine, (rank, plan)


# ---- PairSampler ---------------------------------------------------------------------------------


def test_each_epoch_is_a_permutation_of_all_pairs():
    """10 pairs, 4 a step: steps 0-4 are two epochs; each epoch takes every pair once, the epochs
    in different orders, and step 2 spans the boundary (the last 2 of epoch 0, the first 2 of 1)."""
    sampler = PairSampler(10, 4, seed=0)
    stream = np.concatenate([sampler.pairs_for_step(step) for step in range(5)])
    assert stream.dtype == np.int64 and len(stream) == 20
    first, second = stream[:10], stream[10:]
    assert sorted(first) == sorted(second) == list(range(10))
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, np.arange(10))  # shuffled, not file order
    assert sampler.pairs_for_step(2).tolist() == [*first[8:], *second[:2]]


def test_the_seed_decides_the_order():
    a, b = PairSampler(50, 8, seed=0), PairSampler(50, 8, seed=1)
    assert not np.array_equal(a.pairs_for_step(0), b.pairs_for_step(0))
    assert np.array_equal(a.pairs_for_step(0), PairSampler(50, 8, seed=0).pairs_for_step(0))


def test_a_step_depends_on_the_step_alone_so_a_resumed_run_continues_exactly():
    """A resumed run builds a fresh sampler and starts at its checkpoint's step: it must see the
    pairs the uninterrupted run saw there, whatever it asked before or the global RNG's state."""
    straight = PairSampler(10, 4, seed=3)
    expected = [straight.pairs_for_step(step).tolist() for step in range(8)]
    np.random.seed(123)
    random.seed(123)
    resumed = PairSampler(10, 4, seed=3)
    assert [resumed.pairs_for_step(step).tolist() for step in range(5, 8)] == expected[5:]
    jumping = PairSampler(10, 4, seed=3)
    assert [jumping.pairs_for_step(step).tolist() for step in (7, 0, 6, 2, 1)] == [expected[s] for s in (7, 0, 6, 2, 1)]


def test_no_pairs_is_an_error():
    with pytest.raises(ValueError, match="no training pairs"):
        PairSampler(0, 4, seed=0)
