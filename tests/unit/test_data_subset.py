"""data.max_samples and data.eval_split: which records a run uses, and the caches keyed by them."""

from __future__ import annotations

import json
import logging
import math
import random

import pytest
from transformers import AutoTokenizer

from dpo_dist.audit import AuditResult, check_leakage
from dpo_dist.config import ConfigError, DataConfig, DPOConfig, ReferenceConfig, config_from_dict
from dpo_dist.data import (
    DataError,
    bundled_tokenizer_path,
    data_fingerprint,
    load_preferences,
    load_tokenized,
    read_preferences,
)
from dpo_dist.data.subset import ALL_RECORDS, Selection, held_out
from dpo_dist.evaluation import EvalError, held_out_source
from dpo_dist.runinfo import check_same_run, write_config


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(bundled_tokenizer_path(), local_files_only=True)


def write_pairs(path, prompts, bad_lines=()):
    """One record per prompt (in order); the lines (1-based) in ``bad_lines`` are invalid records."""
    lines = []
    for i, prompt in enumerate(prompts):
        bad = i + 1 in bad_lines
        lines.append(json.dumps({"prompt": prompt, "chosen": f"{i}", "rejected": "" if bad else f"{i}!"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def grouped_prompts(groups: int, seed: int = 0) -> list[str]:
    """Prompts of ``groups`` questions asked 1 to 4 times each, spelled with varied case and
    spacing (the same prompt to ``dpo-data audit``), in shuffled order."""
    rng = random.Random(seed)
    prompts = []
    for g in range(groups):
        for _ in range(rng.randint(1, 4)):
            prompts.append(rng.choice([f"What is {g} + {g}?", f"what  is {g} + {g}? ", f"WHAT IS {g} + {g}?"]))
    rng.shuffle(prompts)
    return prompts


def sides(path, eval_split, max_samples=0):
    """(train records, eval records) of ``path`` as the run reads them."""
    return tuple(
        load_preferences(path, "skip", selection=Selection(max_samples, eval_split, side)) for side in ("train", "eval")
    )


@pytest.mark.parametrize("eval_split", [0.1, 0.25, 7, 30])
def test_the_split_is_disjoint_whole_prompts_sized_and_deterministic(tmp_path, eval_split):
    prompts = grouped_prompts(40)
    path = write_pairs(tmp_path / "pairs.jsonl", prompts)
    train, held = sides(path, eval_split)
    valid = len(prompts)
    assert not {r.example_id for r in train} & {r.example_id for r in held}
    assert sorted(r.example_id for r in train + held) == list(range(valid))
    assert [r.example_id for r in train] == sorted(r.example_id for r in train)  # file order kept
    wanted = math.ceil(eval_split * valid) if isinstance(eval_split, float) else eval_split
    assert wanted <= len(held) < wanted + 4  # whole prompts: at most a group (<= 4 records) more
    # No prompt on both sides, as dpo-data audit's leakage check sees them.
    result = AuditResult(str(path), str(path), len(train), len(held), 64)
    check_leakage(train, held, {r.example_id: f"x:{r.line}" for r in train}, str(path), result)
    assert result.counts.get("leakage", 0) == 0
    # The same on every read, in any record order: a hash of the prompt, no RNG.
    assert sides(path, eval_split) == (train, held)
    reordered = list(reversed(read_preferences(path).records))
    assert held_out(reordered, eval_split, "x") == {r.example_id for r in held}


def test_max_samples_counts_records_of_the_file_invalid_ones_included(tmp_path, tok, caplog):
    """The first N records as stored, before invalid ones are dropped (OpenRLHF's --max_samples,
    dataset.select(range(N))); reading stops there: a bad record past N is never seen."""
    path = write_pairs(tmp_path / "pairs.jsonl", [f"{i}+1=" for i in range(12)], bad_lines=(2, 11))
    with caplog.at_level(logging.INFO, logger="dpo_dist.data"):
        data = load_tokenized(path, tok, 64, on_invalid="skip", selection=Selection(max_samples=5))
    assert data.example_ids.tolist() == [0, 2, 3, 4]
    assert (data.num_records, data.num_invalid) == (5, 1)
    assert f"{path}: data.max_samples=5: its first 5 records, counted before invalid or over-long ones are dropped" in caplog.messages
    assert any(m.startswith(f"{path} (first 5 records): 5 records read, 1 invalid dropped, 4 pairs kept") for m in caplog.messages)
    # data.on_invalid=error only sees the first N: record 11's problem is past them.
    with pytest.raises(DataError, match=":2: "):
        load_tokenized(path, tok, 64, on_invalid="error", selection=Selection(max_samples=5))
    assert [r.example_id for r in load_preferences(path, "error", selection=Selection(max_samples=1))] == [0]
    # More than the file holds: all of it.
    assert len(load_tokenized(path, tok, 64, on_invalid="skip", selection=Selection(max_samples=100))) == 10
    assert read_preferences(path, limit=3).num_records == 3


def test_max_samples_then_split_divides_the_first_n(tmp_path):
    prompts = grouped_prompts(40)
    path = write_pairs(tmp_path / "pairs.jsonl", prompts, bad_lines=(3,))
    train, held = sides(path, 0.2, max_samples=50)
    assert sorted(r.example_id for r in train + held) == [i for i in range(50) if i != 2]
    assert len(held) >= math.ceil(0.2 * 49)


def test_the_tokenized_sides_and_their_log_lines(tmp_path, tok, caplog):
    path = write_pairs(tmp_path / "pairs.jsonl", [f"{i}+1=" for i in range(20)], bad_lines=(4,))
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="dpo_dist.data"):
        train, held = (
            load_tokenized(path, tok, 64, on_invalid="skip", cache_dir=cache, selection=Selection(0, 5, side))
            for side in ("train", "eval")
        )
    assert (len(train), len(held), train.num_invalid, held.num_invalid) == (14, 5, 1, 0)
    assert not set(train.example_ids) & set(held.example_ids)
    split_line = (
        f"{path}: data.eval_split=5: 5 of the 19 valid records held out for evaluation (5 prompts, each with "
        "all its records), 14 for training"
    )
    assert caplog.messages.count(split_line) == 1  # once, by the training side
    assert caplog.messages.count(f"{path}: dropped 1 invalid records (data.on_invalid=skip)") == 1
    assert any(m.startswith(f"{path} (held out by data.eval_split=5): 5 records read, 0 invalid dropped") for m in caplog.messages)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dpo_dist.data"):
        again = load_tokenized(path, tok, 64, on_invalid="skip", cache_dir=cache, selection=Selection(0, 5, "train"))
    assert again.cache_hit and again.example_ids.tolist() == train.example_ids.tolist()
    assert split_line in caplog.messages  # a cache hit says it too


def test_cache_keys_differ_by_the_records_used(tmp_path, tok):
    """max_samples and each side of eval_split are other data: their own tokenization caches and
    reference fingerprints, never those of the whole file; a whole file keeps its old keys."""
    from dpo_dist import reference as ref
    from dpo_dist.fingerprint import file_sha256

    path = write_pairs(tmp_path / "pairs.jsonl", [f"{i}+1=" for i in range(20)])
    selections = [
        ALL_RECORDS, Selection(max_samples=10), Selection(max_samples=11), Selection(0, 0.2, "train"),
        Selection(0, 0.2, "eval"), Selection(0, 0.3, "eval"), Selection(0, 4, "eval"), Selection(10, 0.2, "eval"),
    ]  # fmt: skip
    prints = [data_fingerprint(path, selection=s) for s in selections]
    assert len(set(prints)) == len(selections)
    assert prints[0] == file_sha256(path)
    cache = tmp_path / "cache"
    loaded = [load_tokenized(path, tok, 64, cache_dir=cache, selection=s) for s in selections]
    assert not any(d.cache_hit for d in loaded) and len({d.fingerprint for d in loaded}) == len(selections)
    assert len(list(cache.glob("*.arrow"))) == len(selections)
    # The reference fingerprints of a run on these records ("data" names the cache directory).
    cfg = DPOConfig(data=DataConfig(train_path=str(path), eval_path=None, max_samples=10))
    train_fp = ref.fingerprints_from_config(cfg, tok, path, dtype="fp32", selection=cfg.data.sources()[0].selection)
    whole_fp = ref.fingerprints_from_config(cfg, tok, path, dtype="fp32")
    assert train_fp["data"] == prints[1] != whole_fp["data"] == prints[0]
    assert ref.combined_fingerprint(train_fp) != ref.combined_fingerprint(whole_fp)


def test_sources_are_what_every_reader_uses(tmp_path):
    path = str(write_pairs(tmp_path / "pairs.jsonl", [f"{i}+1=" for i in range(20)]))
    both = DataConfig(train_path=path, eval_path="e.jsonl", max_samples=7).sources()
    assert [(s.path, s.selection) for s in both] == [(path, Selection(max_samples=7)), ("e.jsonl", ALL_RECORDS)]
    train, held = DataConfig(train_path=path, eval_path=None, eval_split=0.1, max_samples=7).sources()
    assert (train.path, held.path) == (path, path)
    assert (train.selection, held.selection) == (Selection(7, 0.1, "train"), Selection(7, 0.1, "eval"))
    assert held.label() == f"{path} (first 7 records, held out by data.eval_split=0.1)"
    assert DataConfig(train_path=path, eval_path=None).sources()[1] is None
    with pytest.raises(EvalError, match="no held-out data to evaluate on: data.eval_path is null and data.eval_split is 0"):
        held_out_source(DPOConfig(data=DataConfig(eval_path=None)), "to evaluate on")
    # The win-rate asks the held-out prompts.
    from dpo_dist.winrate import eval_prompts

    items = eval_prompts(DPOConfig(data=DataConfig(train_path=path, eval_path=None, eval_split=3)))
    assert [item.example_id for item in items] == sorted(r.example_id for r in sides(path, 3)[1])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"eval_split": 0.1}, "data.eval_split: holds out records of data.train_path for evaluation, instead of an eval file: set data.eval_path=null"),
        ({"eval_split": 1.0, "eval_path": None}, "data.eval_split: must be a fraction in (0, 1) or a whole number of records >= 1 (0: none), got 1.0"),
        ({"eval_split": -2, "eval_path": None}, "data.eval_split: must be a fraction"),
        ({"max_samples": -1}, "data.max_samples: must be a whole number >= 0 (0: all records), got -1"),
        ({"max_samples": 0.5}, "data.max_samples: must be a whole number"),
        ({"max_samples": True}, "data.max_samples: must be a whole number >= 0 (0: all records), got True"),
        ({"eval_split": True, "eval_path": None}, "data.eval_split: must be a fraction in (0, 1) or a whole number of records >= 1 (0: none), got True"),
        ({"eval_split": "0.1", "eval_path": None}, "data.eval_split: must be a fraction in (0, 1) or a whole number of records >= 1 (0: none), got '0.1'"),
        ({"eval_split": 5.0, "eval_path": None}, "data.eval_split: must be a fraction"),
    ],
)
def test_bad_settings_are_one_line(data, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"data": data})
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_split_that_leaves_a_side_empty_is_refused(tmp_path):
    path = write_pairs(tmp_path / "pairs.jsonl", [f"{i}+1=" for i in range(6)])
    with pytest.raises(DataError, match=r"data.eval_split=6 asks for 6 of its 6 valid records: none would be left to train on"):
        sides(path, 6)
    same = write_pairs(tmp_path / "same.jsonl", ["2+2="] * 6)
    with pytest.raises(DataError, match="holds out all 6 valid records: a prompt's records stay on one side, and they have 1 distinct prompt$"):
        sides(same, 0.1)


