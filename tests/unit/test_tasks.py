"""The bundled task: verifier rules, generator determinism, and the shipped data files."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from dpo_dist import tasks

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "dpo_dist" / "assets" / "data"
SPLITS = ("train", "eval")


def _load_tool():
    """tools/ is not a package: import the generator script by path."""
    spec = importlib.util.spec_from_file_location(
        "make_bundled_data", REPO_ROOT / "tools" / "make_bundled_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(split: str) -> list[dict]:
    with (DATA_DIR / f"{split}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --- verifier ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "answer"),
    [
        ("47+38=", "85"),
        ("10+10=", "20"),
        ("99+99=", "198"),
        ("91-46=", "45"),
        ("77-77=", "0"),
        ("reverse: kqzmt", "tmzqk"),
        ("sort: dbeca", "abcde"),
        ("sort: bab", "abb"),
    ],
)
def test_reference_answer(prompt, answer):
    assert tasks.reference_answer(prompt) == answer
    assert tasks.verify(prompt, answer)


def test_verify_is_exact_up_to_surrounding_whitespace():
    assert tasks.verify("47+38=", " 85\n")
    for wrong in ("84", "085", "85.", "8 5", "", "eighty-five"):
        assert not tasks.verify("47+38=", wrong), wrong
    assert not tasks.verify("sort: dbeca", "ABCDE")


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        "47 + 38 =",
        "47+38",
        "07+30=",
        "7+38=",
        "100+10=",
        "37-73=",
        "4*5=",
        "reverse:abc",
        "Sort: abc",
        "sort: ABC",
        "sort: ",
    ],
)
def test_parse_rejects_non_task_prompts(prompt):
    with pytest.raises(ValueError, match="not a bundled-task prompt"):
        tasks.parse(prompt)


def test_parse_round_trips_the_prompt():
    rng = random.Random(1)
    for kind in tasks.KINDS:
        for _ in range(200):
            problem = tasks.sample_problem(kind, rng)
            assert tasks.parse(problem.prompt) == problem


def test_rejected_is_always_wrong_and_nonempty():
    rng = random.Random(2)
    for kind in tasks.KINDS:
        for _ in range(500):
            problem = tasks.sample_problem(kind, rng)
            rejected = tasks.make_rejected(problem, rng)
            assert rejected and not tasks.verify(problem.prompt, rejected), (problem, rejected)


# --- generator ---------------------------------------------------------------------------------


def test_generator_is_deterministic():
    assert tasks.generate_splits(3, 400, 40) == tasks.generate_splits(3, 400, 40)
    assert tasks.generate_splits(3, 400, 40) != tasks.generate_splits(4, 400, 40)


def test_generator_balances_kinds_and_keeps_splits_disjoint():
    train, evals = tasks.generate_splits(0, 800, 80)
    assert len(train) == 800 and len(evals) == 80
    for records, per_kind in ((train, 200), (evals, 20)):
        kinds = [tasks.parse(r["prompt"]).kind for r in records]
        assert all(kinds.count(k) == per_kind for k in tasks.KINDS)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}


def test_tool_reproduces_the_shipped_files(tmp_path):
    """Default arguments regenerate the committed files byte for byte (any hash seed)."""
    assert _load_tool().main(["--out-dir", str(tmp_path)]) == 0
    for split in SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (DATA_DIR / f"{split}.jsonl").read_bytes(), split


# --- shipped files -----------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_shipped_file_is_jsonl_of_string_triples(split):
    path = DATA_DIR / f"{split}.jsonl"
    assert path.stat().st_size < 1_000_000
    records = _read(split)
    assert records
    for r in records:
        assert set(r) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(v, str) and v for v in r.values())
        assert r["chosen"] != r["rejected"]


@pytest.mark.parametrize("split", SPLITS)
def test_verifier_accepts_every_chosen_and_rejects_every_rejected(split):
    for line, r in enumerate(_read(split), start=1):
        assert tasks.verify(r["prompt"], r["chosen"]), (split, line, r)
        assert not tasks.verify(r["prompt"], r["rejected"]), (split, line, r)


def test_no_eval_prompt_in_train_and_no_duplicates():
    train = [r["prompt"] for r in _read("train")]
    evals = [r["prompt"] for r in _read("eval")]
    assert len(set(train)) == len(train) and len(set(evals)) == len(evals)
    assert not set(train) & set(evals)


# --- bundled model -----------------------------------------------------------------------------


def test_bundled_model_carries_the_bundled_tokenizer():
    """tools/build_tiny_model.py copies the tokenizer verbatim; a difference means a stale model
    (rebuild it after tools/build_tokenizer.py) whose embeddings may not match the token ids."""
    tokenizer_dir = REPO_ROOT / "dpo_dist" / "assets" / "tokenizer"
    model_dir = REPO_ROOT / "dpo_dist" / "assets" / "tiny_model"
    # Both are tracked in git (the quick start trains them): missing is a broken checkout, not a skip.
    assert tokenizer_dir.is_dir() and model_dir.is_dir(), "bundled tokenizer or model missing"
    for path in tokenizer_dir.iterdir():
        assert (model_dir / path.name).read_bytes() == path.read_bytes(), f"stale {model_dir / path.name}"
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["vocab_size"] >= len(vocab)
    assert (model_dir / "model.safetensors").stat().st_size < 8_000_000
