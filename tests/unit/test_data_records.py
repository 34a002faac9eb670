"""Reading and validating preference files: every reason, its location, and the on_invalid policy."""

import json
import logging
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_dist.data import DataError, data_fingerprint, load_preferences, read_preferences

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
MIXED_JSONL = FIXTURES / "mixed.jsonl"

MIXED_JSONL_PROBLEMS = [
    (4, "invalid JSON: Expecting value at column 32"),
    (5, "record is not a JSON object"),
    (6, "missing key 'chosen'"),
    (8, "'chosen' is null"),
    (9, "'prompt' must be a string or a list of messages, got int"),
    (10, "'rejected' is empty"),
    (11, "chosen and rejected are identical"),
    (12, "'prompt' message 1 has no 'role'"),
    (13, "'prompt' message 0 has no 'content'"),
    (14, "'chosen' message 0 is not an object"),
    (15, "'prompt' message 0 'role' must be a string, got int"),
    (17, "'prompt' is empty"),
    (18, "chosen and rejected are identical"),
]
# (example_id, line) of the good records: blank lines 2 and 7 shift lines but not example ids.
MIXED_JSONL_GOOD = [(0, 1), (1, 3), (13, 16), (16, 19)]

RECORDS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "p", "chosen": "c"},
    {"prompt": "Hi", "chosen": "Hello.", "rejected": "Bye."},
]
# Columnar formats: one type per column, so every prompt is a messages list here.
COLUMNAR_ROWS = [
    {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": "4", "rejected": "5"},
    {"prompt": [{"role": "user", "content": "p"}], "chosen": "c", "rejected": None},
    {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello.", "rejected": "Bye."},
    {"prompt": [{"role": "user", "content": "p"}], "chosen": "same", "rejected": "same"},
]
COLUMNAR_PROBLEMS = [(1, "'rejected' is null"), (3, "chosen and rejected are identical")]


def test_jsonl_every_reason_at_its_physical_line():
    result = read_preferences(MIXED_JSONL)
    assert [(p.line, p.reason) for p in result.problems] == MIXED_JSONL_PROBLEMS
    assert str(result.problems[0]) == f"{MIXED_JSONL}:4: invalid JSON: Expecting value at column 32"
    assert [(r.example_id, r.line) for r in result.records] == MIXED_JSONL_GOOD
    assert result.num_records == 17


def test_good_records_keep_their_values_and_normalised_messages():
    records = read_preferences(MIXED_JSONL).records
    assert (records[0].prompt, records[0].chosen, records[0].rejected) == ("What is 2+2?", "4", "5")
    assert records[1].prompt == [{"role": "user", "content": "Capital of France?"}]
    assert records[1].chosen == [{"role": "assistant", "content": "Paris."}]
    assert records[1].is_chat and not records[0].is_chat
    assert records[3].chosen == "Blue."  # extra keys ignored


def test_problem_path_is_the_path_as_given(tmp_path, monkeypatch):
    (tmp_path / "d.jsonl").write_text('{"prompt": "p"}\n')
    monkeypatch.chdir(tmp_path)
    assert [str(p) for p in read_preferences("d.jsonl").problems] == ["d.jsonl:1: missing key 'chosen'"]


def test_invalid_utf8_line_is_reported_and_the_rest_still_read(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a", "rejected": "b"}\r\n'
    )
    result = read_preferences(path)
    assert [(p.line, p.reason) for p in result.problems] == [(1, "invalid UTF-8 text")]
    assert [(r.example_id, r.line, r.rejected) for r in result.records] == [(1, 2, "b")]


def test_skip_keeps_every_good_record_and_logs_the_count(caplog):
    with caplog.at_level(logging.WARNING, logger="dpo_dist.data"):
        records = load_preferences(MIXED_JSONL, on_invalid="skip")
    assert [(r.example_id, r.line) for r in records] == MIXED_JSONL_GOOD
    assert f"{MIXED_JSONL}: dropped 13 invalid records (data.on_invalid=skip)" in caplog.messages
    assert f"  {MIXED_JSONL}:4: invalid JSON: Expecting value at column 32" in caplog.messages
    assert any("... and 3 more" in m for m in caplog.messages)


def test_error_raises_one_line_message():
    with pytest.raises(DataError) as info:
        load_preferences(MIXED_JSONL)
    assert str(info.value) == (
        f"{MIXED_JSONL}: 13 invalid records (first: {MIXED_JSONL}:4: invalid JSON: Expecting value "
        "at column 32); fix them or set data.on_invalid=skip "
        f"(run `dpo-data check {MIXED_JSONL}` to list all)"
    )
    assert "\n" not in str(info.value)


def test_error_policy_passes_a_clean_file():
    records = load_preferences(FIXTURES / "valid.jsonl")
    assert [r.example_id for r in records] == [0, 1, 2]


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="on_invalid must be one of"):
        load_preferences(MIXED_JSONL, on_invalid="ignore")


def test_file_with_no_valid_record_raises_even_under_skip(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    assert read_preferences(path).num_records == 0
    with pytest.raises(DataError, match="no valid records"):
        load_preferences(path, on_invalid="skip")


def test_json_uses_record_index_as_location():
    result = read_preferences(FIXTURES / "mixed.json")
    assert [str(p) for p in result.problems] == [
        f"{FIXTURES / 'mixed.json'}:1: missing key 'rejected'",
        f"{FIXTURES / 'mixed.json'}:2: record is not a JSON object",
        f"{FIXTURES / 'mixed.json'}:4: 'chosen' is empty",
    ]
    assert [(r.example_id, r.line) for r in result.records] == [(0, 0), (3, 3)]


@pytest.mark.parametrize(
    "text, message",
    [
        ('[{"prompt": "p",', "bad.json:1: invalid JSON: Expecting property name enclosed in double quotes"),
        ('{"prompt": "p"}', "bad.json: a .json file must hold a list of records, got object"),
    ],
)
def test_unreadable_json_file_is_a_data_error(tmp_path, monkeypatch, text, message):
    (tmp_path / "bad.json").write_text(text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="^" + message.replace(".", r"\.")):
        read_preferences("bad.json")


def test_parquet_records_and_problems(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(COLUMNAR_ROWS), path)
    result = read_preferences(path)
    assert [(p.line, p.reason) for p in result.problems] == COLUMNAR_PROBLEMS
    assert [(r.example_id, r.line) for r in result.records] == [(0, 0), (2, 2)]
    assert result.records[1].prompt == [{"role": "user", "content": "Hi"}]


def test_datasets_directory(tmp_path):
    datasets.Dataset.from_list(COLUMNAR_ROWS).save_to_disk(tmp_path / "ds")
    result = read_preferences(tmp_path / "ds")
    assert [(p.line, p.reason) for p in result.problems] == COLUMNAR_PROBLEMS
    assert [(r.example_id, r.prompt, r.chosen) for r in result.records] == [
        (0, [{"role": "user", "content": "What is 2+2?"}], "4"),
        (2, [{"role": "user", "content": "Hi"}], "Hello."),
    ]


def test_dataset_dict_needs_exactly_one_split(tmp_path):
    good = datasets.Dataset.from_list([RECORDS[0]])
    datasets.DatasetDict({"train": good}).save_to_disk(tmp_path / "one")
    assert len(read_preferences(tmp_path / "one").records) == 1
    datasets.DatasetDict({"train": good, "test": good}).save_to_disk(tmp_path / "two")
    with pytest.raises(DataError, match=r"splits \['train', 'test'\]; point at one split's directory"):
        read_preferences(tmp_path / "two")


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing.jsonl", "missing.jsonl: no such file or directory"),
        ("data.csv", "data.csv: unsupported format '.csv'"),
        ("plain_dir", "plain_dir: a directory must be a dataset saved with save_to_disk"),
    ],
)
def test_unusable_paths_raise_one_clear_line(tmp_path, monkeypatch, name, message):
    (tmp_path / "data.csv").write_text("prompt,chosen,rejected\n")
    (tmp_path / "plain_dir").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        read_preferences(name)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_fixing_a_bad_record_keeps_ids_but_changes_the_data_fingerprint(tmp_path):
    """As the module docstring says: good records keep their example ids, yet any edit changes
    the fingerprint, so reference log-prob shards built before the fix are refused."""
    path = tmp_path / "d.jsonl"
    bad = {"prompt": "p", "chosen": "a"}
    path.write_text("".join(json.dumps(r) + "\n" for r in [RECORDS[0], bad, RECORDS[2]]))
    before = data_fingerprint(path), [r.example_id for r in read_preferences(path).records]
    path.write_text("".join(json.dumps(r) + "\n" for r in [RECORDS[0], {**bad, "rejected": "b"}, RECORDS[2]]))
    after = data_fingerprint(path), [r.example_id for r in read_preferences(path).records]
    assert before[1] == [0, 2] and after[1] == [0, 1, 2]
    assert before[0] != after[0]
    from dpo_dist.data import records

    assert "keeps reference log-prob shards valid" not in records.__doc__


