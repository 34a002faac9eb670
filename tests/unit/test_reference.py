"""The reference log-prob store: values, layout, resume, refusals, locking, fingerprints."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from dpo_dist import fingerprint as fp
from dpo_dist import reference as ref
from dpo_dist.attention import enable_packed_attention
from dpo_dist.config import DataConfig, DPOConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig
from dpo_dist.data import collate_packed, load_tokenized
from dpo_dist.reference import ReferenceCacheError, ReferenceStore
from tests.helpers import TOKENIZER_DIR, make_pairs_jsonl, make_tiny_model_dir

MAX_LENGTH = 64
MICRO_BATCH_TOKENS = 96
PAIRS_PER_SHARD = 3
NUM_PAIRS = 10  # 4 shards: 3 + 3 + 3 + 1 pairs


class Setup:
    """A saved tiny model, its packed-attention copy, a pair file and everything derived."""

    def __init__(self, root: Path):
        self.root = root
        self.model_dir = make_tiny_model_dir(root / "model")
        self.tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        self.data_path = make_pairs_jsonl(root / "train.jsonl", NUM_PAIRS, seed=3)
        self.dataset = self.load(self.data_path)
        self.model = LlamaForCausalLM.from_pretrained(self.model_dir).eval()
        enable_packed_attention(self.model, "sdpa")
        self.forwards = 0
        self.model.model.register_forward_hook(self._count)
        self.fingerprints = self.fingerprints_for()

    def _count(self, *_):
        self.forwards += 1

    def load(self, path, max_length=MAX_LENGTH):
        return load_tokenized(path, self.tokenizer, max_length, "keep_end_of_prompt", "error")

    def fingerprints_for(self, **changes):
        args = dict(
            model_path=self.model_dir,
            data_path=self.data_path,
            max_length=MAX_LENGTH,
            truncation="keep_end_of_prompt",
            dtype=torch.float32,
        )
        args.update(changes)
        return ref.reference_fingerprints(
            args.pop("model_path"), args.pop("tokenizer", self.tokenizer), args.pop("data_path"), **args
        )

    def ensure(self, cache_dir, dataset=None, **kwargs):
        options = dict(
            fingerprints=self.fingerprints,
            model_path=self.model_dir,
            tokenizer_path=TOKENIZER_DIR,
            micro_batch_tokens=MICRO_BATCH_TOKENS,
            pairs_per_shard=PAIRS_PER_SHARD,
            progress=False,
            lock_poll_s=0.02,
        )
        options.update(kwargs)
        return ref.ensure_reference(self.model, dataset or self.dataset, cache_dir, **options)

    def open(self, cache_dir, fingerprints=None, example_ids=None):
        ids = self.dataset.example_ids if example_ids is None else example_ids
        return ReferenceStore.open(cache_dir, fingerprints or self.fingerprints, ids)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def built(setup, tmp_path_factory):
    """A complete cache, built once; tests that damage a cache work on a copy."""
    cache = tmp_path_factory.mktemp("built") / "cache"
    summary = setup.ensure(cache)
    return cache, summary


def copy_cache(built, tmp_path) -> Path:
    target = tmp_path / "cache"
    shutil.copytree(built[0], target)
    return target


def read_rows(cache_dir: Path) -> pa.Table:
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    tables = [pa.ipc.open_file(str(cache_dir / name)).read_all() for name in sorted(manifest["shards"])]
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables])


def hf_response_logps(model, prompt_ids, response_ids) -> float:
    """Summed log-probs of the response tokens, one plain unpacked HF forward."""
    return sum(hf_token_logps(model, prompt_ids, response_ids))


def hf_token_logps(model, prompt_ids, response_ids) -> list[float]:
    """The log-prob of each response token, one plain unpacked HF forward."""
    ids = torch.tensor(np.concatenate([prompt_ids, response_ids]), dtype=torch.long)
    logits = model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0].double()
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    start = len(prompt_ids)
    return [float(log_probs[p - 1, ids[p]]) for p in range(start, len(ids))]


# ---------------------------------------------------------------------------------------------
# What a pass writes


def test_shard_values_equal_an_independent_hf_forward(setup, built):
    table = read_rows(built[0])
    assert table.schema == ref.SCHEMA
    assert table.column_names == [
        "example_id",
        "chosen_logp",
        "rejected_logp",
        "chosen_tokens",
        "rejected_tokens",
    ]
    assert table.column("example_id").to_pylist() == setup.dataset.example_ids.tolist()
    plain = LlamaForCausalLM.from_pretrained(setup.model_dir).eval()
    rows = {row["example_id"]: row for row in table.to_pylist()}
    with torch.no_grad():
        for pair in setup.dataset:
            row = rows[pair.example_id]
            for side, response in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
                expected = hf_response_logps(plain, pair.prompt_ids, response)
                assert row[f"{side}_logp"] == pytest.approx(expected, rel=1e-5)
                assert row[f"{side}_tokens"] == len(response)


def test_manifest_sidecars_and_layout(setup, built):
    cache, summary = built
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["format_version"] == ref.FORMAT_VERSION
    assert manifest["fingerprints"] == {
        k: setup.fingerprints[k] for k in ("model", "tokenizer", "data", "settings")
    }
    assert manifest["fingerprint"] == ref.combined_fingerprint(setup.fingerprints) == summary.fingerprint
    assert manifest["settings"] == setup.fingerprints["settings_values"]
    assert manifest["model_path"] == str(setup.model_dir.absolute())
    assert Path(manifest["tokenizer_path"]).is_absolute()
    assert manifest["num_examples"] == NUM_PAIRS
    names = [f"part-{i:05d}.arrow" for i in range(4)]
    assert sorted(manifest["shards"]) == names
    assert [manifest["shards"][n]["rows"] for n in names] == [3, 3, 3, 1]
    for name in names:
        digest = hashlib.sha256((cache / name).read_bytes()).hexdigest()
        assert manifest["shards"][name]["sha256"] == digest
        assert (cache / f"{name}.sha256").read_text() == f"{digest}  {name}\n"  # sha256sum -c format
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*.tmp"))
    assert (summary.computed, summary.examples_computed, summary.shards_computed) == (True, NUM_PAIRS, 4)


def test_complete_cache_is_reused_without_a_forward(setup, built):
    before = setup.forwards
    summary = setup.ensure(built[0])
    assert (summary.computed, summary.examples_computed) == (False, 0)
    assert setup.forwards == before


def test_model_factory_is_not_called_for_a_complete_cache(setup, built):
    def factory():
        raise AssertionError("the reference model must not be built")

    summary = ref.ensure_reference(
        factory,
        setup.dataset,
        built[0],
        fingerprints=setup.fingerprints,
        model_path=setup.model_dir,
        tokenizer_path=TOKENIZER_DIR,
        micro_batch_tokens=MICRO_BATCH_TOKENS,
        progress=False,
    )
    assert summary.computed is False


# ---------------------------------------------------------------------------------------------
# Resume


class Killed(Exception):
    """Stands in for the job dying mid-pass."""


def test_a_shard_changed_after_its_sidecar_never_enters_a_complete_manifest(setup, tmp_path, monkeypatch):
    """A late writer (a straggling rank of a dead job) rewrites shard 0 after its sidecar: the pass
    refuses to mark the cache complete, and the next run recomputes just that shard."""
    cache = tmp_path / "cache"
    real_write = ref._write_shard

    def write_then_clobber_shard0(cache_dir, index, table, fingerprint):
        real_write(cache_dir, index, table, fingerprint)
        if index == 3:
            (cache_dir / ref.shard_name(0)).write_bytes(b"not the shard its sidecar describes")

    monkeypatch.setattr(ref, "_write_shard", write_then_clobber_shard0)
    with pytest.raises(ReferenceCacheError, match="part-00000.arrow is missing or does not match its sidecar"):
        setup.ensure(cache)
    monkeypatch.setattr(ref, "_write_shard", real_write)
    assert json.loads((cache / "manifest.json").read_text())["complete"] is False
    summary = setup.ensure(cache)
    assert summary.computed is True and summary.shards_computed == 1
    assert ref.verify_cache(cache) == []  # complete, every shard checks out


def test_killed_pass_resumes_with_only_the_missing_examples(setup, built, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_write = ref._write_shard
    written = []

    def dying_write(cache_dir, index, table, fingerprint):
        if len(written) == 2:
            raise Killed  # while writing the third shard
        real_write(cache_dir, index, table, fingerprint)
        written.append(index)

    monkeypatch.setattr(ref, "_write_shard", dying_write)
    with pytest.raises(Killed):
        setup.ensure(cache)
    monkeypatch.setattr(ref, "_write_shard", real_write)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] is False
    with pytest.raises(ReferenceCacheError, match=r"is incomplete \(complete=false"):
        setup.open(cache)
    assert "status: incomplete (2 of 4 shards written)" in ref.describe_cache(cache)

    remaining = [i for i in range(4) if i not in written]
    lengths = setup.dataset.lengths()
    expected_forwards = sum(
        len(ref._pack_shard((3 * i, min(3 * i + 3, NUM_PAIRS)), lengths, MICRO_BATCH_TOKENS))
        for i in remaining
    )
    before = setup.forwards
    summary = setup.ensure(cache)
    assert summary.computed is True
    assert summary.shards_computed == len(remaining) == 2
    assert summary.examples_computed == NUM_PAIRS - 3 * len(written)
    assert setup.forwards - before == expected_forwards
    # Same micro-batches per shard as an uninterrupted pass: byte-identical shards.
    assert (
        json.loads((cache / "manifest.json").read_text())["shards"]
        == json.loads((built[0] / "manifest.json").read_text())["shards"]
    )


def test_resume_recomputes_half_written_shards_and_removes_temp_files(setup, built, tmp_path):
    cache = copy_cache(built, tmp_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["complete"] = False
    (cache / "manifest.json").write_text(json.dumps(manifest))
    (cache / "part-00001.arrow.sha256").unlink()  # killed between shard and sidecar
    (cache / "part-00002.arrow.sha256").write_text("0" * 64 + "  part-00002.arrow\n")  # stale sidecar
    (cache / ".part-00003.arrow.x1y2.tmp").write_bytes(b"partial")
    before = setup.forwards
    summary = setup.ensure(cache)
    assert (summary.shards_computed, summary.examples_computed) == (2, 6)
    assert setup.forwards > before
    assert not list(cache.glob(".*.tmp"))
    assert ref.verify_cache(cache) == []


# ---------------------------------------------------------------------------------------------
# Refusals


def flip_byte(path: Path, offset: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_shard_is_refused_by_reader_and_ensure(setup, built, tmp_path):
    cache = copy_cache(built, tmp_path)
    flip_byte(cache / "part-00001.arrow")
    message = r"shard part-00001\.arrow is corrupted \(sha256 mismatch\)"
    with pytest.raises(ReferenceCacheError, match=message):
        setup.open(cache)
    with pytest.raises(ReferenceCacheError, match=message):
        setup.ensure(cache)
    assert any("part-00001.arrow is corrupted" in p for p in ref.verify_cache(cache))


def test_changed_max_length_is_refused_naming_the_setting(setup, built):
    changed = setup.fingerprints_for(max_length=48)
    with pytest.raises(ReferenceCacheError, match=r"reference settings changed \(max_length 64 -> 48\)"):
        setup.open(built[0], changed)


def test_changed_dtype_is_refused_as_a_reference_setting(setup, built):
    changed = setup.fingerprints_for(dtype=torch.bfloat16)
    with pytest.raises(ReferenceCacheError, match=r"reference settings changed \(dtype fp32 -> bf16\)") as refused:
        setup.open(built[0], changed)
    assert "tokenization" not in str(refused.value)


def test_changed_data_file_is_refused(setup, tmp_path):
    data = tmp_path / "data.jsonl"
    shutil.copy(setup.data_path, data)
    fps = setup.fingerprints_for(data_path=data)
    cache = tmp_path / "cache"
    setup.ensure(cache, fingerprints=fps)
    with data.open("a") as f:
        f.write(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    changed = setup.fingerprints_for(data_path=data)
    with pytest.raises(ReferenceCacheError, match="data file changed") as refused:
        setup.open(cache, changed)
    assert "model files" not in str(refused.value) and "\n" not in str(refused.value)
    # ensure refuses too (it never overwrites a cache made from other inputs), leaving it intact.
    with pytest.raises(ReferenceCacheError, match="data file changed"):
        setup.ensure(cache, fingerprints=changed)
    assert ref.verify_cache(cache) == []


def test_changed_model_weights_are_refused(setup, built, tmp_path):
    other = tmp_path / "model"
    shutil.copytree(setup.model_dir, other)
    model = LlamaForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.lm_head.weight.add_(1e-3)
    model.save_pretrained(other)
    changed = setup.fingerprints_for(model_path=other)
    with pytest.raises(ReferenceCacheError, match="model files changed"):
        setup.open(built[0], changed)


def test_changed_model_config_alone_is_refused_as_model_files(setup, built, tmp_path):
    other = tmp_path / "model"
    shutil.copytree(setup.model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 10
    (other / "config.json").write_text(json.dumps(config))
    changed = setup.fingerprints_for(model_path=other)
    with pytest.raises(ReferenceCacheError, match="model files changed") as refused:
        setup.open(built[0], changed)
    assert "weights" not in str(refused.value)


def test_changed_tokenizer_is_refused(setup, built, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    changed = setup.fingerprints_for(tokenizer=tokenizer)
    with pytest.raises(ReferenceCacheError, match="tokenizer changed"):
        setup.open(built[0], changed)


def test_missing_manifest_incomplete_and_missing_ids_are_refused(setup, built, tmp_path):
    with pytest.raises(ReferenceCacheError, match="manifest.json missing"):
        setup.open(tmp_path / "nothing")
    cache = copy_cache(built, tmp_path)
    with pytest.raises(ReferenceCacheError, match="1 example ids missing from the cache, e.g. 10000"):
        setup.open(cache, example_ids=np.append(setup.dataset.example_ids, 10_000))
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["complete"] = False
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReferenceCacheError, match=r"incomplete \(complete=false in manifest.json\)"):
        setup.open(cache)


def test_precompute_never_reopens_a_complete_cache(setup, built, tmp_path):
    cache = copy_cache(built, tmp_path)
    manifest_bytes = (cache / "manifest.json").read_bytes()
    options = dict(
        fingerprints=setup.fingerprints,
        model_path=setup.model_dir,
        tokenizer_path=TOKENIZER_DIR,
        micro_batch_tokens=MICRO_BATCH_TOKENS,
        progress=False,
    )
    summary = ref.precompute_reference(setup.model, setup.dataset, cache, **options)
    assert summary.computed is False and (cache / "manifest.json").read_bytes() == manifest_bytes
    flip_byte(cache / "part-00002.arrow")
    with pytest.raises(ReferenceCacheError, match=r"part-00002\.arrow is corrupted"):
        ref.precompute_reference(setup.model, setup.dataset, cache, **options)


def test_shards_without_manifest_are_refused_not_overwritten(setup, built, tmp_path):
    cache = copy_cache(built, tmp_path)
    (cache / "manifest.json").unlink()
    with pytest.raises(ReferenceCacheError, match="has shards but no manifest.json"):
        setup.ensure(cache)


def run_fingerprints(setup, max_length=MAX_LENGTH, **groups):
    """``fingerprints_from_config`` of a run on the setup's model and data with these config groups."""
    cfg = DPOConfig(
        model=ModelConfig(path=str(setup.model_dir)),
        data=DataConfig(train_path=str(setup.data_path), max_length=max_length),
        train=TrainConfig(micro_batch_tokens=512),
        **groups,
    )
    return ref.fingerprints_from_config(cfg, setup.tokenizer, setup.data_path, dtype="fp32")


