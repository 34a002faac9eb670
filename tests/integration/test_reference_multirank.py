"""The reference pass on 2 gloo ranks: same rows as 1 rank, and it finishes a pass killed on 1 rank."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from dpo_dist import reference as ref
from dpo_dist.attention import enable_packed_attention
from dpo_dist.data import load_tokenized
from tests.helpers import TOKENIZER_DIR, make_pairs_jsonl, make_tiny_model_dir, run_ranks

pytestmark = pytest.mark.integration

WORKER = Path(__file__).resolve().parent / "reference_worker.py"
MAX_LENGTH = 64
MICRO_BATCH_TOKENS = 96
PAIRS_PER_SHARD = 2
NUM_PAIRS = 9  # 5 shards (the last with one pair): rank 0 gets one more than rank 1


class Killed(Exception):
    """Stands in for the job dying mid-pass."""


def read_table(cache_dir: Path) -> pa.Table:
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    tables = [pa.ipc.open_file(str(cache_dir / name)).read_all() for name in sorted(manifest["shards"])]
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables])


def launch(spec: dict, tmp_path: Path, world_size: int = 2, timeout: float = 180) -> None:
    """Run the worker on ``world_size`` gloo ranks and wait for all of them."""
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    run_ranks([str(WORKER), str(spec_path)], world_size, timeout=timeout)


def test_two_ranks_write_the_rows_of_one_rank_and_resume_a_killed_pass(tmp_path, monkeypatch):
    model_dir = make_tiny_model_dir(tmp_path / "model")
    data = make_pairs_jsonl(tmp_path / "train.jsonl", NUM_PAIRS, seed=5)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    dataset = load_tokenized(data, tokenizer, MAX_LENGTH, "keep_end_of_prompt", "error")
    fingerprints = ref.reference_fingerprints(
        model_dir,
        tokenizer,
        data,
        max_length=MAX_LENGTH,
        truncation="keep_end_of_prompt",
        dtype=torch.float32,
    )
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    enable_packed_attention(model, "sdpa")

    def ensure(cache: Path):
        return ref.ensure_reference(
            model,
            dataset,
            cache,
            fingerprints=fingerprints,
            model_path=model_dir,
            tokenizer_path=TOKENIZER_DIR,
            micro_batch_tokens=MICRO_BATCH_TOKENS,
            pairs_per_shard=PAIRS_PER_SHARD,
            progress=False,
        )

    one_rank = tmp_path / "one_rank"
    ensure(one_rank)
    killed = tmp_path / "killed"  # a 1-rank pass that dies after two shards, finished by 2 ranks
    real_write, written = ref._write_shard, []

    def dying_write(*args):
        if len(written) == 2:
            raise Killed
        real_write(*args)
        written.append(args[1])

    monkeypatch.setattr(ref, "_write_shard", dying_write)
    with pytest.raises(Killed):
        ensure(killed)
    monkeypatch.setattr(ref, "_write_shard", real_write)

    two_ranks, out = tmp_path / "two_ranks", tmp_path / "out"
    out.mkdir()
    spec = {
        "model": str(model_dir),
        "tokenizer": str(TOKENIZER_DIR),
        "data": str(data),
        "max_length": MAX_LENGTH,
        "micro_batch_tokens": MICRO_BATCH_TOKENS,
        "pairs_per_shard": PAIRS_PER_SHARD,
        "caches": [str(two_ranks), str(killed)],
        "out": str(out),
    }
    launch(spec, tmp_path)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    # Same shard files with the same rows; values equal up to thread-count rounding.
    expected = read_table(one_rank)
    manifests = {d: json.loads((d / "manifest.json").read_text()) for d in (one_rank, two_ranks, killed)}
    for cache in (two_ranks, killed):
        assert manifests[cache]["complete"] is True
        assert {n: s["rows"] for n, s in manifests[cache]["shards"].items()} == {
            n: s["rows"] for n, s in manifests[one_rank]["shards"].items()
        }
        table = read_table(cache)
        for column in ("example_id", "chosen_tokens", "rejected_tokens"):
            assert table.column(column).to_pylist() == expected.column(column).to_pylist()
        for column in ("chosen_logp", "rejected_logp"):
            np.testing.assert_allclose(
                table.column(column).to_numpy(), expected.column(column).to_numpy(), rtol=1e-6
            )
        assert ref.verify_cache(cache) == []

    # ZeRO-3 needs equal forward counts: the rank with fewer micro-batches runs fillers.
    lengths = dataset.lengths()
    num_shards = -(-NUM_PAIRS // PAIRS_PER_SHARD)

    def shard_range(k):
        return k * PAIRS_PER_SHARD, min((k + 1) * PAIRS_PER_SHARD, NUM_PAIRS)

    def own_forwards(shards):
        """Micro-batches of each rank's round-robin share of ``shards``."""
        return [
            sum(len(ref._pack_shard(shard_range(k), lengths, MICRO_BATCH_TOKENS)) for k in shards[r::2])
            for r in range(2)
        ]

    for cache, shards in ((two_ranks, list(range(num_shards))), (killed, list(range(2, num_shards)))):
        own = own_forwards(shards)
        assert own[0] != own[1]  # the filler path is exercised
        per_rank = [results[r][str(cache)] for r in range(2)]
        assert [r["forwards"] for r in per_rank] == [max(own)] * 2
        assert all(r["computed"] and r["rows"] == NUM_PAIRS for r in per_rank)
        assert {r["shards_computed"] for r in per_rank} == {len(shards)}
        pairs = sum(stop - start for start, stop in map(shard_range, shards))
        assert {r["examples_computed"] for r in per_rank} == {pairs}


LOCK_SCRIPT = """
import os, sys
import torch.distributed as dist
sys.path.insert(0, os.getcwd())
from dpo_dist import reference as ref
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=2)
try:
    with ref._CacheLock(ref.Path(sys.argv[1]), rank, 2, 0.01):
        outcome = "entered"
except Exception as err:
    outcome = f"{type(err).__name__}: {err}"
ref.Path(sys.argv[2], f"rank{rank}.txt").write_text(outcome)
dist.barrier()  # leaving while the peer still talks to us aborts gloo ("terminate called ...")
dist.destroy_process_group()
"""


def test_a_cache_dir_rank0_cannot_lock_fails_every_rank_at_once(tmp_path):
    """Rank 0 takes the lock; when it cannot even try (here the cache dir would sit under a file;
    on NFS mounted nolock flock itself fails), the other ranks must fail too, not poll forever."""
    script = tmp_path / "lock.py"
    script.write_text(LOCK_SCRIPT)
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "out"
    out.mkdir()
    run_ranks([str(script), str(tmp_path / "a_file" / "cache"), str(out)], 2, timeout=60)
    rank0, rank1 = ((out / f"rank{r}.txt").read_text() for r in range(2))
    assert rank0.startswith("NotADirectoryError"), rank0
    assert rank1 == rank0  # rank 0's own error, on every rank
