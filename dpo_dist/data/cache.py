"""Tokenize a preference file once and cache the result as Arrow IPC.

Cache layout in ``cache_dir``: ``<key>.arrow`` (columns ``example_id`` int64 and ``prompt_ids``,
``chosen_ids``, ``rejected_ids`` as ``large_list<int32>``: large lists so a column may exceed
2**31 tokens) and ``<key>.json`` (counts of records, invalid records and truncation, plus the
problems that get logged, so a cache hit reports them as a fresh read would). ``key`` hashes the
data file's bytes and the records of it used (``data_fingerprint``: ``data.max_samples``, a side
of ``data.eval_split``), the tokenizer (``tokenizer_fingerprint``) and the settings that change token
ids (``max_length``, ``truncation``); ``on_invalid`` is not in it, because a cache written under
``skip`` still raises under ``error``. Both files are written to a temporary name and renamed, so
concurrent ranks tokenizing the same file may duplicate work but never read a partial cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from dpo_dist.data.records import (
    FIELDS,
    LOGGED_PROBLEMS,
    ON_INVALID,
    DataError,
    Problem,
    ReadResult,
    check_invalid,
    data_fingerprint,
    log_dropped,
    logger,
    read_preferences,
)
from dpo_dist.data.subset import ALL_RECORDS, Selection
from dpo_dist.data.tokenize import TokenizedPair, TruncationStats, check_truncation, tokenize_records

CACHE_FORMAT = 7
"""Bumped whenever the tokenization rules or the cache layout change, to invalidate old caches
(and reference caches: it is part of their fingerprint). 2: no whitespace after a chat turn's EOS.
3: pairs with identical chosen and rejected ids after truncation are dropped. 4: responses encoded
without a SentencePiece dummy prefix, no appended EOS in prompts, records whose responses encode
identically are invalid. 5: a chat response its template ends with a special end-of-turn token
(Llama 3's <|eot_id|>, Gemma's <end_of_turn>) gets no EOS after it. 6: implicit prompts, taken out
of the responses that hold them (``records.split_prompt``); messages keep all their keys and a
record's ``tools`` reach the chat template; ``keep_start`` drops a pair whose prompt fills
``max_length`` (as TRL). 7: a record's ``chat_template_kwargs`` reach the chat template; an empty ``tools`` or
``chat_template_kwargs`` given as a JSON string (``"[]"``, ``"{}"``) is none, on a text record too."""
_ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
_PROBE = "Hello world 123.\n"
"""Encoded into the tokenizer fingerprint: catches BOS/EOS behaviour that lives outside the vocab."""


class TokenizedDataset:
    """Tokenized pairs of one file, backed by (memory-mapped) Arrow columns."""

    def __init__(
        self,
        table: pa.Table,
        *,
        fingerprint: str,
        num_records: int,
        num_invalid: int,
        truncation: TruncationStats,
        cache_hit: bool = False,
        selected: str | None = None,
    ) -> None:
        self.fingerprint = fingerprint
        """Hash of data, tokenizer and tokenization settings; a key for derived caches."""
        self.num_records = num_records
        """Records in the file (of its selection: ``subset.Selection``), valid or not."""
        self.selected = selected
        """What the selection took of the file (``Selection.apply``'s line), None for every record."""
        self.num_invalid = num_invalid
        self.truncation = truncation
        self.cache_hit = cache_hit
        self.example_ids = table.column("example_id").to_numpy()
        self._columns = {name: _flatten(table.column(name)) for name in _ID_COLUMNS}
        self.table = table
        """The Arrow table the pairs are views into (memory-mapped on a cache hit)."""
        prompt, chosen, rejected = (np.diff(self._columns[name][1]).astype(np.int64) for name in _ID_COLUMNS)
        self._sequence_lengths = np.stack([prompt + chosen, prompt + rejected], axis=1)
        # A response's first token is scored from the prompt's last one, so with an empty prompt
        # it is not (logprobs.sequence_logps).
        self._scored_tokens = np.stack([chosen, rejected], axis=1) - (prompt == 0)[:, None]

    def __len__(self) -> int:
        return len(self.example_ids)

    def __getitem__(self, index: int) -> TokenizedPair:
        ids = []
        for name in _ID_COLUMNS:
            values, offsets = self._columns[name]
            ids.append(values[offsets[index] : offsets[index + 1]])
        return TokenizedPair(self.example_ids[index], *ids)

    def __iter__(self) -> Iterator[TokenizedPair]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> np.ndarray:
        """int64 [pairs]: tokens each pair takes packed (``TokenizedPair.num_tokens``)."""
        return self._sequence_lengths.sum(axis=1)

    def sequence_lengths(self) -> np.ndarray:
        """int64 [pairs, 2]: tokens of the (prompt + chosen, prompt + rejected) sequences."""
        return self._sequence_lengths

    def scored_tokens(self) -> np.ndarray:
        """int64 [pairs, 2]: response tokens scored in (chosen, rejected), as ``sequence_logps`` counts them."""
        return self._scored_tokens


def load_tokenized(
    path: str | os.PathLike,
    tokenizer,
    max_length: int,
    truncation: str = "keep_end_of_prompt",
    on_invalid: str = "error",
    cache_dir: str | os.PathLike | None = None,
    log: logging.Logger | None = None,
    keep_identical: bool = False,
    columns: Sequence[str] = FIELDS,
    selection: Selection = ALL_RECORDS,
) -> TokenizedDataset:
    """Read, validate, tokenize and truncate ``path``, through the cache when ``cache_dir`` is set;
    ``columns``: the keys of its prompt, chosen and rejected fields (``data.records``);
    ``selection``: the records of it used (``data.max_samples``, ``data.eval_split``: ``subset``).

    ``cache_dir=None`` tokenizes in memory and writes nothing. ``keep_identical``: keep pairs whose
    responses are identical after truncation (SFT trains on chosen alone; see ``tokenize``).
    """
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
    check_truncation(max_length, truncation)
    log = log or logger
    shown = os.fspath(path)
    key = _cache_key(path, tokenizer, max_length, truncation, keep_identical, columns, selection)
    files = _cache_files(cache_dir, key)
    cached = _read_cache(files, key, shown, log) if files else None
    if cached:
        dataset, problems = cached
        _apply_on_invalid(shown, dataset.num_invalid, problems, on_invalid, log, tokenizer, columns)
    else:
        result = read_preferences(shown, columns, selection.max_samples or None)
        # Before tokenizing: under on_invalid=error a bad file fails fast. Under skip the drop is
        # logged once below, when the records the chat template cannot render are known too.
        check_invalid(log, shown, result.problems, on_invalid, tokenizer=_hint_tokenizer(tokenizer))
        result, selected = selection.apply(result)
        unrendered: list[Problem] = []  # chat records the template cannot render
        dataset = _tokenize(result, tokenizer, max_length, truncation, key, unrendered, keep_identical, selected)
        problems = sorted(result.problems + unrendered, key=lambda problem: problem.line)
        _apply_on_invalid(shown, len(problems), problems, on_invalid, log, tokenizer, columns)
        if files:
            _write_cache(files, dataset, problems)
    if not dataset.num_records:
        # Not "no pairs left": nothing was invalid or truncated, the file itself is empty.
        raise DataError(f"{shown}: no records")
    if dataset.selected and selection.side != "eval":  # the eval side's line would be the same
        log.info("%s: %s", shown, dataset.selected)
    _log_summary(log, selection.label(shown), dataset, max_length, truncation, files)
    if not len(dataset):
        raise DataError(f"{selection.label(shown)}: no pairs left (all records invalid or dropped by data.truncation)")
    return dataset


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides token ids: the tokenizer pipeline, specials, chat template."""
    state = {
        "special_tokens": {name: str(value) for name, value in tokenizer.special_tokens_map.items()},
        "chat_template": tokenizer.chat_template,
        "probe": tokenizer(_PROBE)["input_ids"],
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Call-time settings that transformers leaves behind on the backend; they are not identity.
        spec.pop("truncation", None)
        spec.pop("padding", None)
        state["backend"] = spec
    else:
        state["vocab"] = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return _sha256(state)


def _cache_key(
    path, tokenizer, max_length: int, truncation: str, keep_identical: bool = False, columns: Sequence[str] = FIELDS,
    selection: Selection = ALL_RECORDS,
) -> str:  # fmt: skip
    return _sha256(
        {
            "format": CACHE_FORMAT,
            "data": data_fingerprint(path, columns, selection),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_length": max_length,
            "truncation": truncation,
            **({"keep_identical": True} if keep_identical else {}),  # preference data keeps its key
        }
    )


def _sha256(state) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _apply_on_invalid(shown: str, num_invalid: int, problems: list[Problem], on_invalid: str, log, tokenizer, columns=FIELDS) -> None:
    if num_invalid:
        check_invalid(log, shown, problems, on_invalid, total=num_invalid, tokenizer=_hint_tokenizer(tokenizer), columns=columns)
        log_dropped(log, shown, problems, total=num_invalid)


def _hint_tokenizer(tokenizer) -> str | None:
    """The tokenizer directory to name in the ``dpo-data check`` hint: None for the bundled one."""
    from dpo_dist.data import bundled_tokenizer_path

    name = str(getattr(tokenizer, "name_or_path", "") or "")
    if not name or os.path.realpath(name) == os.path.realpath(bundled_tokenizer_path()):
        return None
    return name


def _tokenize(
    result: ReadResult,
    tokenizer,
    max_length: int,
    truncation: str,
    key: str,
    unrendered: list[Problem],
    keep_identical: bool = False,
    selected: str | None = None,
) -> TokenizedDataset:
    pairs, stats = tokenize_records(
        result.records, tokenizer, max_length, truncation, source=result.path, problems=unrendered,
        keep_identical=keep_identical,
    )  # fmt: skip
    return TokenizedDataset(
        _to_table(pairs),
        fingerprint=key,
        num_records=result.num_records,
        num_invalid=len(result.problems) + len(unrendered),
        truncation=stats,
        selected=selected,
    )


def _to_table(pairs: list[TokenizedPair]) -> pa.Table:
    columns = {"example_id": pa.array([p.example_id for p in pairs], type=pa.int64())}
    for name in _ID_COLUMNS:
        arrays = [getattr(p, name) for p in pairs]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
        columns[name] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))
    return pa.table(columns)


def _flatten(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column; offsets index into values. A one-chunk column (a
    memory-mapped cache file) is used in place: combine_chunks would copy it onto every rank's heap."""
    array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return array.values.to_numpy(), array.offsets.to_numpy()


def _cache_files(cache_dir, key: str) -> tuple[Path, Path] | None:
    if cache_dir is None:
        return None
    return Path(cache_dir) / f"{key}.arrow", Path(cache_dir) / f"{key}.json"


def _read_cache(files: tuple[Path, Path], key: str, shown: str, log: logging.Logger):
    """(dataset, problems) from the cache, or None on a miss or an unreadable cache."""
    arrow_path, meta_path = files
    if not (arrow_path.exists() and meta_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        table = pa.ipc.open_file(pa.memory_map(str(arrow_path))).read_all()
    except (OSError, ValueError, pa.ArrowException) as e:
        log.warning("tokenization cache %s is unreadable (%s); rebuilding it", arrow_path, e)
        return None
    if table.num_rows != meta["num_pairs"]:
        log.warning("tokenization cache %s is incomplete; rebuilding it", arrow_path)
        return None
    dataset = TokenizedDataset(
        table,
        fingerprint=key,
        num_records=meta["num_records"],
        num_invalid=meta["num_invalid"],
        truncation=TruncationStats(**meta["truncation"]),
        cache_hit=True,
        selected=meta.get("selected"),
    )
    # Located at the path as given now, which may be spelled differently from the first run.
    problems = [Problem(shown, line, reason) for line, reason in meta["problems"]]
    return dataset, problems


def _write_cache(files: tuple[Path, Path], dataset: TokenizedDataset, problems: list[Problem]) -> None:
    arrow_path, meta_path = files
    arrow_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": CACHE_FORMAT,
        "num_pairs": len(dataset),
        "num_records": dataset.num_records,
        "num_invalid": dataset.num_invalid,
        "truncation": vars(dataset.truncation),
        "problems": [[p.line, p.reason] for p in problems[:LOGGED_PROBLEMS]],
        **({"selected": dataset.selected} if dataset.selected else {}),
    }
    _atomic_write(arrow_path, lambda f: _write_arrow(f, dataset.table))
    _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))


def _write_arrow(f, table: pa.Table) -> None:
    with pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _log_summary(log, shown: str, dataset: TokenizedDataset, max_length: int, truncation: str, files) -> None:
    stats = dataset.truncation
    cache = "disabled" if files is None else f"{'hit' if dataset.cache_hit else 'miss'} ({files[0]})"
    log.info(
        "%s: %d records read, %d invalid dropped, %d pairs kept; %d truncated, %d dropped by "
        "truncation, %d dropped as identical after truncation (data.truncation=%s, "
        "data.max_length=%d); tokenization cache %s",
        shown,
        dataset.num_records,
        dataset.num_invalid,
        len(dataset),
        stats.truncated,
        stats.dropped,
        stats.identical,
        truncation,
        max_length,
        cache,
    )
    if stats.dropped:
        log.warning("%s: %d over-long pairs dropped (data.truncation=drop)", shown, stats.dropped)
    if stats.identical:
        log.warning(
            "%s: %d pairs dropped: chosen and rejected identical after truncation (data.truncation=%s, "
            "data.max_length=%d)",
            shown,
            stats.identical,
            truncation,
            max_length,
        )
