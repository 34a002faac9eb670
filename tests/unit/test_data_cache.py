"""The tokenization cache: hits return identical data, any changed input misses."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from dpo_dist.data import DataError, bundled_tokenizer_path, load_tokenized, tokenizer_fingerprint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def load_tokenizer():
    return AutoTokenizer.from_pretrained(bundled_tokenizer_path(), local_files_only=True)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "mixed.jsonl"
    shutil.copy(FIXTURES / "mixed.jsonl", path)
    return path


def as_lists(dataset):
    return [
        (p.example_id, p.prompt_ids.tolist(), p.chosen_ids.tolist(), p.rejected_ids.tolist()) for p in dataset
    ]


def test_miss_then_hit_returns_identical_data(tok, data, tmp_path, caplog):
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="dpo_dist.data"):
        first = load_tokenized(data, tok, 40, on_invalid="skip", cache_dir=cache)
        second = load_tokenized(data, tok, 40, on_invalid="skip", cache_dir=cache)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert sorted(p.name for p in cache.iterdir()) == [
        f"{first.fingerprint}.arrow",
        f"{first.fingerprint}.json",
    ]
    assert as_lists(first) == as_lists(second)
    assert second.example_ids.tolist() == [0, 1, 13, 16]
    assert (second.num_records, second.num_invalid, len(second)) == (17, 13, 4)
    assert (second.truncation.truncated, second.truncation.dropped) == (1, 0)
    assert second.fingerprint == first.fingerprint
    np.testing.assert_array_equal(second.lengths(), [p.num_tokens for p in second])
    summaries = [m for m in caplog.messages if "records read" in m]
    assert summaries[0].startswith(f"{data}: 17 records read, 13 invalid dropped, 4 pairs kept; 1 truncated")
    assert "tokenization cache miss" in summaries[0] and "tokenization cache hit" in summaries[1]
    assert caplog.messages.count(f"{data}: dropped 13 invalid records (data.on_invalid=skip)") == 2


def test_truncated_pair_is_stored_truncated(tok, data, tmp_path):
    dataset = load_tokenized(data, tok, 40, on_invalid="skip", cache_dir=tmp_path / "c")
    chat = dataset[1]
    assert chat.chosen_seq_len <= 40 and chat.prompt_ids[0] == tok.bos_token_id
    assert tok.decode(chat.prompt_ids).endswith("France?\n<|assistant|>\n")


@pytest.mark.parametrize("change", ["max_length", "truncation", "data", "tokenizer"])
def test_changed_input_misses(tok, data, tmp_path, change):
    cache = tmp_path / "cache"
    first = load_tokenized(data, tok, 40, on_invalid="skip", cache_dir=cache)
    args = {"max_length": 40, "truncation": "keep_end_of_prompt", "tokenizer": tok}
    if change == "max_length":
        args["max_length"] = 64
    elif change == "truncation":
        args["truncation"] = "keep_start"
    elif change == "data":
        data.write_text(data.read_text() + '{"prompt": "new", "chosen": "a", "rejected": "b"}\n')
    else:
        args["tokenizer"] = load_tokenizer()
        args["tokenizer"].chat_template += " "
    second = load_tokenized(data, on_invalid="skip", cache_dir=cache, **args)
    assert not second.cache_hit and second.fingerprint != first.fingerprint
    assert len(list(cache.glob("*.arrow"))) == 2


def test_cache_written_under_skip_still_fails_under_error(tok, data, tmp_path):
    cache = tmp_path / "cache"
    load_tokenized(data, tok, 40, on_invalid="skip", cache_dir=cache)
    with pytest.raises(DataError) as info:
        load_tokenized(data, tok, 40, on_invalid="error", cache_dir=cache)
    assert str(info.value) == (
        f"{data}: 13 invalid records (first: {data}:4: invalid JSON: Expecting value at column 32); "
        f"fix them or set data.on_invalid=skip (run `dpo-data check {data}` to list all)"
    )


def test_error_policy_fails_before_writing_a_cache(tok, data, tmp_path):
    with pytest.raises(DataError, match="13 invalid records"):
        load_tokenized(data, tok, 40, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_no_cache_dir_tokenizes_in_memory(tok):
    dataset = load_tokenized(FIXTURES / "valid.jsonl", tok, 128)
    assert not dataset.cache_hit and len(dataset) == 3
    assert tok.decode(dataset[0].chosen_ids) == "4</s>"


def test_every_pair_dropped_is_an_error(tok):
    with pytest.raises(DataError, match="no pairs left"):
        load_tokenized(FIXTURES / "valid.jsonl", tok, 8, truncation="drop")


def test_unreadable_cache_is_rebuilt(tok, data, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = load_tokenized(data, tok, 40, on_invalid="skip", cache_dir=cache)
    (cache / f"{first.fingerprint}.arrow").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="dpo_dist.data"):
        again = load_tokenized(data, tok, 40, on_invalid="skip", cache_dir=cache)
    assert not again.cache_hit and as_lists(again) == as_lists(first)
    assert any("is unreadable" in m for m in caplog.messages)


def test_tokenizer_fingerprint_is_stable_and_ignores_call_settings(tok):
    other = load_tokenizer()
    other(["abc", "a"], padding=True, truncation=True, max_length=2)  # leaves state on the backend
    assert tokenizer_fingerprint(other) == tokenizer_fingerprint(tok)
    other.eos_token = "<pad>"
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)


def test_length_columns_match_the_pairs_and_the_scoring_rule(tok, data):
    """sequence_lengths/scored_tokens (what the engine packs and divides an SFT step by) agree with
    the pairs, and with logprobs' rule that a response's first token is scored from the prompt's last."""
    from dpo_dist.data.cache import TokenizedDataset, _to_table
    from dpo_dist.data.tokenize import TokenizedPair, TruncationStats

    dataset = load_tokenized(data, tok, max_length=64, on_invalid="skip")
    pairs = list(dataset)
    assert dataset.sequence_lengths().tolist() == [[p.chosen_seq_len, p.rejected_seq_len] for p in pairs]
    assert dataset.lengths().tolist() == [p.num_tokens for p in pairs]
    assert dataset.scored_tokens().tolist() == [[p.chosen_len, p.rejected_len] for p in pairs]
    assert dataset.lengths().dtype == dataset.scored_tokens().dtype == np.int64

    no_prompt = TokenizedPair(0, [], [5, 6, 7], [8, 9])
    table = _to_table([no_prompt])
    odd = TokenizedDataset(table, fingerprint="x", num_records=1, num_invalid=0, truncation=TruncationStats())
    assert odd.scored_tokens().tolist() == [[2, 1]] and odd.sequence_lengths().tolist() == [[3, 2]]