def test_beta_and_lr_are_not_inputs(setup):
    base = run_fingerprints(setup, loss=LossConfig(beta=0.1), optim=OptimConfig(lr=1e-3))
    swept = run_fingerprints(setup, loss=LossConfig(beta=0.5), optim=OptimConfig(lr=1e-7))
    assert swept == base == setup.fingerprints
    assert ref.default_cache_dir(ref.combined_fingerprint(swept)) == ref.default_cache_dir(
        ref.combined_fingerprint(base)
    )
    longer = run_fingerprints(setup, max_length=80)
    assert longer["settings"] != base["settings"]


def test_ld_runs_fingerprint_the_tail_sums_not_ld_alpha(setup, built):
    """loss.ld_alpha: the cache must hold tail sums, which the settings record (``tail_logps``), so a
    cache without them is refused, naming the setting; ld_alpha's value is not recorded (a sweep over
    it shares one cache). Without ld_alpha the settings, and so every existing cache's fingerprint,
    are what they were; an SFT stage has no tails either."""
    plain = run_fingerprints(setup)
    assert plain == setup.fingerprints
    assert set(plain["settings_values"]) == {
        "max_length", "truncation", "dtype", "logp_reduction", "format_version", "tokenization_format"
    }
    ld = run_fingerprints(setup, loss=LossConfig(ld_alpha=0.5))
    assert ld == run_fingerprints(setup, loss=LossConfig(ld_alpha=0.0, beta=0.3)) == setup.fingerprints_for(tail_logps=True)
    assert ld["settings_values"] == plain["settings_values"] | {"tail_logps": True}
    assert {k: ld[k] for k in ("model", "tokenizer", "data")} == {k: plain[k] for k in ("model", "tokenizer", "data")}
    assert run_fingerprints(setup, stage="sft", loss=LossConfig(ld_alpha=0.5)) == plain
    with pytest.raises(ReferenceCacheError, match=re.escape("reference settings changed (tail_logps None -> True)")):
        setup.open(built[0], fingerprints=ld)


