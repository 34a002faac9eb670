"""Read and validate preference records.

Supported inputs, chosen by suffix (or by being a directory):

- ``.jsonl`` (or ``.jsonl.gz``): one JSON object per line. Blank or whitespace-only lines are
  skipped silently but still count for line numbers.
- ``.json`` (or ``.json.gz``): a top-level JSON list of objects.
- ``.parquet``: one record per row.
- a directory written by ``datasets.Dataset.save_to_disk``. A saved ``DatasetDict`` is accepted
  only when it has exactly one split; with several, point at the split's own directory
  (``PATH/train``), which ``load_from_disk`` reads as a plain ``Dataset``.
- a glob pattern (``data/train-*.parquet``, ``shards/**/*.jsonl``: a Hub snapshot's split, a
  dataset in several files): its files in sorted order, read as one file of their records in
  turn. Locations name each record's own file.

A record has ``prompt``, ``chosen`` and ``rejected``; each is a non-empty string or a non-empty
list of chat messages ``{"role": str, "content": str}``. A message keeps its other keys for the
chat template (``tool_calls``, ``tool_call_id``, ``name``, ``reasoning_content``, ...; ``None``
values are dropped, as Parquet and datasets fill absent struct fields with them); its
``content`` may be null in an assistant turn that makes ``tool_calls``. A chat record may have
``tools``, the tool definitions its template renders (a list of objects, or that list as a JSON
string), as TRL passes a ``tools`` column to ``apply_chat_template``, and ``chat_template_kwargs``,
an object of further template variables (``{"enable_thinking": false}`` for Qwen3), as TRL passes
that column too. Other record keys are ignored.

Other key names (OpenRLHF's ``--prompt_key``/``--chosen_key``/``--rejected_key``, the config's
``data.prompt_key``...): ``columns``, the keys that hold the prompt, chosen and rejected fields
(default ``FIELDS``), are read as those fields, and reasons name them as the file spells them.

Implicit prompts (TRL's ``maybe_extract_prompt``, for datasets such as Anthropic HH and
UltraFeedback binarized): without a ``prompt`` key, the prompt is what ``chosen`` and ``rejected``
share at their start: their common leading messages, or for text their common leading
characters, less a space that ends them (``"...Assistant:"``, responses ``" Sure..."``). Where a
``prompt`` string is given but both responses are conversations that begin with a non-assistant
message (UltraFeedback binarized: ``prompt`` is the user's text, ``chosen`` is ``[user,
assistant]``), the conversations carry the prompt and it is taken from them, provided the given
string is one of its messages (else the record is refused, not silently re-read); a ``prompt``
messages list that both conversations begin with is taken out of them. Rendering the prompt
twice, in front of a conversation that holds it again, would train on a duplicated turn.

Locations. Every bad record becomes a ``Problem`` printed as ``PATH:LINE: reason``. For JSONL,
LINE is the 1-based physical line number. For JSON, Parquet and datasets directories there are
no meaningful lines, so LINE is the record's 0-based index in the file (the same number as its
``example_id``). Message positions in reasons (``'prompt' message 2 ...``) are 0-based list
indices, as in ``messages[2]``.

Example ids. ``example_id`` is the record's 0-based position among the file's records, counting
bad records too: for JSONL, the position among non-blank lines, so in a file without blank lines
the record on line N has example_id N - 1. Dropping bad records never shifts the ids of good
ones. Reference log-prob shards do not survive an edit, though: their data fingerprint hashes
the whole file (``data_fingerprint``), so fixing or filtering it invalidates them.

Whole-file failures (missing path, unsupported suffix, a JSON file that does not parse or is not
a list, an unreadable Parquet file or saved dataset, an OS error while reading) raise
``DataError``: there are no records to report on.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_dist.data.subset import ALL_RECORDS, Selection

logger = logging.getLogger("dpo_dist.data")

FIELDS = ("prompt", "chosen", "rejected")
ON_INVALID = ("error", "skip")

Messages = list[dict[str, Any]]
Text = str | Messages
"""A prompt or response: plain text, or chat messages (``role``, ``content`` and any other keys)."""

_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
LOGGED_PROBLEMS = 10
"""How many problems are logged one by one (under either on_invalid) before only the count is."""


class DataError(Exception):
    """A data problem the user must fix; its message is one line, fit for a CLI error."""


@dataclass(frozen=True)
class Problem:
    """One bad record: where it is and the first reason it was rejected."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class PreferenceRecord:
    """A valid record. Chat messages are normalised to ``{"role", "content"}`` dicts."""

    example_id: int
    line: int
    prompt: Text
    chosen: Text
    rejected: Text
    tools: list[dict[str, Any]] | None = None
    """Tool definitions for the chat template (``apply_chat_template(tools=...)``), or None."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Further variables for the chat template (``apply_chat_template(**chat_template_kwargs)``), or None."""

    @property
    def is_chat(self) -> bool:
        """True when any field is a messages list; the whole record is then rendered as chat."""
        return is_chat(vars(self))