def test_data_fingerprint_tracks_content(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n")
    first = data_fingerprint(path)
    assert first == data_fingerprint(path) and len(first) == 64
    path.write_text(json.dumps(RECORDS[2]) + "\n")
    assert data_fingerprint(path) != first
    datasets.Dataset.from_list([RECORDS[0]]).save_to_disk(tmp_path / "ds")
    assert data_fingerprint(tmp_path / "ds") == data_fingerprint(tmp_path / "ds")
    with pytest.raises(DataError, match="no such file"):
        data_fingerprint(tmp_path / "nope.jsonl")


# ---- implicit prompts (TRL's maybe_extract_prompt) -----------------------------------------------

USER = {"role": "user", "content": "What is 2+2?"}
SYSTEM = {"role": "system", "content": "Be brief."}


def said(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    "raw, expected",
    [
        # Anthropic HH: the text both share, less the space before the responses (as TRL).
        (
            {"chosen": "\n\nHuman: 2+2?\n\nAssistant: Four.", "rejected": "\n\nHuman: 2+2?\n\nAssistant: No idea."},
            ("\n\nHuman: 2+2?\n\nAssistant:", " Four.", " No idea."),
        ),
        # Shared characters past a word boundary stay in the prompt, as TRL splits them.
        ({"chosen": "Q: hi A: Sure thing", "rejected": "Q: hi A: Surely not"}, ("Q: hi A: Sure", " thing", "ly not")),
        # Conversations: their common leading messages, a multi-turn prompt included.
        ({"chosen": [USER, said("4")], "rejected": [USER, said("5")]}, ([USER], [said("4")], [said("5")])),
        (
            {"chosen": [SYSTEM, USER, said("4"), USER, said("Still 4")], "rejected": [SYSTEM, USER, said("4"), USER, said("5")]},
            ([SYSTEM, USER, said("4"), USER], [said("Still 4")], [said("5")]),
        ),
        # UltraFeedback binarized: a prompt string that the conversations hold again.
        ({"prompt": "What is 2+2?", "chosen": [USER, said("4")], "rejected": [USER, said("5")]}, ([USER], [said("4")], [said("5")])),
        # A messages prompt both conversations begin with is taken out of them.
        ({"prompt": [USER], "chosen": [USER, said("4")], "rejected": [USER, said("5")]}, ([USER], [said("4")], [said("5")])),
        # Explicit prompts the responses do not repeat are kept as they are.
        ({"prompt": "What is 2+2?", "chosen": [said("4")], "rejected": [said("5")]}, ("What is 2+2?", [said("4")], [said("5")])),
        ({"prompt": [USER], "chosen": [said("4")], "rejected": [said("5")]}, ([USER], [said("4")], [said("5")])),
        ({"prompt": "Q: hi A:", "chosen": "Q: hi A: x", "rejected": "Q: hi A: y"}, ("Q: hi A:", "Q: hi A: x", "Q: hi A: y")),
    ],
)
def test_an_implicit_prompt_is_taken_out_of_the_responses(tmp_path, raw, expected):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(raw) + "\n")
    (got,) = load_preferences(path)
    assert (got.prompt, got.chosen, got.rejected) == expected


