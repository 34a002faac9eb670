"""Reference shards are sha256-hashed once per job start: rank 0 checks them under the cache lock
and every rank (itself included) takes that verdict instead of hashing again when it opens them."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from dpo_dist import reference as ref
from dpo_dist import reference_store
from dpo_dist.attention import enable_packed_attention
from dpo_dist.config import DataConfig, DPOConfig, ModelConfig, ReferenceConfig, TrainConfig
from dpo_dist.data import load_tokenized
from dpo_dist.distributed import DistEnv
from dpo_dist.reference import ReferenceCacheError, ReferenceStore
from tests.helpers import make_pairs_jsonl, make_tiny_model_dir, run_ranks

MAX_LENGTH = 64
PAIRS_PER_SHARD = 2  # train: 4 shards (2 + 2 + 2 + 1 pairs), eval: 2 shards
CORRUPTED = r"shard part-00001\.arrow is corrupted \(sha256 mismatch\)"


def run_config(model_dir: str, train_path: str, eval_path: str, cache_dir: str) -> DPOConfig:
    return DPOConfig(
        model=ModelConfig(path=model_dir),
        data=DataConfig(train_path=train_path, eval_path=eval_path, max_length=MAX_LENGTH),
        train=TrainConfig(micro_batch_tokens=2 * MAX_LENGTH),
        reference=ReferenceConfig(cache_dir=cache_dir),
    )


def load_splits(cfg: DPOConfig):
    """(tokenizer, train data, eval data) as the engine loads them for ``cfg``."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.resolved_tokenizer_path())
    return tokenizer, *(
        load_tokenized(path, tokenizer, cfg.data.max_length, cfg.data.truncation)
        for path in (cfg.data.train_path, cfg.data.eval_path)
    )


def fingerprints(cfg: DPOConfig, tokenizer, data_path: str) -> dict:
    return ref.fingerprints_from_config(cfg, tokenizer, data_path, dtype=torch.float32)


def ensure_run(cfg: DPOConfig, rank: int = 0, world_size: int = 1) -> ref.RunReference:
    _, train, evals = load_splits(cfg)
    env = DistEnv(rank, rank, world_size, "127.0.0.1", 0, None)
    return ref.ensure_reference_for_run(cfg, env, torch.device("cpu"), "sdpa", train, evals)


def count_digests(patch) -> Counter:
    """Count every shard digest computed from now on, by digest: ``patch(obj, name, value)``."""
    counts: Counter = Counter()
    real = reference_store.shard_digest

    def counting(data) -> str:
        digest = real(data)
        counts[digest] += 1
        return digest

    patch(reference_store, "shard_digest", counting)
    return counts


def shard_digests(cache_dir: Path) -> list[str]:
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    return [entry["sha256"] for entry in manifest["shards"].values()]


