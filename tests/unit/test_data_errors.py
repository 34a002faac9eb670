"""User errors around data files and caches: one clear line and the documented exit code, never a
traceback, and nothing stale or unreadable left behind."""

import hashlib
import io
import json
import logging
import os
import random
import stat
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from dpo_dist import fingerprint, reference_store
from dpo_dist.data import (
    DataError,
    bundled_tokenizer_path,
    data_fingerprint,
    load_preferences,
    load_tokenized,
    read_preferences,
)
from dpo_dist.generation import GenerationError, read_prompts
from launch.data import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(bundled_tokenizer_path(), local_files_only=True)


def io_error_file(tmp_path: Path, name: str) -> Path:
    """A regular file whose reads fail with EIO, even for root (unlike chmod 000)."""
    path = tmp_path / name
    path.symlink_to("/proc/self/mem")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- unreadable files ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x.jsonl", "x.json"])
def test_an_io_error_while_reading_is_a_one_line_data_error(tmp_path, name):
    path = io_error_file(tmp_path, name)
    with pytest.raises(DataError) as info:
        read_preferences(path)
    assert str(info.value) == f"{path}: cannot read: Input/output error"
    with pytest.raises(DataError, match="cannot read: Input/output error"):
        data_fingerprint(path)


def test_a_permission_error_is_a_one_line_data_error(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(DataError) as info:
        read_preferences(path)
    assert str(info.value) == f"{path}: cannot read: Permission denied"


def test_check_of_an_unreadable_file_exits_2_with_one_line(tmp_path, capsys):
    path = io_error_file(tmp_path, "x.jsonl")
    assert main(["check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no "0 good, 0 bad": the file was not read
    assert err == f"dpo-data: error: {path}: cannot read: Input/output error\n"


def test_training_data_loading_of_an_unreadable_file_is_a_data_error(tmp_path, tok):
    path = io_error_file(tmp_path, "x.jsonl")
    with pytest.raises(DataError, match="^" + str(path) + ": cannot read: Input/output error$"):
        load_tokenized(path, tok, 64)


def test_unreadable_prompts_are_a_generation_error_and_a_usage_error(tmp_path, capsys):
    path = io_error_file(tmp_path, "prompts.jsonl")
    with pytest.raises(GenerationError, match="cannot read: Input/output error"):
        read_prompts(path)
    (tmp_path / "bad.txt").write_bytes(b"\xff\n")
    with pytest.raises(GenerationError, match="not UTF-8 text"):
        read_prompts(tmp_path / "bad.txt")
    args = ["generate", "--model", str(tmp_path), "--prompts", str(path), "--out", str(tmp_path / "o.jsonl")]
    assert main(args) == 2
    assert capsys.readouterr().err == f"dpo-data: error: {path}: cannot read: Input/output error\n"


def test_a_corrupted_saved_dataset_is_a_one_line_data_error(tmp_path, capsys):
    datasets.Dataset.from_list([GOOD]).save_to_disk(tmp_path / "ds")
    (tmp_path / "ds" / "state.json").write_text("{")
    capsys.readouterr()  # save_to_disk's progress bar
    with pytest.raises(DataError) as info:
        read_preferences(tmp_path / "ds")
    assert str(info.value).startswith(f"{tmp_path / 'ds'}: cannot load saved dataset: ")
    assert "\n" not in str(info.value)
    assert main(["check", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpo-data: error: ") and err.count("\n") == 1


# ---- on_invalid=error lists the bad records --------------------------------------------------------


def test_on_invalid_error_logs_every_bad_record_before_raising(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "p"}, GOOD, {**GOOD, "rejected": "a"}])
    with caplog.at_level(logging.ERROR, logger="dpo_dist.data"), pytest.raises(DataError) as info:
        load_preferences(path)
    assert caplog.messages == [
        f"{path}:2: missing key 'chosen'",
        f"{path}:4: chosen and rejected are identical",
    ]
    assert str(info.value).endswith(f"(run `dpo-data check {path}` to list all)")


def test_on_invalid_error_logs_at_most_the_limit_when_tokenizing(tmp_path, tok, caplog):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes((FIXTURES / "mixed.jsonl").read_bytes())
    with caplog.at_level(logging.ERROR, logger="dpo_dist.data"), pytest.raises(DataError, match="13 invalid"):
        load_tokenized(path, tok, 64)
    assert caplog.messages[0] == f"{path}:4: invalid JSON: Expecting value at column 32"
    assert len(caplog.messages) == 10 + 1
    assert caplog.messages[-1] == f"... and 3 more invalid records in {path}"


# ---- empty files ---------------------------------------------------------------------------------


def test_check_of_a_file_without_records_exits_1(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(["check", str(tmp_path / "empty.jsonl"), str(FIXTURES / "valid.jsonl")]) == 1
    assert capsys.readouterr().out == f"{tmp_path / 'empty.jsonl'}: no records\n3 good, 0 bad\n"


def test_training_says_a_file_has_no_records(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError) as info:
        load_tokenized(tmp_path / "empty.jsonl", tok, 64, cache_dir=tmp_path / "cache")
    assert str(info.value) == f"{tmp_path / 'empty.jsonl'}: no records"


# ---- output locations are checked before the work ------------------------------------------------


def test_audit_out_that_is_a_file_is_a_usage_error_before_the_audit(tmp_path, monkeypatch, capsys):
    def no_audit(*args, **kwargs):
        raise AssertionError("audited before checking --out")

    monkeypatch.setattr("dpo_dist.audit.audit", no_audit)
    (tmp_path / "taken.txt").write_text("")
    out = tmp_path / "taken.txt"
    assert main(["audit", str(FIXTURES / "valid.jsonl"), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"dpo-data: error: --out {out}: cannot create directory: ")
    assert captured.err.count("\n") == 1


@pytest.mark.parametrize(
    "out, message", [("file/gen.jsonl", "cannot create directory"), ("dir.jsonl", "is a directory")]
)
def test_generate_out_that_cannot_be_written_is_a_usage_error_before_sampling(
    tmp_path, monkeypatch, capsys, out, message
):
    def no_prompts(*args, **kwargs):
        raise AssertionError("read prompts before checking --out")

    monkeypatch.setattr("dpo_dist.generation.read_prompts", no_prompts)
    (tmp_path / "file").write_text("")
    (tmp_path / "dir.jsonl").mkdir()
    prompts = write_jsonl(tmp_path / "p.jsonl", [GOOD])
    args = ["generate", "--model", str(tmp_path), "--prompts", str(prompts), "--out", str(tmp_path / out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpo-data: error: --out ") and message in err and err.count("\n") == 1


# ---- dpo-data shards -----------------------------------------------------------------------------


def write_cache(cache_dir: Path, *, sha256: bool = True) -> None:
    cache_dir.mkdir(parents=True)
    table = pa.table(
        {
            "example_id": [0, 1],
            "chosen_logp": [-1.0, -2.0],
            "rejected_logp": [-3.0, -4.0],
            "chosen_tokens": [1, 2],
            "rejected_tokens": [3, 4],
        },
        schema=reference_store.SCHEMA,
    )
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    name = reference_store.shard_name(0)
    (cache_dir / name).write_bytes(sink.getvalue())
    entry = {"rows": 2, **({"sha256": hashlib.sha256(sink.getvalue()).hexdigest()} if sha256 else {})}
    manifest = {
        "format_version": reference_store.FORMAT_VERSION,
        "complete": True,
        "num_examples": 2,
        "num_shards": 1,
        "shards": {name: entry},
    }
    (cache_dir / reference_store.MANIFEST_NAME).write_text(json.dumps(manifest))


def test_shards_reports_a_manifest_entry_without_sha256(tmp_path, capsys):
    write_cache(tmp_path / "cache", sha256=False)
    assert main(["shards", str(tmp_path / "cache")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "part-00000.arrow: 2 rows, sha256 None" in lines
    assert "problem: shard part-00000.arrow: manifest.json entry has no sha256" in lines


def test_shards_checks_the_eval_split_too(tmp_path, capsys):
    write_cache(tmp_path / "cache")
    assert main(["shards", str(tmp_path / "cache")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "verified: all shards match their sha256"
    write_cache(tmp_path / "cache" / "eval-0123456789abcdef", sha256=False)
    assert main(["shards", str(tmp_path / "cache")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"eval split: {tmp_path / 'cache' / 'eval-0123456789abcdef'}" in lines
    assert lines[-2:] == ["problem: shard part-00000.arrow: manifest.json entry has no sha256", "1 problem"]
    (tmp_path / "cache" / "eval-0123456789abcdef").rename(tmp_path / "other")
    write_cache(tmp_path / "cache" / "eval-0123456789abcdef")
    assert main(["shards", str(tmp_path / "cache")]) == 0
    assert (
        capsys.readouterr().out.splitlines()[-1] == "verified: all shards match their sha256 (train and eval)"
    )


def test_shards_counts_problems_in_plural(tmp_path, capsys):
    write_cache(tmp_path / "cache", sha256=False)
    write_cache(tmp_path / "cache" / "eval-0123456789abcdef", sha256=False)
    assert main(["shards", str(tmp_path / "cache")]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "2 problems"


def test_shards_on_a_file_says_not_a_directory(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    assert main(["shards", str(path)]) == 2
    assert capsys.readouterr().err == f"dpo-data: error: {path}: not a directory\n"
    assert main(["shards", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"dpo-data: error: {tmp_path / 'missing'}: no such directory\n"


# ---- shared caches and the file-hash memo ----------------------------------------------------------


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_cache_files_are_readable_by_others_under_the_umask(tmp_path, monkeypatch):
    monkeypatch.setenv(fingerprint.CACHE_ENV, str(tmp_path / "root"))
    reference_store.write_json_atomic(tmp_path / "manifest.json", {"a": 1})
    os.utime(tmp_path / "manifest.json", (1, 1))  # settled, so memoized (fingerprint.RACY_S)
    fingerprint.file_sha256(tmp_path / "manifest.json")
    expected = 0o666 & ~current_umask()
    assert stat.S_IMODE((tmp_path / "manifest.json").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "root" / "filehash.json").stat().st_mode) == expected
    if current_umask() == 0o022:
        assert expected == 0o644


def test_a_rewrite_with_the_same_size_and_restored_mtime_is_rehashed(tmp_path, monkeypatch):
    monkeypatch.setenv(fingerprint.CACHE_ENV, str(tmp_path / "root"))
    path = tmp_path / "weights.bin"
    path.write_bytes(b"aaaa")
    before = path.stat()
    assert fingerprint.file_sha256(path) == hashlib.sha256(b"aaaa").hexdigest()
    path.write_bytes(b"bbbb")  # as cp -p or rsync -t would leave it: same size, same mtime
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    assert fingerprint.file_sha256(path) == hashlib.sha256(b"bbbb").hexdigest()


def test_a_corrupted_parquet_file_is_a_one_line_data_error(tmp_path):
    """Damaged bytes in a Parquet file fail in pyarrow when the file is opened or, for a damaged
    page, only when it is decoded; with several exception types and messages over several lines.
    Each becomes one line `PATH: cannot read Parquet file: ...` (flips at fixed random places)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpo_dist.data import read_preferences

    rows = 200
    pq.write_table(pa.table({"prompt": ["p" * 50] * rows, "chosen": ["a" * 30] * rows, "rejected": ["b" * 30] * rows}), tmp_path / "ok.parquet")
    good = (tmp_path / "ok.parquet").read_bytes()
    rng = random.Random(0)
    failures = 0
    for _ in range(120):
        data = bytearray(good)
        for _ in range(3):
            data[rng.randrange(4, len(data) // 2)] = rng.randrange(256)
        path = tmp_path / "bad.parquet"
        path.write_bytes(bytes(data))
        try:
            read_preferences(path)
        except DataError as e:
            failures += 1
            assert "\n" not in str(e) and str(e).startswith(f"{path}: cannot read Parquet file: "), str(e)
    assert failures > 10  # the flips did damage the file


def test_a_json_lines_file_named_json_gets_a_hint(tmp_path):
    """datasets' to_json writes one record per line: as .json that is "Extra data" on line 2."""
    from dpo_dist.data import read_preferences

    path = tmp_path / "pairs.json"
    datasets.Dataset.from_list([GOOD, GOOD]).to_json(path)
    with pytest.raises(DataError) as info:
        read_preferences(path)
    assert str(info.value) == f"{path}:2: invalid JSON: Extra data at column 1; one record per line is JSON Lines: name the file .jsonl"
    assert len(read_preferences(path.rename(tmp_path / "pairs.jsonl")).records) == 2


def test_shards_of_a_hand_edited_manifest_is_described_not_a_traceback(tmp_path, capsys):
    write_cache(tmp_path / "cache")
    path = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(manifest | {"shards": ["part-00000.arrow"], "settings": "edited", "fingerprints": None}))
    status = main(["shards", str(tmp_path / "cache")])
    lines = capsys.readouterr().out.splitlines()
    assert status == 1 and lines[0] == f"cache: {tmp_path / 'cache'}"
    assert f"problem: {tmp_path / 'cache'}: manifest.json's shards is not a mapping of shard names to entries" in lines
