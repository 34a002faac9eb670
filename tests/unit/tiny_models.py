"""Tiny random-init causal LMs and hand-built batches for the correctness tests (no hub access)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dpo_dist.attention import available_backends
from dpo_dist.data.batch import IGNORE_INDEX, PackedBatch, PaddedBatch, scored_positions_of

VOCAB = 128
PAD_ID = 0


def backend_params() -> list:
    """Every concrete packed-attention backend; those that cannot run on this CPU are skipped, visibly."""
    runnable = available_backends("cpu")
    return [
        pytest.param(name, marks=pytest.mark.skipif(name not in runnable, reason=f"{name} needs CUDA"))
        for name in ("flash", "varlen", "sdpa")
    ]


# Grouped-query attention: 4 query heads share 2 key/value heads.
TINY_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny_config(config_class, **settings):
    """``config_class`` (any HF causal-LM config) in the tiny GQA shape, ``settings`` winning."""
    return config_class(**(TINY_SHAPE | settings))


def tiny_llama_config(**overrides) -> LlamaConfig:
    return tiny_config(LlamaConfig, **{"pad_token_id": PAD_ID, "tie_word_embeddings": False, **overrides})


def seeded(model_class, config, seed: int = 0):
    """``model_class(config)`` in fp32 with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return model_class(config).float()


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    return seeded(LlamaForCausalLM, tiny_llama_config(**overrides), seed)


def random_sequences(
    lengths: list[int], *, vocab: int = VOCAB, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) per sequence: a prompt of about a third, the rest scored response tokens."""
    generator = torch.Generator().manual_seed(seed)
    sequences = []
    for length in lengths:
        ids = torch.randint(1, vocab, (length,), generator=generator)
        labels = ids.clone()
        labels[: max(1, length // 3)] = IGNORE_INDEX
        sequences.append((ids, labels))
    return sequences


def packed_batch(sequences: list[tuple[torch.Tensor, torch.Tensor]]) -> PackedBatch:
    """One packed row in the given order (chosen_0, rejected_0, ...), as the collate function builds it."""
    lengths = torch.tensor([len(ids) for ids, _ in sequences])
    cu_seqlens = torch.zeros(len(sequences) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    labels = torch.cat([labels for _, labels in sequences]).unsqueeze(0)
    seq_index = torch.repeat_interleave(torch.arange(len(sequences)), lengths)
    return PackedBatch(
        input_ids=torch.cat([ids for ids, _ in sequences]).unsqueeze(0),
        position_ids=torch.cat([torch.arange(n) for n in lengths.tolist()]).unsqueeze(0),
        labels=labels,
        cu_seqlens=cu_seqlens,
        seq_index=seq_index,
        example_ids=torch.arange(len(sequences) // 2),
        scored_positions=scored_positions_of(labels, seq_index),
        max_seqlen=int(lengths.max()),
        cu_seqlens_host=tuple(cu_seqlens.tolist()),
    )


def padded_batch(sequences: list[tuple[torch.Tensor, torch.Tensor]]) -> PaddedBatch:
    """The same sequences one per row, right-padded."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), PAD_ID)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX)
    for row, (ids, seq_labels) in enumerate(sequences):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = seq_labels
    return PaddedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        example_ids=torch.arange(len(sequences) // 2),
    )


def reference_sequence_logps(model, sequences: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Summed response log-probs, one plain unpacked forward per sequence, written out longhand.

    ``model`` must use a standard attention implementation (not packed attention).
    """
    totals = []
    for ids, labels in sequences:
        logits = model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        total = torch.zeros((), dtype=torch.float64)
        for position in range(1, len(ids)):
            if labels[position] != IGNORE_INDEX:
                total = total + log_probs[position - 1, labels[position]]
        totals.append(total)
    return torch.stack(totals)
