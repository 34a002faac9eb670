"""One rank of the multi-rank reference test (``test_reference_multirank.py``).

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/integration/reference_worker.py SPEC

SPEC is a JSON file: model, tokenizer and data paths, max_length, micro_batch_tokens,
pairs_per_shard, ``caches`` (directories to ensure, in order) and ``out`` (a directory where each
rank writes ``rank<r>.json``: per cache its summary and how many decoder forwards it ran).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from a checkout

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402

from dpo_dist.attention import enable_packed_attention  # noqa: E402
from dpo_dist.data import load_tokenized  # noqa: E402
from dpo_dist.reference import ReferenceStore, ensure_reference, reference_fingerprints  # noqa: E402


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size)
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    dataset = load_tokenized(spec["data"], tokenizer, spec["max_length"], "keep_end_of_prompt", "error")
    fingerprints = reference_fingerprints(
        spec["model"],
        tokenizer,
        spec["data"],
        max_length=spec["max_length"],
        truncation="keep_end_of_prompt",
        dtype=torch.float32,
    )
    model = LlamaForCausalLM.from_pretrained(spec["model"]).eval()
    enable_packed_attention(model, "sdpa")
    forwards = [0]
    model.model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

    results = {}
    for cache in spec["caches"]:
        before = forwards[0]
        summary = ensure_reference(
            model,
            dataset,
            cache,
            fingerprints=fingerprints,
            model_path=spec["model"],
            tokenizer_path=spec["tokenizer"],
            rank=rank,
            world_size=world_size,
            micro_batch_tokens=spec["micro_batch_tokens"],
            pairs_per_shard=spec["pairs_per_shard"],
            progress=rank == 0,
            lock_poll_s=0.05,
        )
        store = ReferenceStore.open(cache, fingerprints, dataset.example_ids)
        results[cache] = {
            "computed": summary.computed,
            "examples_computed": summary.examples_computed,
            "shards_computed": summary.shards_computed,
            "forwards": forwards[0] - before,
            "rows": len(store),
        }
    (Path(spec["out"]) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()  # leaving while the peer still reads rank 0's last broadcast aborts gloo there
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