@pytest.mark.parametrize(
    "raw, reason",
    [
        ({"chosen": "Four.", "rejected": "No idea."}, "no 'prompt', and chosen and rejected share no leading text to take the prompt from"),
        ({"chosen": " Four.", "rejected": " No idea."}, "no 'prompt', and chosen and rejected share no leading text to take the prompt from"),
        ({"chosen": [said("4")], "rejected": [said("5")]}, "no 'prompt', and chosen and rejected share no leading messages to take the prompt from"),
        ({"chosen": "Q? A", "rejected": "Q? AB"}, "no 'prompt': chosen has nothing after the prompt it shares with the other response"),
        ({"chosen": [USER, said("4")], "rejected": [USER]}, "no 'prompt': rejected has nothing after the prompt it shares with the other response"),
        ({"chosen": "Q? A", "rejected": "Q? A"}, "chosen and rejected are identical"),
        ({"chosen": [USER, said("4")], "rejected": "Q? A"}, "no 'prompt', and one of chosen and rejected is text, the other messages: nothing shared to take it from"),
        (
            {"prompt": "What is 3+3?", "chosen": [USER, said("4")], "rejected": [USER, said("5")]},
            "'prompt' is text, but chosen and rejected are conversations whose shared start does not hold it: "
            "give the prompt as messages, or leave it out",
        ),
        ({"prompt": None, "chosen": "Q? A", "rejected": "Q? B"}, "'prompt' is null"),
    ],
)
def test_a_record_whose_prompt_cannot_be_found_is_invalid(tmp_path, raw, reason):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(raw) + "\n")
    assert [p.reason for p in read_preferences(path).problems] == [reason]