@pytest.fixture(scope="module")
def built_tails(setup, tmp_path_factory):
    """(cache, fingerprints, dataset) of a complete cache for LD-DPO runs (with tail sums), built
    once, of pairs whose responses differ in length either way (or not at all: every third)."""
    root = tmp_path_factory.mktemp("tails")
    with open(root / "pairs.jsonl", "w") as f:
        for i in range(NUM_PAIRS):
            chosen, rejected = f"{i}" * (1 + i % 4), f"{i + 1}" * (1 + i % 4 if i % 3 == 0 else 1 + (i * 7) % 5)
            f.write(json.dumps({"prompt": f"{i}+{i}=", "chosen": chosen, "rejected": rejected}) + "\n")
    dataset = setup.load(root / "pairs.jsonl")
    fingerprints = setup.fingerprints_for(data_path=root / "pairs.jsonl", tail_logps=True)
    setup.ensure(root / "cache", dataset, fingerprints=fingerprints)
    return root / "cache", fingerprints, dataset


def test_tail_columns_are_written_only_for_ld_runs(setup, built, built_tails):
    """A cache for LD-DPO runs adds chosen_tail_logp and rejected_tail_logp (float32): per
    response, its response tokens' log-probs past the shorter response of its pair, from a plain
    HF forward; its other columns hold the same numbers as a cache without them. Every other cache
    keeps the five columns."""
    assert read_rows(built[0]).schema == ref.SCHEMA
    assert json.loads((built[0] / "manifest.json").read_text())["columns"] == ref.SCHEMA.names
    table = read_rows(built_tails[0])
    names = [*ref.SCHEMA.names, "chosen_tail_logp", "rejected_tail_logp"]
    assert table.column_names == names and table.schema.field("chosen_tail_logp").type == pa.float32()
    manifest = json.loads((built_tails[0] / "manifest.json").read_text())
    assert manifest["columns"] == names and manifest["settings"]["tail_logps"] is True
    plain = LlamaForCausalLM.from_pretrained(setup.model_dir).eval()
    rows = {row["example_id"]: row for row in table.to_pylist()}
    tails = []
    with torch.no_grad():
        for pair in built_tails[2]:
            shared = min(len(pair.chosen_ids), len(pair.rejected_ids))
            for side, response in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
                token_logps = hf_token_logps(plain, pair.prompt_ids, response)
                assert rows[pair.example_id][f"{side}_logp"] == pytest.approx(sum(token_logps), rel=1e-5)
                assert rows[pair.example_id][f"{side}_tail_logp"] == pytest.approx(sum(token_logps[shared:]), rel=1e-5, abs=1e-6)
                tails.append(sum(token_logps[shared:]))
    assert sum(t < 0 for t in tails) >= NUM_PAIRS // 2 and sum(t == 0 for t in tails) > NUM_PAIRS  # unequal and equal pairs
    assert ref.verify_cache(built_tails[0]) == []
    assert "tail_logps=True" in "\n".join(ref.describe_cache(built_tails[0]))