def test_a_record_the_chat_template_cannot_render_is_an_invalid_record(tok, tmp_path):
    """Like any bad record: named with its line, skipped under on_invalid=skip (and remembered by
    the cache), fatal under error; the file's other records are kept."""
    import json

    path = tmp_path / "chat.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "tool", "content": "x"}], "chosen": "a", "rejected": "b"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=rf"1 invalid record \(first: {path}:2: chat template failed: unknown chat role: tool\)"):
        load_tokenized(path, tok, max_length=64, on_invalid="error")
    cache = tmp_path / "cache"
    for _ in range(2):  # a miss, then a hit
        dataset = load_tokenized(path, tok, max_length=64, on_invalid="skip", cache_dir=cache)
        assert len(dataset) == 1 and dataset.num_invalid == 1 and dataset.example_ids.tolist() == [0]
    with pytest.raises(DataError, match="chat template failed"):
        load_tokenized(path, tok, max_length=64, on_invalid="error", cache_dir=cache)


def test_bad_and_unrenderable_records_are_logged_once_as_one_total(tok, tmp_path, caplog):
    """A miss knows the template failures only after tokenizing; the drop is logged then, once,
    with every reason, and a hit logs the same."""
    import json

    path = tmp_path / "chat.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"},
        {"prompt": "p", "chosen": "a"},
        {"prompt": [{"role": "tool", "content": "x"}], "chosen": "a", "rejected": "b"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cache = tmp_path / "cache"
    for _ in range(2):  # a miss, then a hit
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dpo_dist.data"):
            load_tokenized(path, tok, max_length=64, on_invalid="skip", cache_dir=cache)
        dropped = [m for m in caplog.messages if "invalid records" in m]
        assert dropped == [f"{path}: dropped 2 invalid records (data.on_invalid=skip)"]
        assert f"  {path}:2: missing key 'rejected'" in caplog.messages
        assert f"  {path}:3: chat template failed: unknown chat role: tool" in caplog.messages


def test_pairs_identical_after_truncation_are_dropped_counted_and_logged(tok, tmp_path, caplog):
    """keep_start at max_length=12 cuts 344 bundled training pairs to identical responses (and drops
    2415 whose prompt alone fills it)."""
    train = Path(bundled_tokenizer_path()).parent / "data" / "train.jsonl"
    cache = tmp_path / "cache"
    for hit in (False, True):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dpo_dist.data"):
            dataset = load_tokenized(train, tok, 12, truncation="keep_start", cache_dir=cache)
        assert dataset.cache_hit == hit
        assert (dataset.num_records, len(dataset), dataset.truncation.identical) == (6000, 3241, 344)
        assert dataset.truncation.dropped == 2415
        assert not any(np.array_equal(p.chosen_ids, p.rejected_ids) for p in dataset)
        assert f"{train}: 344 pairs dropped: chosen and rejected identical after truncation" in "\n".join(
            caplog.messages
        )
        assert "344 dropped as identical after truncation" in next(m for m in caplog.messages if "records read" in m)


def test_sft_keeps_pairs_identical_after_truncation_in_a_cache_of_its_own(tok, tmp_path):
    """SFT trains on chosen alone: a response cut to the rejected one's prefix is still a target.
    Its cache entry is separate, so a DPO run on the same file still drops them."""
    train = Path(bundled_tokenizer_path()).parent / "data" / "train.jsonl"
    cache = tmp_path / "cache"
    sft = load_tokenized(train, tok, 12, truncation="keep_start", cache_dir=cache, keep_identical=True)
    assert (len(sft), sft.truncation.identical) == (6000 - 2415, 0)
    assert sum(np.array_equal(p.chosen_ids, p.rejected_ids) for p in sft) == 344
    dpo = load_tokenized(train, tok, 12, truncation="keep_start", cache_dir=cache)
    assert (dpo.cache_hit, len(dpo), dpo.truncation.identical) == (False, 3241, 344)
    assert load_tokenized(train, tok, 12, truncation="keep_start", cache_dir=cache, keep_identical=True).cache_hit


def test_cache_format_covers_dropping_identical_pairs():
    """Caches written before identical pairs were dropped hold them: the bumped format misses them."""
    from dpo_dist.data.cache import CACHE_FORMAT

    assert CACHE_FORMAT >= 3


def test_the_check_hint_names_a_tokenizer_that_is_not_the_bundled_one(data, tmp_path):
    """dpo-data check tokenizes with the bundled tokenizer unless told: the hint of a run with
    another tokenizer passes it on, so check finds what training found."""
    import shutil

    from transformers import AutoTokenizer

    from dpo_dist.data import bundled_tokenizer_path

    own = shutil.copytree(bundled_tokenizer_path(), tmp_path / "own_tokenizer")
    with pytest.raises(DataError) as info:
        load_tokenized(data, AutoTokenizer.from_pretrained(own), 40, on_invalid="error")
    assert str(info.value).endswith(f"(run `dpo-data check {data} --tokenizer {own}` to list all)")


def test_a_new_cache_format_misses_caches_of_the_old_one(tok, data, tmp_path, monkeypatch):
    """CACHE_FORMAT is bumped when the tokenization rules change: caches written under the old
    rules (other ids for the same file and tokenizer) must not be hit."""
    from dpo_dist.data import cache as cache_module

    cache = tmp_path / "cache"
    first = load_tokenized(data, tok, 40, on_invalid="skip", cache_dir=cache)
    monkeypatch.setattr(cache_module, "CACHE_FORMAT", cache_module.CACHE_FORMAT + 1)
    second = load_tokenized(data, tok, 40, on_invalid="skip", cache_dir=cache)
    assert not second.cache_hit and second.fingerprint != first.fingerprint


def test_tokenizer_fingerprint_covers_the_vocabulary(tmp_path):
    """Two tokenizers that differ only in which ids two characters get (same special tokens, chat
    template and probe encoding) give other ids for other texts: other fingerprints."""
    import json

    shutil.copytree(bundled_tokenizer_path(), tmp_path / "tok")
    spec = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["q"], vocab["z"] = vocab["z"], vocab["q"]
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    swapped = AutoTokenizer.from_pretrained(tmp_path / "tok")
    bundled = load_tokenizer()
    assert swapped("quiz")["input_ids"] != bundled("quiz")["input_ids"]
    assert swapped("Hello world 123.\n")["input_ids"] == bundled("Hello world 123.\n")["input_ids"]
    assert tokenizer_fingerprint(swapped) != tokenizer_fingerprint(bundled)


class _SlowTokenizer:
    """A tokenizer without a fast backend (no ``backend_tokenizer``): one id per character."""

    special_tokens_map = {"bos_token": "<s>", "eos_token": "</s>"}
    chat_template = None

    def __init__(self, adds_bos: bool):
        self.adds_bos = adds_bos

    def get_vocab(self):
        return {"<s>": 1, "</s>": 2, **{chr(c): c for c in range(32, 127)}}

    def __call__(self, text):
        return {"input_ids": [1] * self.adds_bos + [ord(c) for c in text]}


def test_tokenizer_fingerprint_without_a_backend_covers_the_special_tokens_it_adds():
    """A slow tokenizer's vocabulary and special tokens do not say whether it adds BOS; the encoded
    probe does, so a tokenizer set to add none gets another fingerprint."""
    assert tokenizer_fingerprint(_SlowTokenizer(True)) == tokenizer_fingerprint(_SlowTokenizer(True))
    assert tokenizer_fingerprint(_SlowTokenizer(True)) != tokenizer_fingerprint(_SlowTokenizer(False))


def test_a_cache_with_fewer_rows_than_its_metadata_says_is_rebuilt(tok, data, tmp_path, caplog):
    """An Arrow file that does not hold the pairs its metadata counts (replaced, or cut to fewer
    rows) is not used: the file is tokenized again, with every pair."""
    import pyarrow as pa

    from dpo_dist.data.cache import _write_arrow

    cache = tmp_path / "cache"
    first = load_tokenized(data, tok, 40, on_invalid="skip", cache_dir=cache)
    arrow = cache / f"{first.fingerprint}.arrow"
    short = pa.ipc.open_file(pa.BufferReader(arrow.read_bytes())).read_all().slice(0, len(first) - 1)
    with open(arrow, "wb") as f:
        _write_arrow(f, short)
    with caplog.at_level(logging.WARNING, logger="dpo_dist.data"):
        again = load_tokenized(data, tok, 40, on_invalid="skip", cache_dir=cache)
    assert not again.cache_hit and as_lists(again) == as_lists(first) and len(again) == 4
    assert any("is incomplete; rebuilding it" in m for m in caplog.messages)