def flip_byte(path: Path, offset: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> DPOConfig:
    """A run config whose train and eval reference caches are complete (built with a plain HF
    model, several shards per split, so that a reused cache never builds a DeepSpeed engine)."""
    root = tmp_path_factory.mktemp("hashing")
    cfg = run_config(
        str(make_tiny_model_dir(root / "model")),
        str(make_pairs_jsonl(root / "train.jsonl", 7, seed=3)),
        str(make_pairs_jsonl(root / "eval.jsonl", 4, seed=4)),
        str(root / "ref"),
    )
    tokenizer, *datasets = load_splits(cfg)
    model = LlamaForCausalLM.from_pretrained(cfg.model.path).eval()
    enable_packed_attention(model, "sdpa")
    for data, path, cache in zip(datasets, (cfg.data.train_path, cfg.data.eval_path), cache_dirs(cfg), strict=True):
        ref.ensure_reference(
            model,
            data,
            cache,
            fingerprints=fingerprints(cfg, tokenizer, path),
            model_path=cfg.model.path,
            tokenizer_path=cfg.model.resolved_tokenizer_path(),
            micro_batch_tokens=cfg.train.micro_batch_tokens,
            pairs_per_shard=PAIRS_PER_SHARD,
            progress=False,
        )
    return cfg


def cache_dirs(cfg: DPOConfig) -> tuple[Path, Path]:
    """(train, eval) cache directories of ``cfg`` (the eval one named by the eval file's fingerprints)."""
    train = Path(cfg.reference.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.resolved_tokenizer_path())
    return train, ref.eval_cache_dir(train, fingerprints(cfg, tokenizer, cfg.data.eval_path))


def copied(cfg: DPOConfig, tmp_path: Path) -> DPOConfig:
    """``cfg`` with a copy of its caches, for a test that damages them."""
    target = tmp_path / "ref"
    shutil.copytree(cfg.reference.cache_dir, target)
    return dataclasses.replace(cfg, reference=ReferenceConfig(cache_dir=str(target)))


def test_a_reused_cache_is_hashed_once_per_shard(cfg, monkeypatch):
    digests = count_digests(monkeypatch.setattr)
    run = ensure_run(cfg)
    assert run.computed is False
    expected = [*shard_digests(cache_dirs(cfg)[0]), *shard_digests(cache_dirs(cfg)[1])]
    assert len(set(expected)) == 6
    assert digests == Counter(expected)
    # The trusted shards are read all the same: the values are those of a fully checked open.
    tokenizer, train, evals = load_splits(cfg)
    for store, data, path in ((run.train, train, cfg.data.train_path), (run.eval, evals, cfg.data.eval_path)):
        checked = ReferenceStore.open(store.cache_dir, fingerprints(cfg, tokenizer, path), data.example_ids)
        ids = data.example_ids
        assert [t.tolist() for t in store.lookup(ids)] == [t.tolist() for t in checked.lookup(ids)]


def test_a_computed_cache_is_hashed_once_per_shard(cfg, tmp_path, monkeypatch):
    """A fresh pass hashes each written shard once, when it finalizes the manifest."""
    tokenizer, train, _ = load_splits(cfg)
    model = LlamaForCausalLM.from_pretrained(cfg.model.path).eval()
    enable_packed_attention(model, "sdpa")
    expected = fingerprints(cfg, tokenizer, cfg.data.train_path)
    digests = count_digests(monkeypatch.setattr)
    summary = ref.ensure_reference(
        model,
        train,
        tmp_path / "fresh",
        fingerprints=expected,
        model_path=cfg.model.path,
        tokenizer_path=cfg.model.resolved_tokenizer_path(),
        micro_batch_tokens=cfg.train.micro_batch_tokens,
        pairs_per_shard=PAIRS_PER_SHARD,
        progress=False,
    )
    ReferenceStore.open(tmp_path / "fresh", expected, train.example_ids, verified=summary.verified_shards)
    assert summary.computed is True
    assert digests == Counter(shard_digests(tmp_path / "fresh"))


def test_a_corrupted_shard_still_fails_the_run(cfg, tmp_path):
    damaged = copied(cfg, tmp_path)
    flip_byte(cache_dirs(damaged)[0] / "part-00001.arrow")
    with pytest.raises(ReferenceCacheError, match=CORRUPTED):
        ensure_run(damaged)


def test_open_hashes_a_shard_whose_verified_entry_is_not_the_manifests(cfg, tmp_path, monkeypatch):
    """A verdict is about one manifest entry: a cache replaced since (other digests) is checked."""
    damaged = copied(cfg, tmp_path)
    cache = cache_dirs(damaged)[0]
    manifest = json.loads((cache / "manifest.json").read_text())
    tokenizer, train, _ = load_splits(damaged)
    expected = fingerprints(damaged, tokenizer, damaged.data.train_path)
    digests = count_digests(monkeypatch.setattr)
    ReferenceStore.open(cache, expected, train.example_ids, verified=manifest["shards"])
    assert not digests
    flip_byte(cache / "part-00001.arrow")
    stale = {name: {**entry, "sha256": "0" * 64} for name, entry in manifest["shards"].items()}
    with pytest.raises(ReferenceCacheError, match=CORRUPTED):
        ReferenceStore.open(cache, expected, train.example_ids, verified=stale)


# Each rank runs the run's reference setup on the intact caches, then on the damaged copy, and
# writes which digests it computed (or the error it got).
RANK_SCRIPT = """
import json, os, sys
from collections import Counter
import torch.distributed as dist
sys.path.insert(0, os.getcwd())
from dpo_dist.reference import ReferenceCacheError
from tests.unit.test_reference_hashing import count_digests, ensure_run, run_config

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
spec = json.loads(open(sys.argv[1]).read())
digests = count_digests(setattr)
outcome = {}
for name, cache_dir in spec["caches"].items():
    digests.clear()
    try:
        ensure_run(run_config(*spec["paths"], cache_dir), rank, world)
        outcome[name] = {"digests": dict(digests)}
    except ReferenceCacheError as err:
        outcome[name] = {"digests": dict(digests), "error": str(err)}
open(os.path.join(spec["out"], f"rank{rank}.json"), "w").write(json.dumps(outcome))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.integration
def test_two_ranks_hash_a_reused_cache_once_and_both_see_corruption(cfg, tmp_path):
    damaged = copied(cfg, tmp_path)
    flip_byte(cache_dirs(damaged)[0] / "part-00001.arrow")
    script, spec, out = tmp_path / "ranks.py", tmp_path / "spec.json", tmp_path / "out"
    script.write_text(RANK_SCRIPT)
    out.mkdir()
    spec.write_text(
        json.dumps(
            {
                "paths": [cfg.model.path, cfg.data.train_path, cfg.data.eval_path],
                "caches": {"intact": cfg.reference.cache_dir, "damaged": damaged.reference.cache_dir},
                "out": str(out),
            }
        )
    )
    run_ranks([str(script), str(spec)], 2, timeout=180)
    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    expected = Counter([*shard_digests(cache_dirs(cfg)[0]), *shard_digests(cache_dirs(cfg)[1])])
    assert Counter(rank0["intact"]["digests"]) == expected
    assert rank1["intact"]["digests"] == {}
    for outcome in (rank0["damaged"], rank1["damaged"]):
        assert "corrupted (sha256 mismatch)" in outcome["error"]
    assert rank1["damaged"]["digests"] == {}


def test_an_unwritable_hash_memo_is_said_once(tmp_path, monkeypatch, caplog):
    """A cache root that cannot be written (read-only home) still hashes, but every run then
    re-hashes the model weights: one warning per process names the memo and the cost."""
    import hashlib
    import logging

    from dpo_dist import fingerprint

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    monkeypatch.setenv(fingerprint.CACHE_ENV, str(blocker / "cache"))  # mkdir under a file fails
    # Not said yet in this process (raising=False: the flag is new with that warning).
    monkeypatch.setattr(fingerprint, "_memo_unwritable_logged", False, raising=False)
    caplog.set_level(logging.WARNING, logger="dpo_dist.fingerprint")
    files = [tmp_path / "a.bin", tmp_path / "b.bin"]
    for i, path in enumerate(files):
        path.write_bytes(bytes([i]) * 100)
        os.utime(path, (1, 1))  # settled: worth memoizing (see fingerprint.RACY_S)
    for path in files:
        assert fingerprint.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    warnings = [r.getMessage() for r in caplog.records if r.name == "dpo_dist.fingerprint"]
    assert len(warnings) == 1, warnings
    assert str(blocker / "cache" / "filehash.json") in warnings[0]
    assert "hashed again on every run" in warnings[0] and fingerprint.CACHE_ENV in warnings[0]


def test_an_adapter_directory_is_fingerprinted_with_its_settings_and_base(tmp_path):
    """A LoRA adapter as model.path scores as base + adapter: its adapter_config (alpha, r) and the
    base's weights are part of the fingerprint (a cache filled for other ones is not reused);
    where the base lives is not."""
    from peft import LoraConfig, get_peft_model

    from dpo_dist.fingerprint import model_fingerprint

    base = make_tiny_model_dir(tmp_path / "base")
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    adapter_config = tmp_path / "adapter" / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    assert settings["base_model_name_or_path"] == str(base)
    first = model_fingerprint(tmp_path / "adapter")

    adapter_config.write_text(json.dumps(settings | {"lora_alpha": 64}))
    assert model_fingerprint(tmp_path / "adapter") != first
    adapter_config.write_text(json.dumps(settings))
    assert model_fingerprint(tmp_path / "adapter") == first

    shutil.move(base, tmp_path / "moved")  # the same weights elsewhere: the same scores
    adapter_config.write_text(json.dumps(settings | {"base_model_name_or_path": str(tmp_path / "moved")}))
    assert model_fingerprint(tmp_path / "adapter") == first
    make_tiny_model_dir(tmp_path / "moved", seed=1)  # other base weights under the same path
    assert model_fingerprint(tmp_path / "adapter") != first