def test_ld_lookup_gives_ld_dpo_sums(setup, built, built_tails):
    """lookup(..., ld_alpha) and RunReference(ld_alpha=...) give sum - (1 - alpha) * tail (per token
    with normalize="mean"); a cache without tails refuses an ld_alpha."""
    cache, fingerprints, dataset = built_tails
    store = ReferenceStore.open(cache, fingerprints, dataset.example_ids)
    table = read_rows(cache).to_pandas().set_index("example_id")
    ids = np.array([7, 1, 8, 2])
    assert (table.loc[ids, "chosen_tail_logp"] + table.loc[ids, "rejected_tail_logp"] < 0).all()  # pairs of unequal lengths
    chosen, rejected = store.lookup(ids, ld_alpha=0.3)
    for side, got in (("chosen", chosen), ("rejected", rejected)):
        want = table.loc[ids, f"{side}_logp"].to_numpy() - 0.7 * table.loc[ids, f"{side}_tail_logp"].to_numpy()
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    mean_chosen, _ = store.lookup(ids, normalize="mean", ld_alpha=0.3)
    np.testing.assert_allclose(mean_chosen.numpy(), chosen.numpy() / table.loc[ids, "chosen_tokens"].to_numpy(), rtol=1e-6)
    assert [t.tolist() for t in store.lookup(ids, ld_alpha=1.0)] == [t.tolist() for t in store.lookup(ids)]
    run = ref.RunReference(cache_dir=cache, computed=False, train=store, eval=None, ld_alpha=0.3)
    batch = collate_packed([dataset[i] for i in (2, 5)])
    assert [t.tolist() for t in run.logps(batch)] == [t.tolist() for t in store.lookup([2, 5], ld_alpha=0.3)]
    with pytest.raises(ReferenceCacheError, match="has no tail sums"):
        setup.open(built[0]).lookup(ids, ld_alpha=0.3)


def test_forward_dtype_must_match_the_fingerprint(setup, tmp_path):
    bf16 = setup.fingerprints_for(dtype="bf16")
    with pytest.raises(ValueError, match="runs in fp32 but the cache fingerprint says bf16"):
        setup.ensure(tmp_path / "cache", fingerprints=bf16)


# ---------------------------------------------------------------------------------------------
# Reading