def test_a_saved_dataset_directory_is_fingerprinted_by_its_content(tmp_path):
    """A saved datasets directory hashes every file's bytes, not only their names: two saves of
    different records (the same file names) must not share reference log-prob shards."""
    datasets.Dataset.from_list([RECORDS[0]]).save_to_disk(tmp_path / "a")
    datasets.Dataset.from_list([RECORDS[2]]).save_to_disk(tmp_path / "b")
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert names == {p.name for p in (tmp_path / "b").iterdir()}
    assert data_fingerprint(tmp_path / "a") != data_fingerprint(tmp_path / "b")


@pytest.mark.parametrize(
    "raw, reason",
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b", "tools": [{"name": "f"}]}, "'tools' needs chat messages: a text record has no chat template to render them"),
        ({"prompt": [USER], "chosen": [said("4")], "rejected": [said("5")], "tools": {"name": "f"}}, "'tools' must be a list of tool definitions (objects) or its JSON string, got object"),
        ({"prompt": [USER], "chosen": [said("4")], "rejected": [said("5")], "tools": "[{"}, "'tools' is a string but not JSON: Expecting property name enclosed in double quotes at column 3"),
        ({"prompt": [USER], "chosen": [{"role": "assistant", "content": None}], "rejected": [said("5")]}, "'chosen' message 0 has no 'content'"),
        ({"prompt": [USER], "chosen": [{"role": "assistant", "content": None, "tool_calls": []}], "rejected": [said("5")]}, "'chosen' message 0 has no 'content'"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "chat_template_kwargs": {"enable_thinking": False}}, "'chat_template_kwargs' needs chat messages: a text record has no chat template to render them"),
        ({"prompt": [USER], "chosen": [said("4")], "rejected": [said("5")], "chat_template_kwargs": [1]}, "'chat_template_kwargs' must be an object or its JSON string, got list"),
        ({"prompt": [USER], "chosen": [said("4")], "rejected": [said("5")], "chat_template_kwargs": "{x"}, "'chat_template_kwargs' is a string but not JSON: Expecting property name enclosed in double quotes at column 2"),
        ({"prompt": [USER], "chosen": [said("4")], "rejected": [said("5")], "chat_template_kwargs": {"tokenize": True, "add_generation_prompt": False}},
         "'chat_template_kwargs' may not set add_generation_prompt, tokenize (an argument of apply_chat_template itself)"),
        # The record's own tools (validated above) and the run's data.chat_template are not a record's to replace.
        ({"prompt": [USER], "chosen": [said("4")], "rejected": [said("5")], "chat_template_kwargs": {"tools": [{"name": "f"}], "chat_template": "{{ x }}"}},
         "'chat_template_kwargs' may not set chat_template, tools (an argument of apply_chat_template itself)"),
    ],
)
def test_tools_and_tool_calls_are_validated(tmp_path, raw, reason):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(raw) + "\n")
    assert [p.reason for p in read_preferences(path).problems] == [reason]


def test_messages_keep_their_keys_but_not_the_nulls_columnar_formats_add(tmp_path):
    """Parquet gives every message every field of the column's struct, None where absent."""
    call = {"role": "assistant", "content": None, "tool_calls": [{"name": "add"}], "reasoning_content": None}
    rows = [{"prompt": [USER], "chosen": [call], "rejected": [{**said("5"), "tool_calls": None, "reasoning_content": "hm"}], "tools": None}]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    (rec,) = load_preferences(path)
    assert rec.chosen == [{"role": "assistant", "content": None, "tool_calls": [{"name": "add"}]}]
    assert rec.rejected == [{**said("5"), "reasoning_content": "hm"}] and rec.tools is None