def is_chat(fields: Mapping[str, Any]) -> bool:
    """True when any of a record's ``prompt`` / ``chosen`` / ``rejected`` is a messages list: the
    whole record is then rendered as chat (a raw row too, e.g. of a prompt file)."""
    return any(isinstance(fields.get(name), list) for name in FIELDS)


class FieldError(ValueError):
    """A record field that is not valid; the message is the reason (one line)."""


def _chat_extra(raw: Mapping[str, Any], key: str, kind: type, expected: str) -> Any:
    """``raw[key]``, decoded when given as a JSON string (Parquet and datasets columns often hold
    nested data so), None when absent or empty. ``FieldError`` when it is not a ``kind`` (described
    by ``expected``) or comes with a text record, which has no chat template to render it."""
    value = raw.get(key)
    if value is None or (isinstance(value, (str, list, dict)) and not value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise FieldError(f"'{key}' is a string but not JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(value, kind):
        raise FieldError(f"'{key}' must be {expected} or its JSON string, got {_type_name(value)}")
    if not value:  # "[]", "{}": empty as a JSON string too, so nothing for a text record to refuse
        return None
    if not is_chat(raw):
        raise FieldError(f"'{key}' needs chat messages: a text record has no chat template to render them")
    return value


def tools_of(raw: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """A raw record's ``tools`` as a list of tool definitions, or None without any."""
    tools = _chat_extra(raw, "tools", list, "a list of tool definitions (objects)")
    if tools and not all(isinstance(tool, dict) for tool in tools):
        raise FieldError(f"'tools' must be a list of tool definitions (objects) or its JSON string, got {_type_name(tools)}")
    return tools


RESERVED_TEMPLATE_ARGS = frozenset(
    {"conversation", "messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize",
     "return_dict", "return_tensors", "padding", "truncation", "max_length", "chat_template", "tokenizer_kwargs"}
)
"""``apply_chat_template``'s own arguments: a record's ``chat_template_kwargs`` may not set them
(training decides how prompt and responses are rendered)."""


def template_kwargs_of(raw: Mapping[str, Any]) -> dict[str, Any] | None:
    """A raw record's ``chat_template_kwargs`` (template variables), or None without any."""
    kwargs = _chat_extra(raw, "chat_template_kwargs", dict, "an object")
    # Parquet and datasets fill a struct's absent fields with None: those variables are not set.
    kwargs = {key: value for key, value in (kwargs or {}).items() if value is not None}
    reserved = sorted(RESERVED_TEMPLATE_ARGS & kwargs.keys())
    if reserved:
        raise FieldError(f"'chat_template_kwargs' may not set {', '.join(reserved)} (an argument of apply_chat_template itself)")
    return kwargs or None


@dataclass
class ReadResult:
    """Everything read from one file: the good records and one problem per bad record."""

    path: str
    records: list[PreferenceRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def num_records(self) -> int:
        return len(self.records) + len(self.problems)


def read_preferences(path: str | os.PathLike, columns: Sequence[str] = FIELDS, limit: int | None = None) -> ReadResult:
    """Read every record of ``path``, keeping the good ones and a ``Problem`` per bad one;
    ``columns``: the keys of the prompt, chosen and rejected fields (module docstring);
    ``limit``: stop after that many records, valid or not (``data.max_samples``)."""
    shown = os.fspath(path)
    result = ReadResult(path=shown)
    offset = 0  # example ids count on across the files of a pattern
    for file in data_files(path):
        where = shown if file == Path(shown) else os.fspath(file)
        seen = 0
        try:
            for example_id, line, raw in _iter_raw(file, where):
                if limit is not None and offset + example_id >= limit:
                    break
                seen = example_id + 1
                parsed = raw if isinstance(raw, _Unreadable) else parse_record(raw, columns)
                if isinstance(parsed, str):
                    result.problems.append(Problem(where, line, str(parsed)))
                else:
                    result.records.append(PreferenceRecord(offset + example_id, line, *parsed))
        except (OSError, EOFError) as e:  # permissions, I/O errors, special files, a cut .gz: any reader, any time
            raise _cannot_read(where, e) from None
        offset += seen
        if limit is not None and offset >= limit:
            break
    return result


def data_files(path: str | os.PathLike) -> list[Path]:
    """The file (or saved dataset directory) ``path`` names, or the sorted matches of a glob
    pattern (``*``, ``?``, ``[``; ``**`` recursive) when no file has that very name."""
    shown, literal = os.fspath(path), Path(path).expanduser()
    if literal.exists() or not any(c in shown for c in "*?["):
        return [literal]
    matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(shown), recursive=True))
    files = [p for p in matches if p.is_file()]
    if not files:
        raise DataError(f"{shown}: no files match this pattern")
    return files


def load_preferences(
    path: str | os.PathLike,
    on_invalid: str = "error",
    log: logging.Logger | None = None,
    columns: Sequence[str] = FIELDS,
    selection: Selection = ALL_RECORDS,
) -> list[PreferenceRecord]:
    """Read ``path`` (``read_preferences``), apply the ``data.on_invalid`` policy and keep the
    records of ``selection`` (``data.max_samples``, a side of ``data.eval_split``: ``subset``).

    ``error`` raises ``DataError`` if any record is bad; ``skip`` logs what was dropped and
    returns the good records. A file with no good record at all raises either way.
    """
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
    log = log or logger
    result = read_preferences(path, columns, selection.max_samples or None)
    check_invalid(log, result.path, result.problems, on_invalid, columns=columns)
    result, note = selection.apply(result)
    if note:
        log.info("%s: %s", result.path, note)
    if result.problems:
        log_dropped(log, result.path, result.problems)
    if not result.records:
        raise DataError(f"{selection.label(result.path)}: no valid records")
    return result.records


def check_invalid(
    log: logging.Logger, path: str, problems: list[Problem], on_invalid: str, total: int | None = None, tokenizer: str | None = None,
    columns: Sequence[str] = FIELDS,
) -> None:
    """Under ``on_invalid=error``, log the first ``LOGGED_PROBLEMS`` problems as ``PATH:LINE:
    reason`` lines and raise the standard ``DataError`` (``total`` if more exist than listed).
    ``tokenizer``: the run's tokenizer directory, for the ``dpo-data check`` hint when it is not
    the bundled one (check's default), which could find other problems; ``columns``, the record
    keys read, go into the hint too.

    The error is one line, so it names only the first problem; the log lines let a user fix
    several at once without a round trip through ``dpo-data check``."""
    total = len(problems) if total is None else total
    if not total or on_invalid != "error":
        return
    for problem in problems[:LOGGED_PROBLEMS]:
        log.error("%s", problem)
    if total > LOGGED_PROBLEMS:
        log.error("... and %d more invalid records in %s", total - LOGGED_PROBLEMS, path)
    noun = "record" if total == 1 else "records"
    flags = (f" --tokenizer {tokenizer}" if tokenizer else "") + "".join(
        f" --{name}-key {key}" for name, key in zip(FIELDS, columns) if key != name
    )
    raise DataError(
        f"{path}: {total} invalid {noun} (first: {problems[0]}); fix them or set data.on_invalid=skip "
        f"(run `dpo-data check {path}{flags}` to list all)"
    )


def log_dropped(log: logging.Logger, path: str, problems: list[Problem], total: int | None = None) -> None:
    """Log the count of dropped records and the first few problems (``total`` if more exist)."""
    total = len(problems) if total is None else total
    log.warning("%s: dropped %d invalid records (data.on_invalid=skip)", path, total)
    for problem in problems[:LOGGED_PROBLEMS]:
        log.warning("  %s", problem)
    if total > LOGGED_PROBLEMS:
        log.warning("  ... and %d more; run `dpo-data check %s` for all", total - LOGGED_PROBLEMS, path)


def validate_record(raw: Any) -> str | None:
    """The first reason ``raw`` is not a valid record, or None if it is valid."""
    parsed = parse_record(raw)
    return parsed if isinstance(parsed, str) else None


def parse_record(raw: Any, columns: Sequence[str] = FIELDS) -> tuple[Text, Text, Text, list | None, dict | None] | str:
    """A raw record's (prompt, chosen, rejected, tools, chat_template_kwargs), the prompt taken out of the responses where
    they hold it (module docstring: implicit prompts), or the first reason it is not a valid record.
    ``columns``: the keys of those three fields in ``raw``."""
    if not isinstance(raw, dict):
        return "record is not a JSON object"
    if tuple(columns) != FIELDS:  # the fields under the file's own keys, named so in reasons
        renamed = {key: value for key, value in raw.items() if key not in FIELDS}
        renamed.update({name: raw[key] for name, key in zip(FIELDS, columns) if key in raw})
        parsed = parse_record(renamed)
        return _as_spelled(parsed, columns) if isinstance(parsed, str) else parsed
    for name in FIELDS if "prompt" in raw else FIELDS[1:]:
        reason = _validate_field(raw, name)
        if reason:
            return reason
    prompt = _normalise(raw["prompt"]) if "prompt" in raw else None
    split = split_prompt(prompt, _normalise(raw["chosen"]), _normalise(raw["rejected"]))
    if isinstance(split, str):
        return split
    if _as_response(split[1]) == _as_response(split[2]):
        return "chosen and rejected are identical"
    try:
        return (*split, tools_of(raw), template_kwargs_of(raw))
    except FieldError as e:
        return str(e)


def _as_spelled(reason: str, columns: Sequence[str]) -> str:
    """``reason`` naming each field by its key in the file (``'chosen'`` -> ``'response_a'``)."""
    for field_name, column in zip(FIELDS, columns):
        reason = reason.replace(f"'{field_name}'", f"'{column}'")
    return reason


def split_prompt(prompt: Text | None, chosen: Text, rejected: Text) -> tuple[Text, Text, Text] | str:
    """(prompt, chosen, rejected) with an implicit prompt taken out of the responses (module
    docstring), or the reason it cannot be; an explicit prompt the responses do not repeat is kept."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        if isinstance(prompt, list):
            n = len(prompt)
            if chosen[:n] == prompt and rejected[:n] == prompt and len(chosen) > n and len(rejected) > n:
                return prompt, chosen[n:], rejected[n:]
            return prompt, chosen, rejected
        if prompt is not None and chosen[0]["role"] == "assistant":
            return prompt, chosen, rejected  # a text prompt followed by assistant turns
    elif prompt is not None:
        return prompt, chosen, rejected
    elif isinstance(chosen, list) or isinstance(rejected, list):
        return "no 'prompt', and one of chosen and rejected is text, the other messages: nothing shared to take it from"
    if chosen == rejected:
        return "chosen and rejected are identical"
    shared = _shared_prefix(chosen, rejected)
    if isinstance(chosen, str) and shared and chosen[shared - 1] == " ":
        shared -= 1  # TRL's extract_prompt: the space before the responses goes with them
    implicit, chosen_rest, rejected_rest = chosen[:shared], chosen[shared:], rejected[shared:]
    where = "no 'prompt'" if prompt is None else "'prompt' is text, but chosen and rejected are conversations"
    if not implicit or (isinstance(implicit, str) and not implicit.strip()):
        return f"{where}, and chosen and rejected share no leading {'messages' if isinstance(chosen, list) else 'text'} to take the prompt from"
    if not _has_text(chosen_rest) or not _has_text(rejected_rest):
        side = "chosen" if not _has_text(chosen_rest) else "rejected"
        return f"{where}: {side} has nothing after the prompt it shares with the other response"
    if prompt is not None and not any((m.get("content") or "").strip() == prompt.strip() for m in implicit):
        return f"{where} whose shared start does not hold it: give the prompt as messages, or leave it out"
    return implicit, chosen_rest, rejected_rest


def _shared_prefix(a: Text, b: Text) -> int:
    """How many leading characters (text) or messages (lists) ``a`` and ``b`` have in common."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _has_text(value: Text) -> bool:
    return bool(value.strip()) if isinstance(value, str) else any(_says_something(m) for m in value)


def data_fingerprint(path: str | os.PathLike, columns: Sequence[str] = FIELDS, selection: Selection = ALL_RECORDS) -> str:
    """sha256 of the file's bytes, or over every file's relative path and sha256 in a directory;
    records read through other ``columns`` (``data.prompt_key``...) are other data, and so are
    some of its records (``selection``: ``data.max_samples``, a side of ``data.eval_split``), so
    those go into it too (the default keys and every record keep the file's own digest).

    Digests are memoized by path and stat (``dpo_dist.fingerprint``): every rank of every
    run asks at start, and re-reading a big file from shared storage each time is slow."""
    from dpo_dist.fingerprint import file_sha256, files_sha256, json_sha256

    if selection.key():
        return json_sha256({"data": data_fingerprint(path, columns), "records": selection.key()})
    if tuple(columns) != FIELDS:
        return json_sha256({"file": data_fingerprint(path), "columns": list(columns)})

    shown, matched = os.fspath(path), data_files(path)
    path = matched[0]
    try:
        if len(matched) > 1 or path != Path(shown).expanduser():  # a pattern: its files in order
            root = Path(os.path.commonpath([p.parent for p in matched]))
            return json_sha256([[f.relative_to(root).as_posix(), d] for f, d in zip(matched, files_sha256(matched))])
        if not path.exists():
            raise DataError(f"{shown}: no such file or directory")
        if not path.is_dir():
            return file_sha256(path)
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return json_sha256({f.relative_to(path).as_posix(): d for f, d in zip(files, files_sha256(files))})
    except OSError as e:
        raise _cannot_read(shown, e) from None


def _cannot_read(shown: str, err: OSError) -> DataError:
    """The one-line ``DataError`` for an OS error while reading ``shown``."""
    return DataError(f"{shown}: cannot read: {getattr(err, 'strerror', None) or _one_line(err)}")


class _Unreadable(str):
    """A reason for a line that could not even be parsed (yielded in place of a record)."""


def _iter_raw(path: Path, shown: str) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(example_id, line, raw_record_or_Unreadable)`` for every record of the file."""
    if not path.exists():
        raise DataError(f"{shown}: no such file or directory")
    if path.is_dir():
        return _enumerate_by_index(_read_dataset_dir(path, shown))
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    if suffix in (".jsonl", ".jsonl.gz"):
        return _read_jsonl(path)
    if suffix in (".json", ".json.gz"):
        return _enumerate_by_index(_read_json(path, shown))
    if suffix == ".parquet":
        return _enumerate_by_index(_read_parquet(path, shown))
    raise DataError(
        f"{shown}: unsupported format {suffix or '(no suffix)'!r}; expected one of "
        f"{', '.join(_SUFFIXES)} or a saved datasets directory"
    )


def _enumerate_by_index(rows: Iterable[Any]) -> Iterator[tuple[int, int, Any]]:
    # Formats without lines use the record index as the location (see module docstring).
    for index, row in enumerate(rows):
        yield index, index, row


def _open_bytes(path: Path):
    """``path`` opened for reading bytes, decompressed on the fly when it ends in ``.gz``."""
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _read_jsonl(path: Path) -> Iterator[tuple[int, int, Any]]:
    example_id = 0
    with _open_bytes(path) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            yield example_id, line_number, _parse_json_line(line)
            example_id += 1


def _parse_json_line(line: bytes) -> Any:
    try:
        # Without the newline, an error at the end of the line gets this line's column, not 1.
        text = line.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:
        return _Unreadable("invalid UTF-8 text")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return _Unreadable(f"invalid JSON: {e.msg} at column {e.colno}")


def _read_json(path: Path, shown: str) -> list[Any]:
    try:
        with _open_bytes(path) as f:
            data = json.loads(f.read().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{shown}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        # datasets' to_json writes JSON Lines: one object, then "Extra data" where the next begins.
        hint = "; one record per line is JSON Lines: name the file .jsonl" if e.msg == "Extra data" else ""
        raise DataError(f"{shown}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}{hint}") from None
    if not isinstance(data, list):
        raise DataError(f"{shown}: a .json file must hold a list of records, got {_type_name(data)}")
    return data


def _read_parquet(path: Path, shown: str) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    # pyarrow raises several types for corrupt or non-Parquet files, also only when a damaged
    # page is decoded, and its messages can span lines.
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{shown}: cannot read Parquet file: {_one_line(e)}") from None
    # to_pylist: decoding a damaged string fails there.
    batches = (batch.to_pylist() for batch in parquet.iter_batches())
    for rows in _read_failing_as(batches, f"{shown}: cannot read Parquet file"):
        yield from rows


_END = object()


def _read_failing_as(items: Iterator[Any], what: str) -> Iterator[Any]:
    """``items``, with any error while reading one (a damaged file fails only when read, with any
    type and messages over several lines) raised as the one-line ``DataError`` "what: reason"."""
    while True:
        try:
            item = next(items, _END)
        except Exception as e:
            raise DataError(f"{what}: {_one_line(e)}") from None
        if item is _END:
            return
        yield item


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _read_dataset_dir(path: Path, shown: str) -> Iterator[dict[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{shown}: a directory must be a dataset saved with save_to_disk") from None
    except Exception as e:  # a damaged save fails in json, pyarrow or datasets, with any type
        raise DataError(f"{shown}: cannot load saved dataset: {_one_line(e)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if len(splits) != 1:
            raise DataError(
                f"{shown}: a DatasetDict with splits {splits}; point at one split's directory, "
                f"e.g. {os.path.join(shown, splits[0]) if splits else shown}"
            )
        loaded = loaded[splits[0]]
    return _read_failing_as(iter(loaded), f"{shown}: cannot read saved dataset")


def _validate_field(raw: dict[str, Any], name: str) -> str | None:
    if name not in raw:
        return f"missing key {name!r}"
    value = raw[name]
    if value is None:
        return f"{name!r} is null"
    if isinstance(value, str):
        return f"{name!r} is empty" if not value.strip() else None
    if isinstance(value, list):
        return _validate_messages(name, value)
    return f"{name!r} must be a string or a list of messages, got {_type_name(value)}"


def _validate_messages(name: str, messages: list[Any]) -> str | None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"{name!r} message {i} is not an object"
        for key in ("role", "content"):
            if message.get(key) is None and not (key == "content" and message.get("tool_calls")):
                return f"{name!r} message {i} has no {key!r}"
            if message.get(key) is not None and not isinstance(message[key], str):
                return f"{name!r} message {i} {key!r} must be a string, got {_type_name(message[key])}"
    if not any(_says_something(message) for message in messages):
        return f"{name!r} is empty"
    return None


def _says_something(message: Mapping[str, Any]) -> bool:
    """A message with text, or an assistant turn that calls tools."""
    return bool((message.get("content") or "").strip() or message.get("tool_calls"))


def _as_response(value: Text) -> Messages:
    """A response in messages form, so "x" and [{"role": "assistant", "content": "x"}] compare equal."""
    return [{"role": "assistant", "content": value}] if isinstance(value, str) else value


def _normalise(value: Text) -> Text:
    """Messages with every key the template may read; Parquet and datasets fill absent struct
    fields with None, dropped here (``content`` stays: templates index it)."""
    if isinstance(value, str):
        return value
    return [{k: v for k, v in m.items() if v is not None or k == "content"} for m in value]


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", type(None): "null"}.get(type(value), type(value).__name__)