def test_lookup_joins_by_example_id(setup, built):
    store = setup.open(built[0])
    table = read_rows(built[0]).to_pandas().set_index("example_id")
    ids = np.array([7, 0, 9, 3])
    for query in (ids, torch.from_numpy(ids), ids.tolist()):
        chosen, rejected = store.lookup(query)
        assert chosen.dtype == rejected.dtype == torch.float32
        assert chosen.tolist() == table.loc[ids, "chosen_logp"].tolist()
        assert rejected.tolist() == table.loc[ids, "rejected_logp"].tolist()
    mean_chosen, _ = store.lookup(ids, normalize="mean")
    expected = table.loc[ids, "chosen_logp"].to_numpy() / table.loc[ids, "chosen_tokens"].to_numpy()
    np.testing.assert_allclose(mean_chosen.numpy(), expected, rtol=1e-6)
    assert store.token_counts(ids)[1].tolist() == table.loc[ids, "rejected_tokens"].tolist()
    assert len(store) == NUM_PAIRS
    with pytest.raises(ReferenceCacheError, match="1 example ids missing from the cache, e.g. 42"):
        store.lookup([1, 42])


def test_run_reference_refuses_a_wrong_split_lookup(setup, built, tmp_path):
    store = setup.open(built[0])
    run = ref.RunReference(cache_dir=built[0], computed=False, train=store, eval=None)
    batch = collate_packed([setup.dataset[i] for i in (2, 5)])
    assert [t.tolist() for t in run.logps(batch)] == [t.tolist() for t in store.lookup([2, 5])]
    other = setup.load(make_pairs_jsonl(tmp_path / "eval.jsonl", 4, seed=11))  # ids 0..3 again
    wrong = collate_packed([other[i] for i in range(4)])
    with pytest.raises(ReferenceCacheError, match="wrong split or stale cache"):
        run.logps(wrong)
    with pytest.raises(ReferenceCacheError, match="no eval reference cache"):
        run.eval_logps(batch)


def test_describe_and_verify(setup, built, tmp_path):
    lines = ref.describe_cache(built[0])
    text = "\n".join(lines)
    assert "status: complete" in lines
    assert f"fingerprint: {ref.combined_fingerprint(setup.fingerprints)}" in lines
    assert "max_length=64" in text and str(setup.model_dir) in text
    assert any(line.startswith("part-00003.arrow: 1 rows, sha256 ") for line in lines)
    assert ref.verify_cache(built[0]) == []
    assert ref.verify_cache(tmp_path) == [f"{tmp_path}: manifest.json missing"]
    assert "no manifest.json" in ref.describe_cache(tmp_path)[0]


# ---------------------------------------------------------------------------------------------
# Locking


