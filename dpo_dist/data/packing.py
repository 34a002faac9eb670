"""Group pairs into token-budget micro-batches and collate them into ``PackedBatch``/``PaddedBatch``.

Packing is first-fit in the given order: each pair goes into the first micro-batch (in creation
order) that still has room for both its sequences, else it opens a new one. Micro-batches come
out in creation order and keep their pairs in input order, so the same input always gives the
same micro-batches on every rank. It is meant for one optimizer step's pairs at a time; its cost
grows with pairs x open micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dpo_dist.data.batch import IGNORE_INDEX, PackedBatch, PaddedBatch, scored_positions_of
from dpo_dist.data.tokenize import TokenizedPair


def pack_pairs(pair_lengths: Sequence[int], micro_batch_tokens: int) -> list[list[int]]:
    """Indices of ``pair_lengths`` grouped so each group's total length is <= ``micro_batch_tokens``.

    ``pair_lengths[i]`` is the tokens pair ``i`` takes packed: chosen plus rejected sequence.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    open_bins: list[int] = []  # bins that may still take a pair, in creation order
    smallest = min(pair_lengths, default=0)
    for index, length in enumerate(pair_lengths):
        if length > micro_batch_tokens:
            raise ValueError(
                f"pair {index} has {length} tokens, more than train.micro_batch_tokens="
                f"{micro_batch_tokens}; the budget must be at least 2 * data.max_length"
            )
        target = next((b for b in open_bins if room[b] >= length), None)
        if target is None:
            target = len(bins)
            bins.append([])
            room.append(micro_batch_tokens)
            open_bins.append(target)
        bins[target].append(index)
        room[target] -= length
        if room[target] < smallest:
            # Nothing can fit any more: stop scanning this bin.
            open_bins.remove(target)
    return bins


def collate_packed(pairs: Sequence[TokenizedPair], chosen_only: bool = False) -> PackedBatch:
    """One packed row of sequences chosen_0, rejected_0, chosen_1, rejected_1, ...

    ``chosen_only`` (supervised fine-tuning) packs chosen_0, chosen_1, ... and no rejected ones.
    """
    if not pairs:
        raise ValueError("cannot collate an empty micro-batch")
    sequences, labels = _sequences_and_labels(pairs, chosen_only)
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    cu_seqlens = np.zeros(len(sequences) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    total = int(cu_seqlens[-1])
    seq_index = np.repeat(np.arange(len(sequences), dtype=np.int64), lengths)
    position_ids = np.arange(total, dtype=np.int64) - np.repeat(cu_seqlens[:-1].astype(np.int64), lengths)
    labels_row = torch.from_numpy(np.concatenate(labels)).unsqueeze(0)
    seq_index_row = torch.from_numpy(seq_index)
    return PackedBatch(
        input_ids=torch.from_numpy(np.concatenate(sequences).astype(np.int64)).unsqueeze(0),
        position_ids=torch.from_numpy(position_ids).unsqueeze(0),
        labels=labels_row,
        cu_seqlens=torch.from_numpy(cu_seqlens),
        seq_index=seq_index_row,
        example_ids=_example_ids(pairs),
        scored_positions=scored_positions_of(labels_row, seq_index_row),
        max_seqlen=int(lengths.max()),
        cu_seqlens_host=tuple(cu_seqlens.tolist()),
    )


def collate_padded(pairs: Sequence[TokenizedPair], pad_id: int) -> PaddedBatch:
    """One right-padded row per sequence, in the same order as ``collate_packed``."""
    if not pairs:
        raise ValueError("cannot collate an empty micro-batch")
    sequences, labels = _sequences_and_labels(pairs)
    width = max(len(s) for s in sequences)
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    label_rows = np.full((len(sequences), width), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, (tokens, row_labels) in enumerate(zip(sequences, labels)):
        input_ids[row, : len(tokens)] = tokens
        label_rows[row, : len(tokens)] = row_labels
        attention_mask[row, : len(tokens)] = 1
    return PaddedBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        labels=torch.from_numpy(label_rows),
        example_ids=_example_ids(pairs),
    )


def _sequences_and_labels(
    pairs: Sequence[TokenizedPair], chosen_only: bool = False
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token ids and labels of every sequence, chosen before rejected within each pair."""
    sequences, labels = [], []
    for pair in pairs:
        masked_prompt = np.full(pair.prompt_len, IGNORE_INDEX, dtype=np.int64)
        for response in (pair.chosen_ids,) if chosen_only else (pair.chosen_ids, pair.rejected_ids):
            sequences.append(np.concatenate([pair.prompt_ids, response]))
            labels.append(np.concatenate([masked_prompt, response.astype(np.int64)]))
    return sequences, labels


def _example_ids(pairs: Sequence[TokenizedPair]) -> torch.Tensor:
    return torch.tensor([pair.example_id for pair in pairs], dtype=torch.int64)
