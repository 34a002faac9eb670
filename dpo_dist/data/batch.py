"""Micro-batch layouts shared by the data path, the log-prob code and the engine.

A *packed* micro-batch is one row of concatenated sequences with no padding. Sequences are
ordered chosen_0, rejected_0, chosen_1, rejected_1, ... so that for a packed micro-batch of
P pairs, per-sequence results ``x`` split as ``x[0::2]`` (chosen) and ``x[1::2]`` (rejected).

For supervised fine-tuning (``collate_packed(..., chosen_only=True)``) a row holds only the
chosen sequences, chosen_0, chosen_1, ..., so ``S = num_pairs``.

A *padded* micro-batch (one sequence per row, right padding) exists only for the parity
tests and for comparing against padded trainers; the engine always trains packed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

IGNORE_INDEX = -100
"""Label value of tokens that are not scored (prompt tokens, padding)."""


@dataclass
class PackedBatch:
    """One packed row: ``S = 2 * num_pairs`` sequences (``num_pairs`` for SFT) concatenated into ``T`` tokens."""

    input_ids: torch.Tensor
    """[1, T] int64 token ids of all sequences back to back."""
    position_ids: torch.Tensor
    """[1, T] int64 positions, restarting at 0 at the start of every sequence."""
    labels: torch.Tensor
    """[1, T] int64: the token id on response tokens, IGNORE_INDEX elsewhere (not shifted)."""
    cu_seqlens: torch.Tensor
    """[S + 1] int32 cumulative sequence lengths (0, len_0, len_0 + len_1, ..., T)."""
    seq_index: torch.Tensor
    """[T] int64: index of the sequence each token belongs to (for per-sequence sums)."""
    example_ids: torch.Tensor
    """[P] int64 example id of each pair (its 0-based record position in its input file)."""
    scored_positions: torch.Tensor
    """[N] int64, ascending: the positions t whose hidden state scores a response token
    (``scored_positions_of``). Only they go through the LM head: a prompt position costs no
    vocabulary projection, and N is a shape known on the host (no device sync to learn it)."""
    max_seqlen: int
    """Longest sequence in the row; a host int so attention kernels need no device sync."""
    cu_seqlens_host: tuple[int, ...]
    """``cu_seqlens`` as host ints: attention that runs one sequence at a time (the SDPA backend)
    reads its boundaries here, not from the device (which would be a sync in every layer)."""

    @property
    def num_pairs(self) -> int:
        return self.example_ids.numel()

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    def scored_token_counts(self) -> torch.Tensor:
        """[S] int64: response tokens scored per sequence (one per ``scored_positions`` entry)."""
        sequence = self.seq_index.index_select(0, self.scored_positions)
        return sequence.new_zeros(self.num_sequences).index_add(0, sequence, torch.ones_like(sequence))

    @property
    def num_tokens(self) -> int:
        """Real tokens in the row (there is no padding in a packed row)."""
        return self.input_ids.shape[1]

    def to(self, device: torch.device | str) -> PackedBatch:
        return _move(self, device)

    def split(self) -> tuple[list[torch.Tensor], dict]:
        """(tensor fields in ``PACKED_TENSOR_FIELDS`` order, host fields by name); ``join`` rebuilds it.

        A DeepSpeed engine's forward takes the two apart: ZeRO-3 finds the tensors among a module's
        positional inputs to hook its backward, and cannot look inside a dataclass.
        """
        host = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in PACKED_TENSOR_FIELDS}
        return [getattr(self, name) for name in PACKED_TENSOR_FIELDS], host

    @classmethod
    def join(cls, tensors, host: dict) -> PackedBatch:
        """The batch ``split`` took apart."""
        return cls(**dict(zip(PACKED_TENSOR_FIELDS, tensors, strict=True)), **host)


PACKED_TENSOR_FIELDS = ("input_ids", "position_ids", "labels", "cu_seqlens", "seq_index", "example_ids", "scored_positions")
"""The tensor fields of ``PackedBatch`` (the rest are host values), in ``split``'s order."""


def scored_positions_of(labels: torch.Tensor, seq_index: torch.Tensor) -> torch.Tensor:
    """``PackedBatch.scored_positions`` of a row from its [1, T] labels and [T] seq_index (host
    tensors, at collate time). Position t scores token t + 1 when ``labels[t + 1]`` is scored and
    both are in one sequence, so nothing is scored across a sequence boundary even if a collate
    function marked a sequence's first token as a response token."""
    scored = (labels[0, 1:] != IGNORE_INDEX) & (seq_index[1:] == seq_index[:-1])
    return scored.nonzero().flatten()


@dataclass
class PaddedBatch:
    """One sequence per row, right-padded; the same sequence order as ``PackedBatch``."""

    input_ids: torch.Tensor
    """[S, L] int64, padded with the tokenizer's pad id."""
    attention_mask: torch.Tensor
    """[S, L] int64, 1 on real tokens."""
    labels: torch.Tensor
    """[S, L] int64: the token id on response tokens, IGNORE_INDEX elsewhere."""
    example_ids: torch.Tensor
    """[P] int64 example id of each pair."""

    @property
    def num_pairs(self) -> int:
        return self.example_ids.numel()

    def to(self, device: torch.device | str) -> PaddedBatch:
        return _move(self, device)


def _move(batch, device):
    # Only a copy from pinned host memory is asynchronous on CUDA; from pageable memory the driver
    # stages it while the host waits, so the next micro-batch could not be queued meanwhile.
    pin = torch.device(device).type == "cuda"

    def move(value):
        if not isinstance(value, torch.Tensor):
            return value
        if pin and value.device.type == "cpu":
            value = value.pin_memory()
        return value.to(device, non_blocking=True)

    return type(batch)(**{f.name: move(getattr(batch, f.name)) for f in fields(batch)})