def test_a_resumed_run_with_other_records_is_refused(tmp_path):
    """max_samples and eval_split change what the run trains on: like any data.* setting, a run
    directory that trained with other values refuses them (check_same_run)."""
    out = tmp_path / "run"

    def cfg(**data):
        return config_from_dict({"output_dir": str(out), "data": {"eval_path": None, **data}})

    write_config(cfg(max_samples=100, eval_split=0.1))
    (out / "metrics.jsonl").write_text("")
    check_same_run(cfg(max_samples=100, eval_split=0.1))
    with pytest.raises(ConfigError, match=r"data.max_samples: 100 -> 200"):
        check_same_run(cfg(max_samples=200, eval_split=0.1))
    with pytest.raises(ConfigError, match=r"data.eval_split: 0.1 -> 0.2"):
        check_same_run(cfg(max_samples=100, eval_split=0.2))


# ---- mutation-audit additions --------------------------------------------------------------------


def test_the_split_is_pinned_so_caches_keyed_by_it_stay_true(tmp_path):
    """The held-out records are part of no cache key beyond (file, eval_split, side): a change to
    the order prompts are taken in (sha256 of the normalised prompt) or to the rounding (up, as
    train_test_split) would pair a cached side with a freshly split other side, overlapping it.
    Such a change must bump CACHE_FORMAT and these values."""
    path = write_pairs(tmp_path / "pairs.jsonl", [f"Question {i}?" for i in range(20)])
    records = read_preferences(path).records
    assert sorted(held_out(records[:10], 0.25, "x")) == [1, 2, 5]  # ceil(2.5) = 3 prompts
    assert sorted(held_out(records[:10], 3, "x")) == [1, 2, 5]
    assert sorted(held_out(records, 0.01, "x")) == [2]  # ceil(0.2) = 1: a tiny fraction holds out one
    # Spelled otherwise (case, spacing), a prompt is the same prompt: its records go with it.
    variants = write_pairs(tmp_path / "variants.jsonl", [f"Question {i}?" for i in range(10)] + ["QUESTION 2?", " question   5? "])
    assert sorted(held_out(read_preferences(variants).records, 3, "x")) == [2, 5, 10, 11]  # 4 records: whole prompts