def test_chat_template_kwargs_are_read_as_trl_passes_them(tmp_path):
    """An object, or its JSON string (datasets columns); Parquet's None-filled struct fields are not
    variables; an empty object is none."""
    rows = [
        {"prompt": [USER], "chosen": [said("4")], "rejected": [said("5")], "chat_template_kwargs": {"enable_thinking": False, "lang": None}},
        {"prompt": [USER], "chosen": [said("4")], "rejected": [said("5")], "chat_template_kwargs": {"enable_thinking": None, "lang": "fr"}},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert [r.chat_template_kwargs for r in load_preferences(tmp_path / "d.parquet")] == [{"enable_thinking": False}, {"lang": "fr"}]
    rows = [{**rows[0], "chat_template_kwargs": json.dumps({"enable_thinking": True})}, {**rows[0], "chat_template_kwargs": {}}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r.chat_template_kwargs for r in load_preferences(tmp_path / "d.jsonl")] == [{"enable_thinking": True}, None]


def test_empty_tools_and_chat_template_kwargs_are_none_even_on_text_records(tmp_path):
    """Columnar files and JSON writers fill a record without them with an empty value: no tools,
    no variables, and no reason to refuse a text record (which has no chat template)."""
    text = {"prompt": "p", "chosen": "a", "rejected": "b"}
    chat = {"prompt": [USER], "chosen": [said("4")], "rejected": [said("5")]}
    rows = [{**row, "tools": empty, "chat_template_kwargs": other} for row in (text, chat) for empty, other in (("", ""), ([], {}), ("", "{}"))]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = read_preferences(tmp_path / "d.jsonl")
    assert not result.problems and len(result.records) == 6
    assert all(r.tools is None and r.chat_template_kwargs is None for r in result.records)


# ---- compressed files and file patterns -------------------------------------------------------------


def test_gzipped_json_lines_and_json_read_as_their_plain_files(tmp_path):
    import gzip

    lines = "".join(json.dumps(r) + "\n" for r in RECORDS)
    (tmp_path / "d.jsonl").write_text(lines)
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "d.json.gz").write_bytes(gzip.compress(json.dumps(RECORDS).encode()))
    plain = read_preferences(tmp_path / "d.jsonl")
    for name in ("d.jsonl.gz", "d.json.gz"):
        got = read_preferences(tmp_path / name)
        assert [(r.example_id, r.prompt, r.chosen) for r in got.records] == [(r.example_id, r.prompt, r.chosen) for r in plain.records]
        assert [p.reason for p in got.problems] == [p.reason for p in plain.problems] == ["missing key 'rejected'"]
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(lines.encode())[:-12])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: cannot read: "):
        read_preferences(tmp_path / "cut.jsonl.gz")


def test_a_glob_pattern_reads_its_files_in_order_as_one_dataset(tmp_path):
    """A Hub snapshot's split (train-0000k-of-0000n.parquet) or JSONL shards: ids count on across
    the files, problems name their own file and line, and the fingerprint covers every file."""
    shards = tmp_path / "data"
    shards.mkdir()
    (shards / "train-00001-of-00002.jsonl").write_text(json.dumps(RECORDS[2]) + "\n" + json.dumps(RECORDS[1]) + "\n")
    (shards / "train-00000-of-00002.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    (shards / "test-00000-of-00001.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    pattern = str(shards / "train-*.jsonl")
    got = read_preferences(pattern)
    assert [(r.example_id, r.line, r.prompt) for r in got.records] == [(0, 1, "What is 2+2?"), (1, 1, "Hi")]
    assert [str(p) for p in got.problems] == [f"{shards / 'train-00001-of-00002.jsonl'}:2: missing key 'rejected'"]
    assert got.path == pattern and got.num_records == 3
    before = data_fingerprint(pattern)
    (shards / "train-00001-of-00002.jsonl").write_text(json.dumps(RECORDS[2]) + "\n")
    assert data_fingerprint(pattern) != before
    with pytest.raises(DataError, match=r"valid-\*.jsonl: no files match this pattern"):
        read_preferences(str(shards / "valid-*.jsonl"))


def test_a_messages_prompt_before_text_responses_drops_the_nulls_of_columnar_formats(tmp_path):
    rows = [{"prompt": [{**USER, "tool_calls": None}], "chosen": "4", "rejected": "5"}]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    (rec,) = load_preferences(path)
    assert rec.prompt == [USER]
