"""Token-budget packing and the packed / padded collate functions."""

import random

import pytest
import torch

from dpo_dist.data import TokenizedPair, collate_packed, collate_padded, pack_pairs
from dpo_dist.data.batch import IGNORE_INDEX

X = IGNORE_INDEX
PAIRS = [
    TokenizedPair(5, [1, 10, 11], [20, 2], [30, 31, 2]),
    TokenizedPair(9, [1, 12], [21, 22, 23, 2], [2]),
]


def test_first_fit_in_order():
    assert pack_pairs([6, 6, 4, 4], 10) == [[0, 2], [1, 3]]
    assert pack_pairs([3, 9, 3, 3, 10], 10) == [[0, 2, 3], [1], [4]]
    assert pack_pairs([], 10) == []


def test_pair_over_budget_is_an_error():
    with pytest.raises(ValueError, match="pair 1 has 11 tokens, more than train.micro_batch_tokens=10"):
        pack_pairs([4, 11], 10)


def test_packing_respects_the_budget_and_never_splits_a_pair():
    rng = random.Random(1)
    for _ in range(200):
        budget = rng.randrange(8, 200)
        lengths = [rng.randrange(2, budget + 1) for _ in range(rng.randrange(0, 60))]
        bins = pack_pairs(lengths, budget)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(b and sum(lengths[i] for i in b) <= budget for b in bins)
        assert all(b == sorted(b) for b in bins)
        assert [b[0] for b in bins] == sorted(b[0] for b in bins)
        # First fit: no pair could have gone into an earlier micro-batch.
        for later, b in enumerate(bins):
            for i in b:
                for earlier in bins[:later]:
                    used = sum(lengths[j] for j in earlier if j < i)
                    assert used + lengths[i] > budget
        assert pack_pairs(lengths, budget) == bins


def test_collate_packed_fields():
    batch = collate_packed(PAIRS)
    assert batch.input_ids.tolist() == [
        [1, 10, 11, 20, 2, 1, 10, 11, 30, 31, 2, 1, 12, 21, 22, 23, 2, 1, 12, 2]
    ]
    assert batch.labels.tolist() == [[X, X, X, 20, 2, X, X, X, 30, 31, 2, X, X, 21, 22, 23, 2, X, X, 2]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2]]
    assert batch.cu_seqlens.tolist() == [0, 5, 11, 17, 20]
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.seq_index.tolist() == [0] * 5 + [1] * 6 + [2] * 6 + [3] * 3
    assert batch.example_ids.tolist() == [5, 9]
    assert batch.max_seqlen == 6 and isinstance(batch.max_seqlen, int)
    assert batch.cu_seqlens_host == (0, 5, 11, 17, 20) and all(type(b) is int for b in batch.cu_seqlens_host)
    # The positions whose next token is a response token of the same sequence: the LM head's rows.
    assert batch.scored_positions.tolist() == [2, 3, 7, 8, 9, 12, 13, 14, 15, 18]
    assert (batch.num_pairs, batch.num_sequences, batch.num_tokens) == (2, 4, 20)
    for tensor in (batch.input_ids, batch.labels, batch.position_ids, batch.seq_index, batch.example_ids):
        assert tensor.dtype == torch.int64


def test_packed_batch_splits_into_tensors_and_host_values_and_joins_back():
    """What crosses a DeepSpeed engine's forward: every tensor positionally, host ints by name."""
    from dataclasses import fields

    from dpo_dist.data.batch import PACKED_TENSOR_FIELDS, PackedBatch

    batch = collate_packed(PAIRS)
    tensors, host = batch.split()
    assert all(isinstance(t, torch.Tensor) for t in tensors) and len(tensors) == len(PACKED_TENSOR_FIELDS)
    assert host == {"max_seqlen": 6, "cu_seqlens_host": (0, 5, 11, 17, 20)}
    assert set(PACKED_TENSOR_FIELDS) | set(host) == {f.name for f in fields(PackedBatch)}
    joined = PackedBatch.join(tensors, host)
    for f in fields(PackedBatch):
        assert getattr(joined, f.name) is getattr(batch, f.name), f.name


def test_collate_padded_same_order_right_padded():
    batch = collate_padded(PAIRS, pad_id=3)
    assert batch.input_ids.tolist() == [
        [1, 10, 11, 20, 2, 3],
        [1, 10, 11, 30, 31, 2],
        [1, 12, 21, 22, 23, 2],
        [1, 12, 2, 3, 3, 3],
    ]
    assert batch.attention_mask.tolist() == [[1] * 5 + [0], [1] * 6, [1] * 6, [1] * 3 + [0] * 3]
    assert batch.labels.tolist() == [
        [X, X, X, 20, 2, X],
        [X, X, X, 30, 31, 2],
        [X, X, 21, 22, 23, 2],
        [X, X, 2, X, X, X],
    ]
    assert batch.example_ids.tolist() == [5, 9]


def test_packed_and_padded_carry_the_same_tokens():
    packed, padded = collate_packed(PAIRS), collate_padded(PAIRS, pad_id=0)
    mask = padded.attention_mask.bool()
    assert torch.equal(packed.input_ids[0], padded.input_ids[mask])
    assert torch.equal(packed.labels[0], padded.labels[mask])


def test_empty_micro_batch_is_an_error():
    with pytest.raises(ValueError, match="empty micro-batch"):
        collate_packed([])


def test_collate_packed_chosen_only_for_sft():
    batch = collate_packed(PAIRS, chosen_only=True)
    assert batch.input_ids.tolist() == [[1, 10, 11, 20, 2, 1, 12, 21, 22, 23, 2]]
    assert batch.labels.tolist() == [[X, X, X, 20, 2, X, X, 21, 22, 23, 2]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]]
    assert batch.cu_seqlens.tolist() == [0, 5, 11]
    assert (batch.num_pairs, batch.num_sequences) == (2, 2)