def test_max_samples_counts_across_the_files_of_a_pattern(tmp_path, tok):
    """Example ids count on across the files of a glob pattern, and so does data.max_samples: the
    first N records of all of them, not N of each."""
    write_pairs(tmp_path / "a.jsonl", [f"a{i}" for i in range(3)])
    write_pairs(tmp_path / "b.jsonl", [f"b{i}" for i in range(5)])
    pattern = str(tmp_path / "*.jsonl")
    assert [r.example_id for r in load_preferences(pattern, selection=Selection(max_samples=5))] == [0, 1, 2, 3, 4]
    assert read_preferences(pattern, limit=2).num_records == 2
    data = load_tokenized(pattern, tok, 64, selection=Selection(max_samples=5))
    assert (data.num_records, data.example_ids.tolist()) == (5, [0, 1, 2, 3, 4])


def test_a_split_of_a_file_without_valid_records_says_so(tmp_path):
    """Not a split that 'asks for 0 of its 0 valid records': the file's own error."""
    path = write_pairs(tmp_path / "bad.jsonl", ["a", "b"], bad_lines=(1, 2))
    for side in ("train", "eval"):
        with pytest.raises(DataError, match=r"data.eval_split=1\): no valid records$"):
            load_preferences(path, "skip", selection=Selection(0, 1, side))