def test_concurrent_jobs_compute_once(setup, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_compute = ref._compute_shard

    def slow_compute(*args):
        time.sleep(0.05)  # keeps the first job inside the lock while the second one arrives
        return real_compute(*args)

    monkeypatch.setattr(ref, "_compute_shard", slow_compute)
    results, errors = [], []

    def job():
        try:
            results.append(setup.ensure(cache))
        except BaseException as err:  # surfaced below; a thread cannot fail the test itself
            errors.append(err)

    before = setup.forwards
    threads = [threading.Thread(target=job) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sorted(r.computed for r in results) == [False, True]
    lengths = setup.dataset.lengths()
    one_pass = sum(
        len(ref._pack_shard((3 * i, min(3 * i + 3, NUM_PAIRS)), lengths, MICRO_BATCH_TOKENS))
        for i in range(4)
    )
    assert setup.forwards - before == one_pass
    assert (cache / ".lock").read_text() == ""  # released


def test_a_held_lock_blocks_until_released(setup, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    holder = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    results = []
    thread = threading.Thread(target=lambda: results.append(setup.ensure(cache)))
    thread.start()
    try:
        time.sleep(0.3)
        assert thread.is_alive() and not (cache / "manifest.json").exists()
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
        thread.join(timeout=60)
    assert results and results[0].computed


# ---------------------------------------------------------------------------------------------
# Fingerprint helpers


def test_file_hash_memo_respects_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_DIST_CACHE", str(tmp_path / "cache_root"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"abc" * 1000)
    calls = []
    real = fp.bytes_sha256
    monkeypatch.setattr(fp, "bytes_sha256", lambda path: calls.append(path) or real(path))
    first = fp.file_sha256(weights)
    assert first == hashlib.sha256(b"abc" * 1000).hexdigest()
    # Just written: not memoized, a same-size rewrite in the same timestamp tick could follow.
    assert fp.file_sha256(weights) == first and len(calls) == 2
    settled = time.time_ns() - int(fp.RACY_S * 1e9) - 10**9
    os.utime(weights, ns=(settled, settled))
    assert fp.file_sha256(weights) == first and len(calls) == 3
    assert fp.file_sha256(weights) == first and len(calls) == 3  # memoized
    memo = json.loads((tmp_path / "cache_root" / "filehash.json").read_text())
    assert memo["entries"][str(weights.resolve())]["sha256"] == first
    weights.write_bytes(b"abd" * 1000)  # same size, new mtime
    os.utime(weights, ns=(1, 1))
    assert fp.file_sha256(weights) == hashlib.sha256(b"abd" * 1000).hexdigest()
    assert len(calls) == 4


def test_model_fingerprint_and_cache_dirs(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_DIST_CACHE", str(tmp_path / "root"))
    assert ref.default_cache_dir("ab" * 32) == tmp_path / "root" / "reference" / ("ab" * 8)
    other = tmp_path / "model"
    shutil.copytree(setup.model_dir, other)
    assert fp.model_fingerprint(other) == fp.model_fingerprint(setup.model_dir)  # content, not path
    (other / "training_args.bin").write_bytes(b"a trainer's leftovers")
    (other / "pytorch_model.bin").write_bytes(b"a stale copy from_pretrained would not load")
    assert fp.model_fingerprint(other) == fp.model_fingerprint(setup.model_dir)  # only loaded weights
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(config))
    assert fp.model_fingerprint(other) != fp.model_fingerprint(setup.model_dir)
    with pytest.raises(FileNotFoundError, match="no weight files"):
        fp.model_fingerprint(tmp_path)


def test_reference_partition_auto_replicates_only_what_fits_half_a_device(setup, monkeypatch):
    """reference.partition=auto: a whole copy per rank when the weights take at most half of one
    device's memory (CPU: the host's available memory shared by the node's ranks), else ZeRO-3."""
    from dpo_dist.config import config_from_dict

    cfg = config_from_dict({"model": {"path": str(setup.model_dir)}})
    weights = ref._model_bytes(str(setup.model_dir), torch.float32)
    params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(setup.model_dir).parameters())
    assert weights == 4 * params
    page = 4096
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    sysconf = {"SC_PAGE_SIZE": page}
    monkeypatch.setattr(ref.os, "sysconf", lambda name: sysconf[name])
    sysconf["SC_AVPHYS_PAGES"] = 4 * weights // page + 8  # each of 2 ranks: 2x the weights
    replicate, why = ref.reference_replicates(cfg, torch.device("cpu"), torch.float32)
    assert replicate and "<= half of 1/2 of the host's available" in why
    sysconf["SC_AVPHYS_PAGES"] = 3 * weights // page  # each rank: 1.5x the weights
    assert ref.reference_replicates(cfg, torch.device("cpu"), torch.float32)[0] is False
    forced = config_from_dict({"model": {"path": str(setup.model_dir)}, "reference": {"partition": "replicate"}})
    assert ref.reference_replicates(forced, torch.device("cpu"), torch.float32) == (True, "reference.partition=replicate")


def test_run_info_reference_entry_has_the_same_keys_whatever_the_source(setup, built):
    """run_info.json's "reference": the precomputed store says its mode like the online and the
    absent (SFT, SimPO) reference do, so the object has the same keys whatever the source."""
    from dpo_dist import distributed as D
    from dpo_dist import engine as E
    from dpo_dist.config import config_from_dict

    run = ref.RunReference(cache_dir=built[0], computed=True, train=setup.open(built[0]), eval=None)
    assert run.run_info() == {"cache_dir": str(built[0]), "computed": True, "mode": "precompute"}
    online = object.__new__(E.OnlineReference).run_info()
    env = D.DistEnv(0, 0, 1, "127.0.0.1", 0, None)
    absent = E.run_info(config_from_dict({}), env, torch.device("cpu"), "sdpa", [0], None, None, 0)["reference"]
    assert run.run_info().keys() == online.keys() == absent.keys()
    assert (online["mode"], absent["mode"]) == ("online", "none")


@pytest.mark.parametrize(("partition", "pages", "whole"), [
    ("replicate", None, True), ("zero3", None, False), ("auto", 4, True), ("auto", 1, False),
])
def test_online_reference_is_replicated_by_the_reference_pass_rule(setup, monkeypatch, caplog, partition, pages, whole):
    """reference.mode=online (no LoRA) holds its frozen copy as reference_replicates decides for the
    precompute pass: a whole copy per rank (no all-gather per layer and micro-batch) when it fits
    half a device (auto; here the host's memory, made 2x or 0.5x the weights), else ZeRO-3."""
    import logging

    from dpo_dist import engine as E
    from dpo_dist.config import config_from_dict

    cfg = config_from_dict({"model": {"path": str(setup.model_dir)}, "reference": {"mode": "online", "partition": partition}})
    if pages is not None:
        weights = ref._model_bytes(str(setup.model_dir), torch.float32)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        sysconf = {"SC_PAGE_SIZE": 1, "SC_AVPHYS_PAGES": pages * weights // 2}
        monkeypatch.setattr(ref.os, "sysconf", lambda name: sysconf[name])
    calls = []
    monkeypatch.setattr(E, "build_inference_engine", lambda *args, **kwargs: calls.append(kwargs) or "engine")
    with caplog.at_level(logging.INFO, logger="dpo_dist.engine"):
        reference = E.OnlineReference(cfg, torch.device("cpu"), "sdpa")
    assert reference.engine == "engine" and [kw["replicate"] for kw in calls] == [whole]
    said = "a whole copy of the model per rank" if whole else "partitioned with ZeRO-3"
    assert f"online reference: {said} (reference.partition={partition}" in caplog.text


@pytest.mark.parametrize("gpu_gib, whole", [(80, True), (40, False)])
def test_auto_replicates_an_online_copy_on_a_gpu_only_if_training_fits_beside_it(tmp_path, monkeypatch, gpu_gib, whole):
    """On a GPU the online copy shares the device with the policy's states and activations: auto
    replicates the 8B weights (15 GiB, under half of 40 or 80 GiB) on 8 x 80 GiB, but on 8 x 40 GiB
    training would not fit beside them, so the copy is partitioned (the planner decides alike).
    The plan is for the job's ranks (here 8, in the process group), not cluster.* (a plain sbatch
    job's config says one local rank); dpo-eval (no training beside the copy) needs no plan."""
    import shutil
    from types import SimpleNamespace

    import torch.distributed as dist

    from dpo_dist import engine as E
    from dpo_dist.config import config_from_dict
    from dpo_dist.memory import preset_shape_path

    shutil.copy(preset_shape_path("llama3_8b"), tmp_path / "config.json")
    cfg = config_from_dict({"model": {"path": str(tmp_path)}, "reference": {"mode": "online"}})  # cluster: 1 local rank
    monkeypatch.setattr(ref, "reference_replicates", lambda *a: (True, "reference.partition=auto: weights <= half"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=gpu_gib * 2**30))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(E.D, "broadcast_object", lambda value: value)  # rank 0's answer: this one
    replicate, why = E.online_reference_replicates(cfg, torch.device("cuda", 0), torch.bfloat16)
    assert replicate is whole, why
    assert ("training fits beside it" if whole else "training beside a whole copy would not fit") in why
    assert f"of {gpu_gib:.1f} GiB on 8 GPU(s)" in why
    assert E.online_reference_replicates(cfg, torch.device("cuda", 0), torch.bfloat16, training=False)[0]  # dpo-eval
    assert E.online_reference_replicates(cfg, torch.device("cpu"), torch.float32)[0]  # CPU: the weights rule only


def test_every_rank_takes_rank_0s_partition_decision(setup, monkeypatch):
    """Ranks read their memory at different moments (or sit on different GPUs): ranks building
    different reference engines would hang in mismatched collectives, so rank 0 decides for all."""
    from dpo_dist.config import config_from_dict

    cfg = config_from_dict({"model": {"path": str(setup.model_dir)}})
    monkeypatch.setattr(ref.D, "broadcast_object", lambda value: (False, "rank 0 said so"))
    assert ref.reference_replicates(cfg, torch.device("cpu"), torch.float32) == (False, "rank 0 said so")


def test_a_whole_reference_loads_whole_while_a_zero3_model_is_alive(setup):
    """The online reference may be built after the ZeRO-3 policy (tests/gpu/engine_smoke.py does):
    transformers would then build its size skeleton and its whole copy inside zero.Init with the
    policy's config (a process-wide weak reference the policy keeps alive)."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    from dpo_dist import model as M

    policy_config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        weights = ref._model_bytes(str(setup.model_dir), torch.float32)
        model = M.load_causal_lm(str(setup.model_dir), torch.float32, {"zero_optimization": {"stage": 0}})
        assert weights == 4 * sum(p.numel() for p in model.parameters()) > 0
        assert not any(hasattr(p, "ds_id") for p in model.parameters())  # not partitioned by zero.Init
        assert is_deepspeed_zero3_enabled()  # the policy's config is back for what consults it later
    finally:  # a failure's traceback keeps policy_config alive: no later test may see ZeRO-3 on
        unset_hf_deepspeed_config()
    assert policy_config.is_zero3()


# ---------------------------------------------------------------------------------------------
# What decides reuse, and what a store joins (mutation-testing gaps)


def test_every_fingerprint_component_names_its_own_cache_directory():
    """The combined fingerprint (the default cache directory, an eval split's directory) changes
    with each component: a max_length or dtype sweep gets a directory per setting, not a refusal."""
    base = {"model": "m", "tokenizer": "t", "data": "d", "settings": "s", "settings_values": {"dtype": "fp32"}}
    combined = ref.combined_fingerprint(base)
    for name in ("model", "tokenizer", "data", "settings"):
        changed = ref.combined_fingerprint({**base, name: name + "2"})
        assert changed != combined, name
        assert ref.default_cache_dir(changed) != ref.default_cache_dir(combined), name
    assert ref.combined_fingerprint({**base, "settings_values": {"dtype": "bf16"}}) == combined  # covered by settings


def test_truncation_rule_and_quantization_of_a_run_are_reference_inputs(setup):
    """data.truncation decides which tokens are scored, model.lora.quantize the base's weights:
    a run that changes either must not reuse the other's cache."""
    from dpo_dist.config import LoraConfig

    def fps(data=None, lora=None):
        cfg = DPOConfig(
            model=ModelConfig(path=str(setup.model_dir), **({"lora": lora} if lora else {})),
            data=data or DataConfig(train_path=str(setup.data_path), max_length=MAX_LENGTH),
            train=TrainConfig(micro_batch_tokens=512),
        )
        return ref.fingerprints_from_config(cfg, setup.tokenizer, setup.data_path, dtype="fp32")

    base = fps()
    keep_start = fps(data=DataConfig(train_path=str(setup.data_path), max_length=MAX_LENGTH, truncation="keep_start"))
    assert keep_start["settings_values"]["truncation"] == "keep_start"
    assert keep_start["settings"] != base["settings"]
    assert fps(lora=LoraConfig(r=8))["settings"] == base["settings"]  # adapters train on the same base
    nf4 = fps(lora=LoraConfig(r=8, quantize="nf4"))
    assert nf4["settings_values"]["quantize"] == "nf4" and nf4["settings"] != base["settings"]


def test_a_manifest_of_another_format_version_is_refused(setup, built, tmp_path):
    cache = copy_cache(built, tmp_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "format_version": ref.FORMAT_VERSION + 1}))
    message = rf"has format_version {ref.FORMAT_VERSION + 1}, this dpo_dist writes {ref.FORMAT_VERSION}"
    with pytest.raises(ReferenceCacheError, match=message):
        setup.open(cache)
    with pytest.raises(ReferenceCacheError, match=message):
        setup.ensure(cache)


def store_of(ids, chosen_tokens=None, rejected_tokens=None) -> ReferenceStore:
    """A store over rows in the given id order: logps -id (chosen) and -id - 0.5 (rejected)."""
    ids = np.asarray(ids, dtype=np.int64)
    table = pa.table(
        {
            "example_id": ids,
            "chosen_logp": (-ids).astype(np.float32),
            "rejected_logp": (-ids - 0.5).astype(np.float32),
            "chosen_tokens": np.asarray(chosen_tokens if chosen_tokens is not None else ids + 1, dtype=np.int32),
            "rejected_tokens": np.asarray(rejected_tokens if rejected_tokens is not None else ids + 2, dtype=np.int32),
        },
        schema=ref.SCHEMA,
    )
    return ReferenceStore(Path("/cache"), {"fingerprint": "f"}, table)


def test_store_joins_rows_stored_out_of_order_by_example_id():
    store = store_of([4, 0, 2, 6])
    chosen, rejected = store.lookup([0, 2, 4, 6])
    assert chosen.tolist() == [0.0, -2.0, -4.0, -6.0]
    assert rejected.tolist() == [-0.5, -2.5, -4.5, -6.5]
    assert [t.tolist() for t in store.token_counts([6, 0])] == [[7, 1], [8, 2]]


@pytest.mark.parametrize("wanted, missing", [([2, 3], 3), ([-1], -1), ([7], 7), ([1, 0], 1)])
def test_store_refuses_an_id_between_or_beside_its_rows(wanted, missing):
    """An id the cache lacks is never served the neighbouring row's log-probs."""
    store = store_of([0, 2, 4, 6])
    with pytest.raises(ReferenceCacheError, match=rf"1 example ids missing from the cache, e.g. {missing}$"):
        store.lookup(wanted)


def test_store_refuses_duplicate_example_ids():
    with pytest.raises(ReferenceCacheError, match="has duplicate example ids, e.g. 2; delete it"):
        store_of([0, 2, 1, 2])


def test_mean_lookup_divides_each_side_by_its_own_token_count():
    store = store_of([0, 1], chosen_tokens=[2, 4], rejected_tokens=[5, 3])
    chosen, rejected = store.lookup([0, 1], normalize="mean")
    np.testing.assert_allclose(chosen.numpy(), [0.0 / 2, -1.0 / 4])
    np.testing.assert_allclose(rejected.numpy(), [-0.5 / 5, -1.5 / 3])


def test_run_reference_refuses_a_batch_whose_rejected_counts_differ(setup, built):
    """The CPU check compares both sides: a batch whose rejected response has another length than
    the cached one (a stale cache) is refused even where the chosen one matches."""
    from dpo_dist.data import TokenizedPair

    run = ref.RunReference(cache_dir=built[0], computed=False, train=setup.open(built[0]), eval=None)
    pair = setup.dataset[4]
    longer = TokenizedPair(pair.example_id, pair.prompt_ids, pair.chosen_ids, np.append(pair.rejected_ids, 7))
    with pytest.raises(ReferenceCacheError, match="wrong split or stale cache"):
        run.logps(collate_packed([setup.dataset[1], longer]))


def test_verify_reports_a_shard_whose_rows_differ_from_the_manifest(built, tmp_path):
    cache = copy_cache(built, tmp_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"]["part-00001.arrow"]["rows"] = 4
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert ref.verify_cache(cache) == ["shard part-00001.arrow has 3 rows, manifest says 4"]


def test_an_unfinished_cache_for_another_number_of_examples_is_refused(setup, built, tmp_path):
    cache = copy_cache(built, tmp_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "complete": False, "num_examples": NUM_PAIRS + 2}))
    before = setup.forwards
    with pytest.raises(ReferenceCacheError, match=f"was made for {NUM_PAIRS + 2} examples but the dataset has {NUM_PAIRS}"):
        setup.ensure(cache)
    assert setup.forwards == before


def test_a_pass_that_wrote_fewer_rows_than_examples_is_not_marked_complete(setup, tmp_path, monkeypatch):
    """A shard missing a row (a scoring bug) fails the pass instead of completing a cache that
    every run would then find short."""
    real_compute = ref._compute_shard

    def lossy(*args, **kwargs):
        table = real_compute(*args, **kwargs)
        return table.slice(0, table.num_rows - 1) if table.column("example_id")[0].as_py() == 9 else table

    monkeypatch.setattr(ref, "_compute_shard", lossy)
    cache = tmp_path / "cache"
    with pytest.raises(ReferenceCacheError, match=f"{NUM_PAIRS - 1} rows written for {NUM_PAIRS} examples"):
        setup.ensure(cache)
    assert json.loads((cache / "manifest.json").read_text())["complete"] is False


def test_shard_rows_keep_each_pairs_values_when_packing_reorders_pairs(setup):
    """First-fit packing can put a later pair in an earlier micro-batch ([[0, 2], [1]]): the shard is
    sorted by example_id, and every value column moves with its id."""
    from dpo_dist.logprobs import SequenceLogps

    def score(batch):
        ids = torch.as_tensor(batch.example_ids).repeat_interleave(2).double()
        sides = torch.tensor([0.0, 0.5]).repeat(len(batch.example_ids)).double()
        tokens = (ids * 10 + sides * 2).long()
        return SequenceLogps(logps=-(ids + sides), sum_logps=-(ids + sides), token_counts=tokens)

    class Meter:
        def update(self, *_):
            pass

    table = ref._compute_shard(score, setup.dataset, [[0, 2], [1]], "cpu", Meter())
    assert table.schema == ref.SCHEMA
    assert table.to_pydict() == {
        "example_id": [0, 1, 2],
        "chosen_logp": [0.0, -1.0, -2.0],
        "rejected_logp": [-0.5, -1.5, -2.5],
        "chosen_tokens": [0, 10, 20],
        "rejected_tokens": [1, 11, 21],
    }


def test_other_record_keys_are_other_data(setup):
    """data.prompt_key & co. read other fields of the same file: another cache; the default keys keep
    the file's own data fingerprint."""
    cfg = DPOConfig(
        model=ModelConfig(path=str(setup.model_dir)),
        data=DataConfig(train_path=str(setup.data_path), max_length=MAX_LENGTH, chosen_key="rejected", rejected_key="chosen"),
        train=TrainConfig(micro_batch_tokens=512),
    )
    swapped = ref.fingerprints_from_config(cfg, setup.tokenizer, setup.data_path, dtype="fp32")
    from dpo_dist.data import data_fingerprint

    assert run_fingerprints(setup)["data"] == data_fingerprint(setup.data_path)
    assert swapped["data"] != data_fingerprint(setup.data_path)
    assert {k: v for k, v in swapped.items() if k != "data"} == {k: v for k, v in run_fingerprints(setup).items() if k != "data"}
