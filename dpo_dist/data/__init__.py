"""Preference data: read and validate records, tokenize, cache, and pack into micro-batches.

``records`` reads JSONL / JSON / Parquet / saved ``datasets`` directories and reports every bad
record as ``PATH:LINE: reason``; ``tokenize`` turns records into prompt/response token ids with
a stated truncation rule; ``subset`` picks the records a run uses (``data.max_samples``,
``data.eval_split``); ``cache`` does that once per (data, tokenizer, settings); ``packing``
groups pairs by token budget and builds the ``batch`` layouts the engine consumes.
"""

from __future__ import annotations

from pathlib import Path

from dpo_dist.data.batch import IGNORE_INDEX, PackedBatch, PaddedBatch
from dpo_dist.data.cache import TokenizedDataset, load_tokenized, tokenizer_fingerprint
from dpo_dist.data.packing import collate_packed, collate_padded, pack_pairs
from dpo_dist.data.records import (
    DataError,
    PreferenceRecord,
    Problem,
    ReadResult,
    data_fingerprint,
    load_preferences,
    read_preferences,
)
from dpo_dist.data.subset import DataSource, Selection
from dpo_dist.data.tokenize import (
    TRUNCATION_MODES,
    TokenizedPair,
    TruncationStats,
    encode_records,
    tokenize_records,
    truncate_pair,
)

__all__ = [
    "IGNORE_INDEX",
    "TRUNCATION_MODES",
    "DataError",
    "DataSource",
    "PackedBatch",
    "PaddedBatch",
    "PreferenceRecord",
    "Problem",
    "ReadResult",
    "Selection",
    "TokenizedDataset",
    "TokenizedPair",
    "TruncationStats",
    "bundled_tokenizer_path",
    "collate_packed",
    "collate_padded",
    "data_fingerprint",
    "encode_records",
    "load_preferences",
    "load_tokenized",
    "pack_pairs",
    "read_preferences",
    "tokenize_records",
    "tokenizer_fingerprint",
    "truncate_pair",
]


def bundled_tokenizer_path() -> str:
    """Absolute path of the tiny character-level tokenizer shipped in ``dpo_dist/assets/tokenizer``."""
    return str(Path(__file__).resolve().parent.parent / "assets" / "tokenizer")