def test_selected_records_read_through_other_keys_are_other_data(tmp_path):
    """data.prompt_key... and a selection together: keys of their own, not the default keys' ones."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"q": f"{i}+1=", "good": f"{i}", "bad": f"{i}!"}) + "\n" for i in range(6)))
    columns = ("q", "good", "bad")
    for selection in (Selection(max_samples=3), Selection(0, 2, "train"), Selection(0, 2, "eval")):
        assert data_fingerprint(path, columns, selection) != data_fingerprint(path, selection=selection)
        assert data_fingerprint(path, columns, selection) != data_fingerprint(path, columns)


def test_under_on_invalid_error_either_side_of_a_file_with_a_bad_record_fails(tmp_path, tok):
    """The held-out side alone (the win-rate's prompts, a dpo-eval) refuses the file as training
    does: on_invalid applies to the file the sides are split from."""
    path = write_pairs(tmp_path / "pairs.jsonl", [f"{i}+1=" for i in range(10)], bad_lines=(3,))
    for side in ("train", "eval"):
        with pytest.raises(DataError, match=":3: "):
            load_preferences(path, "error", selection=Selection(0, 2, side))
        with pytest.raises(DataError, match=":3: "):
            load_tokenized(path, tok, 64, on_invalid="error", selection=Selection(0, 2, side))


def test_a_selection_names_a_side_exactly_when_it_splits():
    for args in ((0, 0, "train"), (0, 0.1, "all"), (0, 2, "test")):
        with pytest.raises(ValueError, match="side must be train or eval with an eval_split"):
            Selection(*args)


def test_each_reference_pass_is_fingerprinted_by_the_records_of_its_side(tmp_path, tok, monkeypatch):
    """The reference caches of a run (the train pass and the eval pass) are keyed by the records
    each reads: a cache made for other records (max_samples=48 where 64 are asked, another eval
    file at the same path) must not be opened as this run's."""
    import torch

    from dpo_dist import reference as ref
    from dpo_dist.distributed import DistEnv

    ensured = {}
    monkeypatch.setattr(ref, "ensure_reference", lambda model, data, cache_dir, *, fingerprints, **_: ensured.update({data: fingerprints["data"]}))
    path = write_pairs(tmp_path / "pairs.jsonl", [f"{i}+1=" for i in range(20)])
    other = write_pairs(tmp_path / "eval.jsonl", [f"{i}+2=" for i in range(5)])
    one_rank = DistEnv(0, 0, 1, "127.0.0.1", 1, None)
    for data in ({"eval_path": None, "eval_split": 3, "max_samples": 10}, {"eval_path": str(other), "max_samples": 10}):
        cfg = DPOConfig(data=DataConfig(train_path=str(path), **data), reference=ReferenceConfig(cache_dir=str(tmp_path / "ref")))
        ref._ensure_run_splits(cfg, one_rank, torch.device("cpu"), "sdpa", "train", "eval", tok)
        train, held = cfg.data.sources()
        assert ensured == {name: data_fingerprint(s.path, selection=s.selection) for name, s in (("train", train), ("eval", held))}
